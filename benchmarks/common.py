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


# ------------------------------------------------------------------------------------- model and machine
def add_machine_args(parser) -> None:
    """``--model`` / ``--device`` / ``--dtype``: the same comparison on another model and machine (the embedded
    default in float32 on the CPU unless told; ``benchmarks/gpu_check.py`` runs Qwen3-1.7B in bf16 on CUDA).
    """
    parser.add_argument("--model", default=None, help="model_name_or_path (default: the embedded default); "
                        "random:<arch> for a random-init model of a bundled architecture")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def lightning_kwargs(args) -> dict:
    """The trainer settings of qgen's side: the device, and bf16 autocast over bf16 weights (as the 14B configs)."""
    return {"accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1,
            "precision": "bf16-mixed" if args.dtype == "bfloat16" else "32-true"}  # fmt: skip


def trl_kwargs(args) -> dict:
    """The same for TRL's ``TrainingArguments``."""
    return {"use_cpu": args.device == "cpu", "bf16": args.dtype == "bfloat16"}


def hf_model(args):
    """The plain causal LM every non-qgen side trains: the very weights qgen's side loads (a random-init model
    included), built by qgen's loader without an adapter.
    """
    from qgen.models import load_causal_lm

    return load_causal_lm(args.model, None, None, args.dtype)


def describe(args) -> str:
    return f"{args.model or 'embedded default'}, {args.dtype} on {args.device}"
