"""Callbacks for the DDP tests: every rank writes what it holds to $QGEN_TEST_DUMP (one file per rank)."""

import json
import os

from lightning.pytorch import Callback

from callbacks import RepetitionReward


class BankDump(Callback):
    def on_train_end(self, trainer, pl_module):
        bank = next(cb for cb in trainer.callbacks if isinstance(cb, RepetitionReward))
        path = os.path.join(os.environ["QGEN_TEST_DUMP"], f"bank_rank{trainer.global_rank}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"accepted": bank.accepted, "size": len(bank.index)}, fh, ensure_ascii=False)


class RolloutDump(Callback):
    """Every rank writes, per step, each prompt's (dataset index) sampled texts to rollouts_rank{R}.json."""

    def __init__(self):
        self.steps: dict[int, dict[int, list[str]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rollout, g = pl_module.last["rollout"], pl_module.hparams.group_size
        texts = self.steps.setdefault(trainer.global_step - 1, {})
        for j, index in enumerate(int(i) for i in batch["index"]):
            texts[index] = rollout.texts[j * g : (j + 1) * g]

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(os.environ["QGEN_TEST_DUMP"], f"rollouts_rank{trainer.global_rank}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.steps, fh, ensure_ascii=False)
