"""The trainer's log-prob forward: per-token log-probs of a :class:`~qgen.backends.rollout.Rollout`'s completions
under the policy being trained (GRPO's ratio and loss), with each prompt run once for its group.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qgen.backends.rollout import Rollout
from qgen.losses import token_logprobs
from qgen.models import has_sliding_layers


def completion_logprobs(decoder: nn.Module, lm_head_weight: torch.Tensor, rollout: Rollout, chunk_size: int = 1024,
                        share_prompt: bool = True, temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Per-token log-probs of the completion tokens, ``[N, C]``; position ids follow the left padding.

    ``temperature`` is the sampling temperature: the log-probs are those of ``softmax(logits / T)``, the
    distribution the tokens were drawn from (greedy, ``T = 0``, is scored at 1).

    With ``share_prompt`` each prompt goes through the decoder once, not ``G`` times: its KV cache (still
    part of the autograd graph) is repeated for the ``G`` completions, which then attend to it. Values and
    gradients equal the plain forward over ``[N, P + C]`` (to float rounding; tested), at about
    ``(B*P + N*C) / (N*(P + C))`` of its cost: a third for 2 x 8 completions of 64 tokens after 150-token
    prompts. Under gradient checkpointing it works too: the prompt pass (``B`` rows) runs without
    checkpointing, the completion pass is checkpointed layer by layer and reads the prompt's keys and
    values from a cache that the recompute in backward finds unchanged (:func:`_read_only`). Models with
    sliding-window layers take the plain forward.
    """
    mask, p, g = rollout.attention_mask, rollout.prompt_length, rollout.group_size
    t = temperature if temperature > 0 else 1.0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [N, P+C]
    completions = rollout.sequences[:, p:]  # [N, C]
    sliding = has_sliding_layers(decoder)
    if not share_prompt or g == 1 or sliding:
        hidden = decoder(input_ids=rollout.sequences, attention_mask=mask, position_ids=position_ids).last_hidden_state
        return token_logprobs(hidden[:, p - 1 : -1], lm_head_weight, completions, chunk_size, t)  # [N, C]
    layers = _checkpointed_layers(decoder)
    with _checkpointing(layers, "off", decoder):  # the prompt pass writes the cache: no recompute may write it again
        prompt = decoder(input_ids=rollout.sequences[::g, :p], attention_mask=mask[::g, :p],
                         position_ids=position_ids[::g, :p], use_cache=True)  # fmt: skip
    cache = _read_only(prompt.past_key_values)
    cache.batch_repeat_interleave(g)  # [B, ...] -> [N, ...], differentiable
    cache_position = torch.arange(p, p + completions.size(1), device=completions.device)
    with _checkpointing(layers, "read_cache"):
        rest = decoder(
            input_ids=completions,
            attention_mask=mask,
            position_ids=position_ids[:, p:],
            past_key_values=cache,
            use_cache=True,
            cache_position=cache_position,
        ).last_hidden_state  # [N, C, H]
    # position P-1 (the prompt's last token) predicts completion token 0; completion position t predicts t+1
    hidden = torch.cat([prompt.last_hidden_state[:, -1:].repeat_interleave(g, 0), rest[:, :-1]], dim=1)  # [N, C, H]
    return token_logprobs(hidden, lm_head_weight, completions, chunk_size, t)  # [N, C]


def _checkpointed_layers(decoder: nn.Module) -> list[nn.Module]:
    """The decoder's layers that run under gradient checkpointing now (``transformers``' checkpointing layers)."""
    return [m for m in decoder.modules() if hasattr(m, "_can_checkpoint_with_cache") and m.gradient_checkpointing]


@contextlib.contextmanager
def _checkpointing(layers: list[nn.Module], mode: str, decoder: nn.Module | None = None):
    """``off``: run ``layers`` without checkpointing; ``read_cache``: checkpoint them but let them read a
    :func:`_read_only` prompt cache (``transformers`` drops any cache under checkpointing, since a cache that the
    layer extends would be extended again by the recompute in backward; the prompt cache is never extended).
    """
    if not layers:
        yield
        return
    decoder_flag = None
    saved = [(m.gradient_checkpointing, m.__dict__.get("_can_checkpoint_with_cache")) for m in layers]
    for m in layers:
        if mode == "off":
            m.gradient_checkpointing = False
        else:
            m._can_checkpoint_with_cache = True
    if mode == "off" and getattr(decoder, "gradient_checkpointing", False):  # the model turns use_cache off too
        decoder_flag, decoder.gradient_checkpointing = decoder.gradient_checkpointing, False
    try:
        yield
    finally:
        if decoder_flag is not None:
            decoder.gradient_checkpointing = decoder_flag
        for m, (flag, can) in zip(layers, saved):
            m.gradient_checkpointing = flag
            if can is None:
                m.__dict__.pop("_can_checkpoint_with_cache", None)
            else:
                m._can_checkpoint_with_cache = can


def _prefix_update(self, key_states, value_states, layer_idx, *args, **kwargs):
    layer = self.layers[layer_idx]
    return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


_READ_ONLY: dict[type, type] = {}


def _read_only(cache):
    """A view of a prompt's KV cache whose ``update`` returns the prompt's states followed by the new ones
    and stores nothing: every call, and every recompute of a checkpointed layer, sees the same prompt.
    """
    base = type(cache)
    cls = _READ_ONLY.setdefault(base, type(f"ReadOnly{base.__name__}", (base,), {"update": _prefix_update}))
    view = cls.__new__(cls)
    view.__dict__.update(cache.__dict__)
    return view
