"""What the comparison scripts share: the optimisation every side runs, and a clock of step ends."""

from __future__ import annotations

import time

import torch


def fused_adamw(lr: float):
    """AdamW factory (torch's fused implementation, no weight decay): the optimizer of every side."""

    def make(params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)

    return make


def constant_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class StepClock:
    """End time of every optimizer step; a step's time is end of step to end of step, after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.ends = warmup, []

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())

    @property
    def s_per_step(self) -> float:
        return (self.ends[-1] - self.ends[self.warmup - 1]) / (len(self.ends) - self.warmup)
