"""Sampling groups of completions, and their per-token log-probs, for GRPO, distillation and prediction."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from qgen.losses import token_logprobs


@dataclass
class Rollout:
    """``G`` sampled completions for each of ``B`` prompts; ``N = B * G`` rows, prompt-major.

    ``sequences`` are the left-padded prompts followed by the completions; ``completion_mask`` covers each
    completion up to and including its EOS token; ``truncated`` rows never reached EOS.
    """

    sequences: torch.Tensor  # [N, P + C]
    attention_mask: torch.Tensor  # [N, P + C]
    prompt_length: int  # P
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C]
    truncated: torch.Tensor  # [N] bool
    texts: list[str]  # N decoded completions (special tokens dropped)
    group_size: int
    # [N, C] log-prob of each sampled token under the sampler's own (tempered) distribution, where the
    # sampler is not the trained module (the vLLM backend); None for hf, which samples from the module itself
    sampling_logprobs: torch.Tensor | None = None

    def select(self, start: int, end: int) -> Rollout:
        """Rows ``start:end`` (whole groups), with the padding columns that none of them uses cut off: the
        left padding of their prompts and the completion columns past their longest completion.
        """
        if start % self.group_size or end % self.group_size:
            raise ValueError(f"rows {start}:{end} split a group of {self.group_size}")
        p = self.prompt_length
        used = self.attention_mask[start:end, :p].any(0)  # [P]
        left = int(used.int().argmax()) if bool(used.any()) else p - 1
        cmask = self.completion_mask[start:end]  # [n, C]
        width = max(1, int(cmask.sum(1).max()))
        seq = self.sequences[start:end, left : p + width]
        return Rollout(
            sequences=seq,
            attention_mask=self.attention_mask[start:end, left : p + width],
            prompt_length=p - left,
            completion_ids=self.completion_ids[start:end, :width],
            completion_mask=cmask[:, :width],
            truncated=self.truncated[start:end],
            texts=self.texts[start:end],
            group_size=self.group_size,
            sampling_logprobs=None if self.sampling_logprobs is None else self.sampling_logprobs[start:end, :width],
        )


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of several (prompt-major rows in order): prompts re-padded on the left, completions on the right."""
    if len(parts) == 1:
        return parts[0]
    p = max(r.prompt_length for r in parts)
    c = max(r.completion_ids.size(1) for r in parts)

    def pad(t: torch.Tensor, left: int, right: int, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    seqs, masks, comps, cmasks = [], [], [], []
    for r in parts:
        left, right = p - r.prompt_length, c - r.completion_ids.size(1)
        seqs.append(pad(r.sequences, left, right, pad_id))
        masks.append(pad(r.attention_mask, left, right, 0))
        comps.append(pad(r.completion_ids, 0, right, pad_id))
        cmasks.append(pad(r.completion_mask, 0, right, 0))
    return Rollout(
        sequences=torch.cat(seqs),
        attention_mask=torch.cat(masks),
        prompt_length=p,
        completion_ids=torch.cat(comps),
        completion_mask=torch.cat(cmasks),
        truncated=torch.cat([r.truncated for r in parts]),
        texts=[t for r in parts for t in r.texts],
        group_size=parts[0].group_size,
        sampling_logprobs=None if any(r.sampling_logprobs is None for r in parts) else torch.cat(
            [pad(r.sampling_logprobs, 0, c - r.completion_ids.size(1), 0) for r in parts]),  # fmt: skip
    )


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[B, P]`` ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def completion_mask_from(completions: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first EOS of each row; rows without EOS are truncated."""
    is_eos = completions == eos_id  # [N, C]
    has_eos = is_eos.any(dim=1)  # [N]
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, completions.size(1), dtype=torch.long)
    )
    positions = torch.arange(completions.size(1), device=completions.device)[None, :]  # [1, C]
    return (positions <= first[:, None]).long(), ~has_eos


def _has_sliding_layers(model: nn.Module) -> bool:
    return any(kind != "full_attention" for kind in getattr(model.config, "layer_types", None) or [])


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
                   share_prompt: bool = True) -> Rollout:  # fmt: skip
    """One batched ``generate`` call: every prompt repeated ``group_size`` times, sampled with KV cache.

    The model is put in eval mode for sampling (no dropout) and restored afterwards. ``temperature`` 0 is
    greedy decoding. ``min_new_tokens`` suppresses EOS until that many tokens exist (benchmarks fix the
    generated length this way). With ``share_prompt`` (and ``group_size > 1``, full-attention models) each
    prompt is prefilled once, not ``group_size`` times (:func:`_shared_prompt_cache`); the samples are those
    of the repeated prefill (the same tokens for the same seed, tested). Over sharded weights (FSDP2) every
    rank keeps decoding until all ranks are done (``synced_gpus``): a layer's forward is a collective, and a
    rank that stopped early would hang the rest.
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
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {
            "do_sample": False}
        if share_prompt and group_size > 1 and ids.size(1) > 1 and not _has_sliding_layers(model):
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
    cmask, truncated = completion_mask_from(completions, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(completions * cmask + tokenizer.pad_token_id * (1 - cmask), skip_special_tokens=True)
    return Rollout(
        sequences=torch.cat([ids, completions], dim=1),
        attention_mask=torch.cat([mask, cmask], dim=1),
        prompt_length=ids.size(1),
        completion_ids=completions,
        completion_mask=cmask,
        truncated=truncated,
        texts=texts,
        group_size=group_size,
    )


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
    sliding = _has_sliding_layers(decoder)
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
