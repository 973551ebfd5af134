"""The ``transformers`` engine: ``generate`` on the trained model itself, each prompt prefilled once per group.

It always samples from exactly the weights being trained (no copy, nothing to push); over sharded weights
(FSDP) every rank decodes until all are done (``synced_gpus``). With per-request seeds (what the trainer always
passes) every completion draws from its own random stream (:class:`SeededSampling`), so a completion depends on its
prompt, its seed and the weights, not on the rank or the batch it was sampled in: one process samples what two
ranks sample, at every step.
"""

from __future__ import annotations

import torch
from torch import nn

from qgen.backends.rollout import Rollout, left_pad
from qgen.models import has_sliding_layers


class HFBackend:
    """``transformers`` ``generate`` on the trained model (:func:`generate_group`)."""

    name = "hf"
    wants_whole_waves = False  # batches as the loader hands them out: the model is the trainer's

    def prepare(self, model: nn.Module, tokenizer, step: int) -> bool:
        return True  # samples from the trained module itself: always this step's weights

    def generate(self, model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p, min_new_tokens=0,
                 seeds=None, reference: bool = False) -> Rollout:  # fmt: skip
        """``reference``: sample the reference policy, the same backbone with its LoRA adapter disabled."""
        if reference and hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                return generate_group(model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p,
                                      min_new_tokens, seeds=seeds)  # fmt: skip
        return generate_group(model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p,
                              min_new_tokens, seeds=seeds)  # fmt: skip

    def stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}  # nothing beside the trained model

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class SeededSampling:
    """A logits processor that samples each row from its own seeded stream and hands ``generate``'s greedy
    search a one-hot choice (0 for the drawn token, ``-inf`` elsewhere).

    The distribution is the one ``transformers`` samples with ``do_sample``: the scores with EOS masked while
    fewer than ``min_new_tokens`` exist, divided by ``temperature``, cut to the nucleus ``top_p`` (smallest set
    of most likely tokens whose mass reaches ``top_p``, at least one kept), renormalised. A row draws by
    inversion of its cumulative distribution with the ``t``-th uniform of ``torch.Generator(seed)`` (``t`` =
    tokens generated so far); the uniforms are drawn once, on the CPU, so the stream is the same on any device
    and in any batch. Each drawn token's log-prob under the full tempered softmax (no mask, no nucleus: what
    the trainer computes) is recorded (:attr:`recorded`) for the policy/engine audit.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, prompt_width: int, max_new_tokens: int,
                 min_new_tokens: int = 0, eos_token_id: int | None = None):  # fmt: skip
        self.temperature, self.top_p, self.prompt_width = temperature, top_p, prompt_width
        self.min_new_tokens, self.eos = min_new_tokens, eos_token_id
        self.uniforms = torch.stack([torch.rand(max(max_new_tokens, 1), generator=torch.Generator().manual_seed(s),
                                                dtype=torch.float64) for s in seeds])  # fmt: skip
        self.recorded: list[torch.Tensor] = []  # per step: [N] log-prob of the drawn token, full tempered softmax

    def distribution(self, scores: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` probabilities that a row samples from (float32, truncated to the nucleus, renormalised)."""
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=False)
            cut = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
            cut[:, -1] = False  # keep the most likely token
            logits = logits.masked_fill(cut.scatter(1, order, cut), float("-inf"))
        return logits.softmax(-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.size(1) - self.prompt_width
        full = (scores.float() / self.temperature).log_softmax(-1)  # what the trainer recomputes
        if t < self.min_new_tokens and self.eos is not None:  # EOS suppressed (after recording the full scores)
            scores = scores.clone()
            scores[:, self.eos] = float("-inf")
        cdf = self.distribution(scores).double().cumsum(-1)
        u = self.uniforms[:, t].to(cdf.device).unsqueeze(1) * cdf[:, -1:]
        choice = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.size(1) - 1)
        self.recorded.append(full.gather(1, choice).squeeze(1))
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(1, choice, 0.0)


def _shared_prompt_cache(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, group_size: int):
    """The KV cache of every prompt but its last token, each prompt computed once and repeated for its
    ``group_size`` completions (``[B, ...] -> [N, ...]``): ``generate`` then starts from it and runs only the
    last prompt token and the completions. The prefill costs ``1 / group_size`` of the repeated one (a sixth
    less generation time for 2 x 8 completions of 64 tokens after 150-token prompts, on CPU).
    """
    from transformers import DynamicCache

    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
          past_key_values=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
    cache.batch_repeat_interleave(group_size)
    return cache


@torch.no_grad()
def generate_group(model: nn.Module, tokenizer, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, min_new_tokens: int = 0,
                   share_prompt: bool = True, seeds: list[int] | None = None) -> Rollout:  # fmt: skip
    """One batched ``generate`` call: every prompt repeated ``group_size`` times, sampled with KV cache.

    The model is put in eval mode for sampling (no dropout) and restored afterwards. ``temperature`` 0 is
    greedy decoding. ``min_new_tokens`` suppresses EOS until that many tokens exist (benchmarks fix the
    generated length this way). With ``share_prompt`` (and ``group_size > 1``, full-attention models) each
    prompt is prefilled once, not ``group_size`` times (:func:`_shared_prompt_cache`); the samples are those
    of the repeated prefill (the same tokens for the same seed, tested). Over sharded weights (FSDP2) every
    rank keeps decoding until all ranks are done (``synced_gpus``): a layer's forward is a collective, and a
    rank that stopped early would hang the rest. ``seeds`` (one per completion, prompt-major): each completion
    samples from its own stream (:class:`SeededSampling`); without them ``generate`` draws from the global RNG.
    """
    from qgen.strategies import sharded_parameters

    device = next(model.parameters()).device
    synced = sharded_parameters(model) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    ids, mask = prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0)
    was_training = model.training
    model.eval()
    try:
        seeded = None
        if temperature > 0 and seeds is not None:
            if len(seeds) != ids.size(0):
                raise ValueError(f"{len(seeds)} seeds for {ids.size(0)} completions")
            seeded = SeededSampling(seeds, temperature, top_p, ids.size(1), max_new_tokens, min_new_tokens,
                                    tokenizer.eos_token_id)  # fmt: skip
            sampling = {"do_sample": False, "logits_processor": [seeded], "top_k": None, "top_p": None,
                        "temperature": None}  # fmt: skip
            min_new_tokens = 0  # the sampler masks EOS itself, after recording the full scores
        elif temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        else:
            sampling = {"do_sample": False}
        if share_prompt and group_size > 1 and ids.size(1) > 1 and not has_sliding_layers(model):
            sampling["past_key_values"] = _shared_prompt_cache(model, prompt_ids, prompt_mask, group_size)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, use_cache=True, min_new_tokens=min_new_tokens, synced_gpus=synced,
            **sampling,
        )  # fmt: skip
    finally:
        model.train(was_training)
    completions = out[:, ids.size(1) :]  # [N, C]
    if completions.size(1) == 0:
        completions = torch.full((ids.size(0), 1), tokenizer.eos_token_id, device=device)
    recorded = torch.stack(seeded.recorded, 1) if seeded is not None and seeded.recorded else None
    return Rollout.from_completions(prompts, completions, group_size, tokenizer, recorded_logprobs=recorded)
