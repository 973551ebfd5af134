"""Generation backends (engines): who samples the completions that GRPO scores, on-policy distillation learns
from, the solver judges and ``predict`` / ``test`` write. This package owns generation:

- :mod:`~qgen.backends.rollout`: :class:`Rollout`, what every engine returns, and its one constructor;
- :mod:`~qgen.backends.hf` (``hf``, the default, no extra dependency): ``transformers`` ``generate`` on the
  trained model itself, so it always samples from exactly the weights being trained;
- :mod:`~qgen.backends.vllm` (``vllm``): a vLLM engine colocated in the training process, holding its own
  copy of the policy's weights, pushed to it after optimizer steps (:attr:`VLLMSpec.sync_every`). It returns
  the log-probs of the tokens it sampled, which GRPO uses for the truncated importance-sampling correction of
  the small engine / trainer mismatch;
- :mod:`~qgen.backends.spec`: the settings and the start-up checks.

Callers above this package see only :class:`GenerationBackend`: what an engine needs to be told
(:attr:`~GenerationBackend.wants_whole_waves`) and what it reports (:meth:`~GenerationBackend.stats`) are part of
the protocol, so nothing outside names an engine. Every stage samples through one seam,
:meth:`qgen.generation.QuestionWriterMixin.sample`.

Both take per-row seeds derived from (seed, global step, prompt index, sample index) where the caller has
them (:func:`request_seed`): the vLLM engine uses them per request, so what it samples does not depend on the
rank or on the other prompts of the batch; ``hf`` draws from the global torch generator (its state is in the
checkpoints, so a resumed run samples the same).
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from torch import nn

from qgen.backends.rollout import Rollout
from qgen.backends.spec import (
    BACKENDS,
    REFERENCE_NEEDS_ADAPTER,
    BackendError,
    BackendName,
    VLLMSpec,
    backend_problems,
    resolve_weight_sync,
)


def request_seed(base: int, step: int, prompt: int | str, sample: int) -> int:
    """A 63-bit seed for one sample, from the run seed, the global step, the prompt's global index (or key) and
    the sample's index in its group: never from the rank or the batch it happens to be in.
    """
    digest = hashlib.blake2b(f"{base}/{step}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GenerationBackend(Protocol):
    name: str
    # predict / test hand the engine the next many prompts at once (continuous batching) rather than one
    # loader batch at a time
    wants_whole_waves: bool

    def prepare(self, model: nn.Module, tokenizer, step: int) -> bool:
        """Make the backend sample from ``model``'s current weights if its schedule says so (before the
        rollouts of optimizer step ``step``); ``True`` when weights were pushed.
        """

    def generate(self, model: nn.Module, tokenizer, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                 temperature: float, top_p: float, min_new_tokens: int = 0, seeds: list[int] | None = None,
                 reference: bool = False) -> Rollout:  # fmt: skip
        """``group_size`` completions of each prompt (prompt-major rows); ``seeds`` one per row. ``reference``:
        sample the frozen reference policy (the backbone without the trained adapter) instead of the policy.
        """

    def stats(self) -> dict[str, float]:
        """The engine's figures for TensorBoard (logged as ``train/<key>``), e.g. its latest weight push."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the engine (plain tensors and numbers), ``{}`` when nothing."""

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's engine state, applied when the engine is (re)built."""

    def close(self) -> None:
        """Free the backend's resources (an engine and its KV cache)."""


def build_backend(name: str, spec: VLLMSpec | None = None, dtype: str = "float32", device=None,
                  quantization: str | None = None) -> GenerationBackend:  # fmt: skip
    """The backend called ``name``; ``vllm`` checks that vLLM is importable (one line naming the extra if not).
    ``quantization``: the policy's base (``model.quantization``), which decides the vLLM weight sync.
    """
    if name == "hf":
        from qgen.backends.hf import HFBackend

        return HFBackend()
    if name == "vllm":
        from qgen.backends.vllm import VLLMBackend

        return VLLMBackend(spec or VLLMSpec(), dtype=dtype, device=device, quantization=quantization)
    raise ValueError(f"model.backend: unknown generation backend {name!r}; choose one of {', '.join(BACKENDS)}")


def __getattr__(name: str):
    if name == "HFBackend":  # imported on first use: the settings and checks above load no model code
        from qgen.backends.hf import HFBackend

        return HFBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "REFERENCE_NEEDS_ADAPTER",
    "BackendError",
    "BackendName",
    "GenerationBackend",
    "HFBackend",
    "Rollout",
    "VLLMSpec",
    "backend_problems",
    "build_backend",
    "request_seed",
    "resolve_weight_sync",
]
