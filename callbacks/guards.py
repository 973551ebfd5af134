"""Guards every ``fit`` runs with (added by the command line unless the config lists its own): a hang watchdog
and a stop at the first non-finite loss or gradient. README, "When something goes wrong".
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback

from qgen.watchdog import DEFAULT_DEADLINES, Watchdog

DEFAULT_PEER_TIMEOUT = 1800.0  # seconds, when the strategy states no collective timeout (Lightning's default)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm: the message names the step and the micro-batch."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard (FSDP2)


class HangWatchdog(Callback):
    """Runs :class:`qgen.watchdog.Watchdog` during ``fit``: every rank exits within ``peer_timeout`` (+ one
    heartbeat) of a rank that stopped answering, or of a stage past its deadline, with one line naming both.

    Args:
        peer_timeout: seconds without a heartbeat after which a rank counts as stopped; default the strategy's
            collective timeout (``trainer.strategy.init_args.timeout``; the shipped overlays set 10 minutes),
            else 1800.
        heartbeat_s: seconds between heartbeats (and checks).
        deadlines: seconds per stage, over the defaults (generation 1800, scoring 900, solver 900, checkpoint 900).
        enabled: false turns the watchdog off.
    """

    def __init__(self, peer_timeout: float | None = None, heartbeat_s: float = 2.0,
                 deadlines: dict[str, float] | None = None, enabled: bool = True):  # fmt: skip
        self.peer_timeout, self.heartbeat_s, self.enabled = peer_timeout, heartbeat_s, enabled
        self.deadlines = {**DEFAULT_DEADLINES, **(deadlines or {})}
        self.dog: Watchdog | None = None

    def _timeout(self, trainer) -> float:
        if self.peer_timeout is not None:
            return float(self.peer_timeout)
        timeout = getattr(trainer.strategy, "_timeout", None)
        return timeout.total_seconds() if timeout is not None else DEFAULT_PEER_TIMEOUT

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self.enabled or self.dog is not None:
            return
        address = None
        if trainer.world_size > 1 and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        launcher = getattr(trainer.strategy, "launcher", None)
        launched = list(getattr(launcher, "procs", None) or []) if trainer.global_rank == 0 else []
        self.dog = Watchdog(trainer.global_rank, trainer.world_size, self._timeout(trainer), self.heartbeat_s,
                            self.deadlines, address, launched).start()  # fmt: skip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.dog is not None:
            self.dog.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.dog is not None:  # what follows (checkpointing, validation) belongs to the next step's count
            self.dog.step = trainer.global_step

    def _stop(self) -> None:
        if self.dog is not None:
            self.dog.stop()
            self.dog = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._stop()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A collective that timed out: a peer stopped; the watchdog names it (and exits) within a heartbeat or
        two, so wait for it rather than unwind into more collectives.
        """
        dog = self.dog
        text = str(exception).lower()
        if dog is not None and dog._thread is not None and ("timed out" in text or "timeout" in text):
            dog._thread.join(timeout=dog.peer_timeout + 3 * dog.heartbeat_s)
        self._stop()


class FiniteGuard(Callback):
    """Stops the run at the first non-finite loss (before its backward pass) or gradient norm (before the
    optimizer step): ``NonFiniteError`` naming the step, the micro-batch and the rank, on every rank at once (the
    verdict is reduced over ranks, so none waits in a collective). The weights stay those of the last good step;
    the last checkpoint written stays as it is. With fp16 loss scaling (``16-mixed``) infinite gradients are the
    scaler's business and only the loss is checked. ``enabled: false`` turns it off.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.batch_idx = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_idx = batch_idx

    def _agreed(self, trainer, bad: bool) -> bool:
        if trainer.world_size == 1:
            return bad
        flag = torch.tensor(float(bad), device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)

    def _where(self, trainer) -> str:
        micro = self.batch_idx % max(trainer.accumulate_grad_batches, 1)
        return f"step {trainer.global_step}, micro-batch {micro} (batch {self.batch_idx})"

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        value = loss.detach().float()
        bad = not bool(torch.isfinite(value).all())
        if self._agreed(trainer, bad):
            said = f"{value.item():g} on rank {trainer.global_rank}" if bad else "non-finite on another rank"
            raise NonFiniteError(f"{self._where(trainer)}: the loss is {said}; stopped before its backward pass, "
                                 "the weights are the last good step's")  # fmt: skip

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.enabled or "16-mixed" == str(trainer.precision):
            return
        squares = [_local(p.grad).detach().float().pow(2).sum() for p in pl_module.parameters() if p.grad is not None]
        total = torch.stack(squares).sum() if squares else torch.zeros(())
        bad = not bool(torch.isfinite(total))
        if self._agreed(trainer, bad):
            said = f"{total.sqrt().item():g} on rank {trainer.global_rank}" if bad else "non-finite on another rank"
            raise NonFiniteError(f"{self._where(trainer)}: the gradient norm is {said}; stopped before the optimizer "
                                 "step, the weights are the last good step's")  # fmt: skip
