"""Memory on TensorBoard: the pre-flight's plan against what the run really takes."""

from __future__ import annotations

import resource
import sys

import torch
from lightning.pytorch import Callback


def peak_rss_bytes() -> int:
    """This process's peak resident host memory. On Linux ``VmHWM`` (the high-water mark of this process's own
    memory): ``ru_maxrss`` carries over the parent's peak across fork and exec, so a rank started by a large
    process (a test runner, a notebook) would report its parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak so far: CUDA's max allocated bytes on ``device``, else the peak resident host memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


class MemoryMonitor(Callback):
    """Logs ``sys/planned_peak_gb`` once (the pre-flight's per-device plan, :mod:`qgen.preflight`) and
    ``sys/peak_mem_gb`` (the largest peak over the ranks) at every log step, and prints both when training ends.
    ``fit`` adds it on its own; ``planned_gb`` is ``None`` when the run was not planned.
    """

    def __init__(self, planned_gb: float | None = None):
        self.planned_gb = planned_gb
        self.peak_gb = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if self.planned_gb is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"sys/planned_peak_gb": self.planned_gb}, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % max(trainer.accumulate_grad_batches, 1):
            return  # once per optimizer step: the reduction over ranks is a collective
        self.peak_gb = peak_memory_gb(pl_module.device)
        pl_module.log("sys/peak_mem_gb", self.peak_gb, on_step=True, on_epoch=False, sync_dist=True,
                      reduce_fx="max", batch_size=1)  # fmt: skip

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.peak_gb:
            kind = "CUDA max allocated" if pl_module.device.type == "cuda" else "peak resident host memory"
            planned = f"planned {self.planned_gb:.2f} GB per device, " if self.planned_gb is not None else ""
            print(f"memory: {planned}measured {self.peak_gb:.2f} GB ({kind}, rank 0)")
