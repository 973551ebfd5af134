"""The rollout: ``G`` completions of each of ``B`` prompts, as every engine returns them.

:class:`Rollout` is the one type that crosses the generation seam: engines build it with
:meth:`Rollout.from_completions`; GRPO cuts it into micro-batches (:meth:`Rollout.select`) and joins generation
chunks (:func:`concat_rollouts`); the trainer's log-prob forward (:mod:`qgen.logprobs`) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    # [N, C] the hf engine's log-prob of each token as it sampled it (the full tempered distribution, from its
    # KV-cached forward): the policy/engine audit compares it with the trainer's recomputation (qgen.audit)
    recorded_logprobs: torch.Tensor | None = None

    @classmethod
    def from_completions(cls, prompts: list[list[int]], completions: torch.Tensor | list[list[int]], group_size: int,
                         tokenizer, sampling_logprobs: list[list[float]] | None = None,
                         device: torch.device | str | None = None,
                         recorded_logprobs: torch.Tensor | None = None) -> Rollout:  # fmt: skip
        """The rollout of an engine's completions: the one constructor every engine (and test helper) uses.

        ``completions``: ``[N, C]`` token ids as ``generate`` returns them (each row masked up to and including
        its first EOS; a row without one is truncated), or one list of token ids per row, each ending at its EOS
        or truncated (rows of different lengths, padded here). ``sampling_logprobs``: one list per row, the
        engine's log-prob of each token it sampled. Rows are prompt-major: ``group_size`` per prompt.
        """
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        sampled = None
        if torch.is_tensor(completions):
            device = device if device is not None else completions.device
            completions = completions.to(device)
            cmask, truncated = completion_mask_from(completions, eos)
        else:
            rows = [[int(t) for t in row] for row in completions]
            width = max(1, max((len(r) for r in rows), default=0))
            completions = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
            lengths = torch.tensor([len(r) for r in rows], device=completions.device)
            cmask = (torch.arange(width, device=completions.device)[None, :] < lengths[:, None]).long()
            truncated = torch.tensor([not r or r[-1] != eos for r in rows], device=completions.device)
            if sampling_logprobs is not None:
                sampled = torch.tensor([list(map(float, lp)) + [0.0] * (width - len(lp)) for lp in sampling_logprobs],
                                       dtype=torch.float32, device=completions.device)  # fmt: skip
        ids, mask = left_pad(prompts, pad)
        ids = ids.to(completions.device).repeat_interleave(group_size, 0)
        mask = mask.to(completions.device).repeat_interleave(group_size, 0)
        texts = tokenizer.batch_decode(completions * cmask + pad * (1 - cmask), skip_special_tokens=True)
        return cls(
            sequences=torch.cat([ids, completions], dim=1),
            attention_mask=torch.cat([mask, cmask], dim=1),
            prompt_length=ids.size(1),
            completion_ids=completions,
            completion_mask=cmask,
            truncated=truncated,
            texts=texts,
            group_size=group_size,
            sampling_logprobs=sampled,
            recorded_logprobs=None if recorded_logprobs is None else
            recorded_logprobs[:, : completions.size(1)].to(completions.device).float() * cmask,  # fmt: skip
        )

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
            recorded_logprobs=None if self.recorded_logprobs is None else self.recorded_logprobs[start:end, :width],
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
        recorded_logprobs=None if any(r.recorded_logprobs is None for r in parts) else torch.cat(
            [pad(r.recorded_logprobs, 0, c - r.completion_ids.size(1), 0) for r in parts]),  # fmt: skip
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
