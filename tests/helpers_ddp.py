"""A callback for the DDP test: every rank writes its repetition bank to $QGEN_TEST_DUMP/bank_rank{R}.json."""

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
