"""``StageModule``: what the SFT, GRPO and distillation modules share beyond the data.

- the optimizer over the trainable parameters and a per-step scheduler, from the YAML factories;
- slim checkpoints (trainable weights and RNG states only; :mod:`qgen.checkpointing`);
- ``predict`` / ``test`` generation (:class:`qgen.generation.QuestionWriterMixin`).
"""

from __future__ import annotations

from typing import Any

import lightning as L

from qgen.checkpointing import restore_rng, slim_checkpoint
from qgen.generation import QuestionWriterMixin
from qgen.optim import configure_optimizers


class StageModule(QuestionWriterMixin, L.LightningModule):
    """Base of every stage's LightningModule; subclasses set ``optimizer_factory`` and ``scheduler_factory``."""

    def configure_optimizers(self):
        return configure_optimizers(
            self, self.optimizer_factory, self.scheduler_factory, self.trainer.estimated_stepping_batches
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        slim_checkpoint(self, checkpoint)  # trainable weights only: no frozen base, reference or teacher

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_rng(checkpoint)
