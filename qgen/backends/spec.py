"""The engines' settings and start-up checks (importable without vLLM: configs are validated where it is not
installed). Every module of :mod:`qgen.backends` imports these from here, never from the package itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BACKENDS = ("hf", "vllm")
REFERENCE_NEEDS_ADAPTER = ("the vLLM engine holds only merged weights (model.vllm.weight_sync merged), so it cannot "
                           "sample the reference policy the in-process solver needs: set model.vllm.weight_sync: "
                           "adapter")


class BackendError(ValueError):
    """A backend setting this run cannot use (reported in one line by the command line)."""
BackendName = Literal["hf", "vllm"]
WEIGHT_SYNCS = ("auto", "merged", "adapter")


def resolve_weight_sync(weight_sync: str, quantization: str | None) -> str:
    """``merged`` or ``adapter`` (see :attr:`VLLMSpec.weight_sync`)."""
    if weight_sync == "auto":
        return "adapter" if quantization else "merged"
    return weight_sync


@dataclass
class VLLMSpec:
    """Settings of the colocated vLLM engine (``model.backend: vllm``).

    Args:
        gpu_memory_utilization: share of the GPU's memory the engine may take for its weights and KV cache
            (GPU only); training uses the rest.
        kv_cache_gib: KV-cache size in whole GiB on CPU machines (``VLLM_CPU_KVCACHE_SPACE``).
        max_model_len: longest prompt + completion the engine serves; ``null`` = the model's
            ``max_position_embeddings`` capped at 4,096.
        sync_every: push the policy's weights to the engine every this many optimizer steps (1: the engine
            always samples from the policy being trained; larger values sample slightly stale policies,
            which the importance-sampling correction accounts for). Pushes happen at the global steps that are
            multiples of ``sync_every``; a run resumed between two pushes builds its engine from the weights of
            the latest push, which the checkpoint keeps (the trainable weights: the LoRA adapter), so it samples
            what the uninterrupted run did (under FSDP those weights are not kept: the engine starts from the
            current ones).
        sleep: GPU only: put the engine to sleep (weights offloaded, KV cache freed) while the training step
            runs and wake it for generation, so training and engine share one device.
        enforce_eager: no CUDA graphs / compilation (``null``: true on CPU, false on GPU).
        importance_sampling: GRPO's truncated importance-sampling correction of the policy-gradient term by
            ``min(exp(trainer log-prob - engine log-prob), is_cap)`` per token (TRL's
            ``vllm_importance_sampling_correction``).
        is_cap: the cap ``C`` of the importance ratio.
        seed: base of the per-request seeds; ``null`` = the run's ``seed_everything`` seed (0 if none).
        predict_wave: ``predict`` / ``test``: prompts handed to the engine at once (continuous batching inside a
            wave; the writer flushes after every Lightning batch, so a killed run loses at most one wave).
        swap_space_gib: CPU memory for swapped-out requests (GPU engines).
        audit: the policy/engine mismatch audit (:mod:`qgen.audit`): ``stop`` the run (a checkpoint of the state
            before the step's update written first), ``warn``, or ``off``.
        audit_threshold: mean ``|engine - trainer|`` log-prob per token above which an audited step (one right
            after a weight push) fails; ``null``: 2e-4 for float32 runs, 5e-2 for bf16 / fp16 (README).
        audit_patience: consecutive failed audited steps that trip the audit.
        weight_sync: how the engine gets the policy: ``merged`` (every LoRA layer pushed as ``W + scale * B A``,
            computed in a copy), ``adapter`` (the engine keeps the base weights and samples through vLLM's own
            LoRA support, the adapter saved and handed over as a new LoRA request at every sync), or ``auto``:
            ``adapter`` for a 4-bit / 8-bit base (its packed weights cannot take a merge), ``merged`` otherwise.
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_gib: int = 2
    max_model_len: int | None = None
    sync_every: int = 1
    sleep: bool = False
    enforce_eager: bool | None = None
    importance_sampling: bool = True
    is_cap: float = 2.0
    seed: int | None = None
    predict_wave: int = 1024
    swap_space_gib: float = 0.0
    weight_sync: str = "auto"
    audit: str = "stop"
    audit_threshold: float | None = None
    audit_patience: int = 2

    def problems(self) -> list[str]:
        """What is wrong with these settings, one phrase each (empty when they are valid)."""
        out = []
        if not 0 < self.gpu_memory_utilization <= 1:
            out.append("model.vllm.gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_gib < 1:
            out.append("model.vllm.kv_cache_gib must be >= 1 (whole GiB)")
        if self.max_model_len is not None and self.max_model_len < 2:
            out.append("model.vllm.max_model_len must be >= 2 (or null)")
        if self.sync_every < 1:
            out.append("model.vllm.sync_every must be >= 1")
        if self.is_cap < 1:
            out.append("model.vllm.is_cap must be >= 1 (the ratio is truncated at it)")
        if self.predict_wave < 1:
            out.append("model.vllm.predict_wave must be >= 1")
        if self.swap_space_gib < 0:
            out.append("model.vllm.swap_space_gib must be >= 0")
        if self.audit not in ("stop", "warn", "off"):
            out.append(f"model.vllm.audit must be one of stop, warn, off, got {self.audit!r}")
        if self.audit_threshold is not None and self.audit_threshold <= 0:
            out.append("model.vllm.audit_threshold must be > 0 (or null)")
        if self.audit_patience < 1:
            out.append("model.vllm.audit_patience must be >= 1")
        if self.weight_sync not in WEIGHT_SYNCS:
            out.append(f"model.vllm.weight_sync must be one of {', '.join(WEIGHT_SYNCS)}, got {self.weight_sync!r}")
        return out


def backend_problems(name: str, spec: VLLMSpec, quantization: str | None) -> list[str]:
    """What is wrong with ``model.backend`` / ``model.vllm`` for this model, one phrase each (checked at start)."""
    if name not in BACKENDS:
        return [f"model.backend must be one of {', '.join(BACKENDS)}, got {name!r}"]
    if name != "vllm":
        return []
    out = spec.problems()
    if quantization == "int8":
        out.append("model.backend vllm with an int8 base: vLLM's in-flight bitsandbytes quantization is 4-bit, so an "
                   "LLM.int8 policy would be sampled from an NF4 engine; use quantization nf4, or backend hf")  # fmt: skip
    elif quantization is not None and resolve_weight_sync(spec.weight_sync, quantization) == "merged":
        out.append(f"model.vllm.weight_sync merged cannot push into a {quantization} base (packed weights take no "
                   "merge): use weight_sync adapter (or auto)")  # fmt: skip
    return out
