"""A callback for the DDP test: every rank writes its novelty bank to $QGEN_TEST_DUMP/bank_rank{R}.json."""

import json
import os

from lightning.pytorch import Callback

from callbacks import NoveltyReward


class BankDump(Callback):
    def on_train_end(self, trainer, pl_module):
        novelty = next(cb for cb in trainer.callbacks if isinstance(cb, NoveltyReward))
        path = os.path.join(os.environ["QGEN_TEST_DUMP"], f"bank_rank{trainer.global_rank}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"accepted": novelty.accepted, "size": len(novelty.index)}, fh, ensure_ascii=False)
