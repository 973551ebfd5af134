"""Optimisation shared by every stage: the default optimizer (AdamW) and schedule (linear warmup, then cosine
decay to a floor), and the optimizer over the trainable parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x the base LR.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: optimizer steps of linear warmup from 0.
        total_steps: optimizer steps of the whole run; ``null`` = the trainer's estimate
            (``trainer.estimated_stepping_batches``), filled in by the module.
        min_lr_ratio: the LR at the end of the decay, as a fraction of the base LR.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 10, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1, last_epoch: int = -1):  # fmt: skip
        if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError("scheduler: warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.auto_total = total_steps is None  # the horizon follows the trainer's max_steps
        super().__init__(optimizer, last_epoch)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the position; a horizon that follows ``max_steps`` is recomputed, not restored.

        A run resumed with a larger ``max_steps`` decays over the new horizon (a message says so) instead of
        sitting at the old run's floor. A ``total_steps`` set in the config is restored as saved.
        """
        current, auto = self.total_steps, self.auto_total and state_dict.get("auto_total", False)
        super().load_state_dict(state_dict)
        if auto and current is not None and current != state_dict.get("total_steps"):
            print(f"scheduler: cosine horizon recomputed from max_steps: {state_dict.get('total_steps')} -> {current} "
                  f"steps (resumed at step {self.last_epoch})")  # fmt: skip
            self.total_steps = current
            self.auto_total = True
            for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
                group["lr"] = lr

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        total = self.total_steps or (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW at lr 2e-4, no weight decay: every stage's default ``model.optimizer``."""
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)


def default_scheduler(optimizer: torch.optim.Optimizer) -> WarmupCosineLR:
    """Warmup + cosine with the horizon from the trainer: every stage's default ``model.scheduler``."""
    return WarmupCosineLR(optimizer)


def configure_optimizers(module: nn.Module, optimizer_factory, scheduler_factory, estimated_steps: int) -> dict:
    """The optimizer over the trainable parameters and a per-step scheduler; a ``total_steps`` left at
    ``None`` is filled with the trainer's estimate.
    """
    optimizer = optimizer_factory([p for p in module.parameters() if p.requires_grad])
    scheduler = scheduler_factory(optimizer)
    if getattr(scheduler, "total_steps", 0) is None:
        scheduler.total_steps = int(estimated_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
