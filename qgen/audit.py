"""The policy/engine mismatch audit: does the vLLM engine still sample the policy being trained?

Every GRPO step with the vLLM backend compares, per completion token, the engine's log-prob of the sampled token
with the trainer's (the dropout-free policy, :meth:`qgen.grpo.GRPOModule.sampled_policy_logprobs`). Right after a
weight push the two are the same weights in two implementations, so the mean gap is numerical noise: about 1e-6
in float32 on the CPU (at most 5.5e-7 over 20 steps of the embedded default with a trained adapter and LoRA
dropout 0.05); the engine one optimizer step behind shows 8e-3, pushed weights rounded to bf16 1.6e-3. The
float32 threshold, 2e-4, sits between (8x below the smallest fault, 360x above the healthy gap); the bf16 one,
5e-2, is an estimate not yet measured on a GPU. Between pushes (``sync_every > 1``) the engine is stale by design and
nothing is audited.

With the ``hf`` engine the sampler is the trained model itself, but it samples through a KV cache: the log-probs
it recorded while sampling are compared with the trainer's full forward the same way (a healthy gap is float32
noise, below 1e-5; a corrupted cache shows 0.05).

When the step's mean gap over every rank's tokens exceeds ``threshold`` on ``patience`` consecutive audited steps,
the audit names the likely cause (:func:`likely_cause`) and either stops the run (``stop``: a checkpoint of the
state before that step's update is written first) or warns (``warn``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

AUDIT_MODES = ("stop", "warn", "off")
DEFAULT_THRESHOLDS = {"float32": 2e-4, "bfloat16": 5e-2, "float16": 5e-2}  # mean |engine - trainer| per token


class EngineMismatchError(RuntimeError):
    """The engine does not sample the trained policy (the message is the one line to print)."""


def likely_cause(gaps: list[float], to_reference: float | None, threshold: float) -> str:
    """A cause for a run of audited gaps (oldest first), from their size and shape. ``to_reference``: the latest
    step's mean gap between the engine and the reference policy (the base without the adapter), where the run
    computes one. Measured on the fault-injection tests (README): a precision fault stays within 10x the
    threshold; a skipped or stale push starts at one step's change and grows with every step the engine falls
    behind (x3 from the first to the second step); a wrong scale or another adapter is large from the first push
    and grows more slowly (x1.6), and a random adapter samples like the base.
    """
    if gaps[-1] < 10 * threshold:
        return "a precision mismatch in the pushed weights (dtype downcast, rounding in the merge)"
    if len(gaps) > 1 and all(b > 1.8 * a for a, b in zip(gaps, gaps[1:])):
        return "weights not pushed (or stale ones pushed): the gap grows with every step the engine falls behind"
    if to_reference is not None and to_reference < 0.25 * gaps[-1]:
        return "the engine samples the base weights: the adapter never reached it"
    return "the engine holds other weights than the trainer's (wrong LoRA scale alpha/r, another adapter)"


@dataclass
class EngineAudit:
    """Accumulates a step's gaps (:meth:`add` per micro-batch) and judges the step (:meth:`judge`)."""

    threshold: float
    patience: int = 2
    total: float = 0.0
    count: float = 0.0
    to_reference: float = 0.0
    reference_count: float = 0.0
    strikes: list[tuple[int, float]] = field(default_factory=list)  # (step, gap) of consecutive failed audits
    engine: str = "vllm"  # hf: the sampler is the trained model itself, through its KV cache

    def add(self, gap_sum, count, reference_gap_sum=None) -> None:
        """A micro-batch's sums (floats, or device tensors left on the device until the step is judged)."""
        self.total += gap_sum
        self.count += count
        if reference_gap_sum is not None:
            self.to_reference += reference_gap_sum
            self.reference_count += count

    def judge(self, step: int, pushed: bool) -> str | None:
        """At the end of a step (sums already over every rank): the failure line once ``patience`` consecutive
        audited steps are above the threshold, else ``None``. Resets the step's sums.
        """
        gap = self.total / self.count if self.count else 0.0
        reference = self.to_reference / self.reference_count if self.reference_count else None
        self.total = self.count = self.to_reference = self.reference_count = 0.0
        if not pushed:
            return None  # stale by design between pushes
        if gap <= self.threshold:
            self.strikes.clear()
            return None
        self.strikes.append((step, gap))
        if len(self.strikes) < self.patience:
            return None
        steps = ", ".join(str(s) for s, _ in self.strikes)
        gaps = [g for _, g in self.strikes]
        cause = likely_cause(gaps, reference, self.threshold) if self.engine != "hf" else (
            "the KV cache the sampler read disagrees with the model (a stale or corrupted cache)")  # fmt: skip
        return (f"policy/engine mismatch: the engine's log-probs differ from the trainer's by {gap:.2g} per token "
                f"(threshold {self.threshold:g}) on the {len(gaps)} steps right after weight pushes at steps {steps} "
                f"(gaps {', '.join(f'{g:.2g}' for g in gaps)}); "
                f"likely cause: {cause}")  # fmt: skip
