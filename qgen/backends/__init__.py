"""Generation backends: who samples the completions that GRPO scores, on-policy distillation learns from and
``predict`` / ``test`` write.

Every stage samples through one seam, :meth:`qgen.generation.QuestionWriterMixin.sample`, which hands the
prompts (token ids) to the module's backend and gets a :class:`qgen.sampling.Rollout` back:

- ``hf`` (:class:`HFBackend`, the default, no extra dependency): ``transformers`` ``generate`` on the
  trained model itself, so it always samples from exactly the weights being trained;
- ``vllm`` (:class:`qgen.backends.vllm.VLLMBackend`): a vLLM engine colocated in the training process,
  holding its own copy of the policy's weights, pushed to it after optimizer steps
  (:attr:`VLLMSpec.sync_every`). It returns the log-probs of the tokens it sampled, which GRPO uses for the
  truncated importance-sampling correction of the small engine / trainer mismatch.

Both take per-row seeds derived from (seed, global step, prompt index, sample index) where the caller has
them (:func:`request_seed`): the vLLM engine uses them per request, so what it samples does not depend on the
rank or on the other prompts of the batch; ``hf`` draws from the global torch generator as before (its state
is in the checkpoints, so a resumed run samples the same).
"""

from __future__ import annotations

import hashlib
from typing import Literal, Protocol

from torch import nn

from qgen.backends.spec import VLLMSpec, resolve_weight_sync
from qgen.sampling import Rollout, generate_group

BACKENDS = ("hf", "vllm")
BackendName = Literal["hf", "vllm"]


def request_seed(base: int, step: int, prompt: int | str, sample: int) -> int:
    """A 63-bit seed for one sample, from the run seed, the global step, the prompt's global index (or key) and
    the sample's index in its group: never from the rank or the batch it happens to be in.
    """
    digest = hashlib.blake2b(f"{base}/{step}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GenerationBackend(Protocol):
    name: str

    def prepare(self, model: nn.Module, tokenizer, step: int) -> bool:
        """Make the backend sample from ``model``'s current weights if its schedule says so (before the
        rollouts of optimizer step ``step``); ``True`` when weights were pushed.
        """

    def generate(self, model: nn.Module, tokenizer, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                 temperature: float, top_p: float, min_new_tokens: int = 0,
                 seeds: list[int] | None = None) -> Rollout:  # fmt: skip
        """``group_size`` completions of each prompt (prompt-major rows); ``seeds`` one per row."""

    def close(self) -> None:
        """Free the backend's resources (an engine and its KV cache)."""


class HFBackend:
    """``transformers`` ``generate`` on the trained model (:func:`qgen.sampling.generate_group`)."""

    name = "hf"

    def prepare(self, model: nn.Module, tokenizer, step: int) -> bool:
        return False  # samples from the trained module itself

    def generate(self, model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p, min_new_tokens=0,
                 seeds=None) -> Rollout:  # fmt: skip
        return generate_group(model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p,
                              min_new_tokens)  # fmt: skip

    def close(self) -> None:
        pass


def backend_problems(name: str, spec: VLLMSpec, quantization: str | None) -> list[str]:
    """What is wrong with ``model.backend`` / ``model.vllm`` for this model, one phrase each (checked at start)."""
    if name not in BACKENDS:
        return [f"model.backend must be one of {', '.join(BACKENDS)}, got {name!r}"]
    if name != "vllm":
        return []
    out = spec.problems()
    if quantization is not None and resolve_weight_sync(spec.weight_sync, quantization) == "merged":
        out.append(f"model.vllm.weight_sync merged cannot push into a {quantization} base (packed weights take no "
                   "merge): use weight_sync adapter (or auto)")  # fmt: skip
    return out


def build_backend(name: str, spec: VLLMSpec | None = None, dtype: str = "float32", device=None,
                  quantization: str | None = None) -> GenerationBackend:  # fmt: skip
    """The backend called ``name``; ``vllm`` checks that vLLM is importable (one line naming the extra if not).
    ``quantization``: the policy's base (``model.quantization``), which decides the vLLM weight sync.
    """
    if name == "hf":
        return HFBackend()
    if name == "vllm":
        from qgen.backends.vllm import VLLMBackend

        return VLLMBackend(spec or VLLMSpec(), dtype=dtype, device=device, quantization=quantization)
    raise ValueError(f"model.backend: unknown generation backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "GenerationBackend",
    "HFBackend",
    "VLLMSpec",
    "backend_problems",
    "build_backend",
    "request_seed",
]
