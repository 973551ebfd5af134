"""Losses as pure tensor functions. Each returns a NamedTuple: the loss plus detached statistics.

Shapes: ``B`` batch, ``T`` sequence length, ``H`` hidden size, ``V`` vocabulary, ``N`` selected tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class NLLOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable: nll_sum / normalizer
    nll_sum: torch.Tensor  # scalar, detached: summed token NLL
    tokens: torch.Tensor  # scalar, detached: number of target tokens


def _chunk_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # [n, V]
    return F.cross_entropy(logits, targets, reduction="sum")  # []


def token_nll(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
    chunk_size: int = 1024,
) -> NLLOutput:
    """Causal-LM cross-entropy on the labelled tokens only, computed from hidden states in chunks.

    Position ``t`` predicts ``labels[t + 1]``. Only positions whose next label is not ``IGNORE_INDEX`` go
    through the output layer, ``chunk_size`` tokens at a time under activation checkpointing, so the
    ``[B, T, V]`` logits tensor is never built (it is 2.5 GB in fp32 for 2 x 2048 tokens at Qwen's
    151,936-token vocabulary), and prompt tokens cost no output-layer FLOPs at all. The last chunk is not
    checkpointed: its recompute would be the first thing backward does, while every activation is still
    alive, so keeping its logits adds nothing to the peak (when this loss is the last computation of the
    forward, as in every qgen stage) and saves an output-layer pass (the only one with a single chunk).

    Args:
        hidden: ``[B, T, H]`` final hidden states.
        lm_head_weight: ``[V, H]`` output embedding.
        labels: ``[B, T]`` token ids, ``IGNORE_INDEX`` where no loss is taken.
        normalizer: divide the summed NLL by this (e.g. the optimizer step's token count); default: the
            number of target tokens here (a token mean). A batch with no target token gives loss 0.
        chunk_size: tokens per output-layer chunk.
    """
    targets = labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE_INDEX  # [B, T-1]
    h = hidden[:, :-1][keep]  # [N, H]
    y = targets[keep]  # [N]
    total = hidden[:, :0].sum().float()  # [] zero, but part of the graph: all-masked batches backprop zeros
    for start in range(0, y.numel(), chunk_size):
        part = (h[start : start + chunk_size], lm_head_weight, y[start : start + chunk_size])
        recompute = h.requires_grad and start + chunk_size < y.numel()  # not the last chunk
        total = total + (checkpoint(_chunk_nll_sum, *part, use_reentrant=False) if recompute else _chunk_nll_sum(*part))
    count = torch.tensor(float(y.numel()), device=hidden.device)  # []
    denom = count.clamp(min=1.0) if normalizer is None else torch.as_tensor(normalizer, device=hidden.device)
    return NLLOutput(total / denom, total.detach(), count)


def reference_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain full-logits mean token NLL (the textbook definition), for tests and benchmarks."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


# ------------------------------------------------------------------------------------------------- GRPO


LOGIT_BLOCK_BYTES = 64 * 2**20  # the most memory one [rows, V] fp32 block of logits may take


def _block_rows(chunk_size: int, vocab: int) -> int:
    return max(1, min(chunk_size, LOGIT_BLOCK_BYTES // (4 * vocab)))


class _ChunkedLogprob(torch.autograd.Function):
    """``log softmax(h W^T / T)[target]`` for ``N`` rows, one ``[rows, V]`` fp32 block of logits alive at a time.

    Forward keeps only each row's log-partition (``[N]``); backward recomputes a block's logits and turns
    them *in place* into the gradient of the block (``(onehot - softmax) * grad / T``), then takes the
    gradients of the hidden states and, when it needs one, of the output embedding from it. Peak extra
    memory is one block, in forward and backward alike, against two or three (logits, softmax, gradient)
    for a checkpointed autograd chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, rows: int):  # [N, H], [V, H], [N]
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        log_z = torch.empty_like(out)
        for start in range(0, hidden.size(0), rows):
            logits = (hidden[start : start + rows] @ weight.T).float()  # [n, V]
            if temperature != 1.0:
                logits.div_(temperature)
            out[start : start + rows] = logits.gather(-1, targets[start : start + rows, None]).squeeze(-1)
            top = logits.amax(dim=-1, keepdim=True)  # [n, 1]; logsumexp in place (no second block)
            log_z[start : start + rows] = top.squeeze(-1) + logits.sub_(top).exp_().sum(dim=-1).log()
            del logits
        out.sub_(log_z)
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.temperature, ctx.rows = temperature, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):  # [N]
        hidden, weight, targets, log_z = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        scale = grad_out.float() / ctx.temperature  # [N]
        for start in range(0, hidden.size(0), ctx.rows):
            end = min(start + ctx.rows, hidden.size(0))
            h = hidden[start:end]
            block = (h @ weight.T).float()  # [n, V] logits, then in place: the gradient w.r.t. them
            if ctx.temperature != 1.0:
                block.div_(ctx.temperature)
            block.sub_(log_z[start:end, None]).exp_().mul_(-scale[start:end, None])  # -softmax * grad / T
            block.scatter_add_(-1, targets[start:end, None], scale[start:end, None])  # + onehot * grad / T
            if need_h:
                grad_h[start:end] = (block.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(block.T, h.float())
            del block
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int = 1024, temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """``log p_T(targets[b, t] | hidden[b, t])`` for every position, ``[B, T]``, under ``softmax(logits / T)``.

    ``temperature`` must be the one the tokens were sampled at: the policy that GRPO's ratio, gradient and
    KL are about is the tempered distribution that produced the samples (as in TRL). The logits are built
    ``chunk_size`` rows at a time, fewer when a block would pass ``LOGIT_BLOCK_BYTES`` (64 MB: 110 rows at
    Qwen's 151,936-token vocabulary), and never kept: peak extra memory is one ``[rows, V]`` block in forward
    and in backward (:class:`_ChunkedLogprob`), not the ``[B, T, V]`` log-softmax.
    """
    b, t, h = hidden.shape
    flat_h, flat_y = hidden.reshape(b * t, h), targets.reshape(b * t)  # [B*T, H], [B*T]
    rows = _block_rows(chunk_size, lm_head_weight.size(0))
    return _ChunkedLogprob.apply(flat_h, lm_head_weight, flat_y, float(temperature), rows).view(b, t)  # [B, T]


def gathered_std(values: torch.Tensor) -> torch.Tensor:
    """Unbiased std of ``values`` over every rank (``values`` as they are outside ``torch.distributed``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values.std()
    flat = values.detach().reshape(-1).double()
    stats = torch.stack([flat.new_tensor(float(flat.numel())), flat.sum(), (flat * flat).sum()])
    dist.all_reduce(stats)
    n, total, squares = stats.unbind()
    var = (squares - total * total / n) / (n - 1).clamp(min=1)
    return var.clamp(min=0).sqrt().to(values.dtype)


def group_advantages(rewards: torch.Tensor, mode: str = "group_std", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages, ``rewards`` ``[B, G]`` (G completions of each of B prompts) -> ``[B, G]``.

    ``group_std`` (GRPO, DeepSeekMath eq. 3; TRL's default): ``(r - mean_g) / (std_g + eps)``, unbiased std.
    ``no_std`` (Dr. GRPO): ``r - mean_g``. ``median``: ``r - median_g`` (the seed recipe's baseline), the
    true median: the mean of the two middle values when ``G`` is even, so ``[0, 0, 1, 1]`` gives
    ``-0.5, -0.5, 0.5, 0.5``. ``batch_std``: ``(r - mean_g) / (std + eps)`` with the std over every reward
    given, gathered over all ranks under ``torch.distributed`` (TRL's ``scale_rewards="batch"``): pass the
    whole optimizer step's rewards. A group whose rewards are all equal gets advantage 0 in every mode.
    """
    if mode == "median":
        centre = rewards.quantile(0.5, dim=1, keepdim=True)  # [B, 1], linear interpolation: the true median
    else:
        centre = rewards.mean(dim=1, keepdim=True)  # [B, 1]
    adv = rewards - centre  # [B, G]
    if mode == "group_std":
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)  # [B, G]
    elif mode == "batch_std":
        adv = adv / (gathered_std(rewards) + eps)  # [B, G]
    elif mode not in ("no_std", "median"):
        raise ValueError(f"unknown advantage mode '{mode}'; modes: group_std, no_std, median, batch_std")
    return torch.nan_to_num(adv)


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    kl: torch.Tensor  # scalar, detached: mean k3 KL per completion token
    clipfrac: torch.Tensor  # scalar, detached: share of tokens where the clipped term is the active one
    ratio_mean: torch.Tensor  # scalar, detached


def truncated_importance_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                                 cap: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Per-token truncated importance weights ``min(exp(trainer_logp - engine_logp), cap)`` (TIS; TRL's
    ``vllm_importance_sampling_correction``), 0 outside ``mask``, and their statistics over the masked tokens:
    ``engine_logprob_absdiff_mean`` / ``_max`` (``|trainer - engine|``), ``is_ratio_mean`` (before the cap) and
    ``is_clipped_frac`` (tokens whose ratio the cap cut).

    Args:
        trainer_logp: ``[N, C]`` the trainer's log-probs of the sampled tokens (no gradient flows through).
        engine_logp: ``[N, C]`` the sampling engine's log-probs of the same tokens.
        mask: ``[N, C]`` completion tokens.
        cap: ``C`` (>= 1).
    """
    mask = mask.bool()
    delta = (trainer_logp.detach() - engine_logp).masked_fill(~mask, 0.0)  # [N, C]
    ratio = torch.exp(delta)  # [N, C]
    weights = ratio.clamp(max=cap).masked_fill(~mask, 0.0)  # [N, C]
    count = mask.sum().clamp(min=1)
    absdiff = delta.abs()
    stats = {
        "engine_logprob_absdiff_mean": absdiff.sum() / count,
        "engine_logprob_absdiff_max": absdiff.max() if bool(mask.any()) else absdiff.new_zeros(()),
        "is_ratio_mean": ratio.masked_fill(~mask, 0.0).sum() / count,
        "is_clipped_frac": ((ratio > cap) & mask).sum() / count,
    }
    return weights, stats


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
    token_normalizer: torch.Tensor | float | None = None,
    is_weights: torch.Tensor | None = None,
) -> GRPOLossOutput:
    """Clipped-ratio policy loss with a k3 KL penalty to the reference (DeepSeekMath GRPO, eq. 3-4).

    Per token: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * KL3`` with ``r = exp(logp - old_logp)``
    and ``KL3 = exp(ref - logp) - (ref - logp) - 1`` (Schulman's unbiased, non-negative estimator).
    Aggregation: ``grpo`` = mean over each sequence's tokens, then over sequences (the paper);
    ``dapo`` = sum over all tokens / number of tokens (DAPO's token-level mean); ``dr_grpo`` = sum over
    all tokens / (sequences x ``max_completion_length``) (Dr. GRPO's constant normaliser). Every token
    masked -> loss 0, no NaN.

    Args:
        logp: ``[N, C]`` current per-token log-probs (differentiable).
        old_logp: ``[N, C]`` log-probs of the sampling policy (``logp.detach()`` with one update per rollout).
        advantages: ``[N]`` per-completion advantages.
        mask: ``[N, C]`` 1 for completion tokens (up to and including EOS).
        ref_logp: ``[N, C]`` reference log-probs; needed when ``beta > 0``.
        beta: weight of the KL penalty (0: no reference needed).
        epsilon_low: lower clip range of the ratio.
        epsilon_high: upper clip range of the ratio (DAPO's clip-higher when above ``epsilon_low``).
        aggregation: ``grpo``, ``dapo`` or ``dr_grpo`` (see above).
        max_completion_length: the constant normaliser of ``dr_grpo`` (default: ``C``).
        token_normalizer: the divisor of ``dapo`` in place of this call's token count. DAPO's token mean is
            over the whole optimizer step (every accumulated micro-batch, every rank): pass that step's
            completion-token count / (micro-batches x ranks), and the trainer's division by the accumulation
            count and DDP's mean over ranks turn the micro-batch losses into the step's exact token mean.
        is_weights: ``[N, C]`` importance weights of the policy-gradient term (not of the KL term), constants:
            where another engine sampled the tokens, ``min(pi_trainer / pi_engine, C)``
            (:func:`truncated_importance_weights`).
    """
    mask = mask.to(logp.dtype)  # [N, C]
    adv = advantages[:, None]  # [N, 1]
    ratio = torch.exp(logp - old_logp)  # [N, C]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [N, C]
    per_token = -torch.min(ratio * adv, clipped * adv)  # [N, C]
    if is_weights is not None:
        per_token = per_token * is_weights.detach()  # [N, C]
    kl = torch.zeros_like(logp)  # [N, C]
    if beta > 0:
        assert ref_logp is not None, "beta > 0 needs ref_logp"
        delta = ref_logp - logp  # [N, C]
        kl = torch.exp(delta) - delta - 1  # [N, C]
        per_token = per_token + beta * kl  # [N, C]
    tokens = mask.sum()  # []
    if aggregation == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()  # []
    elif aggregation == "dapo":
        denom = tokens.clamp(min=1) if token_normalizer is None else torch.as_tensor(token_normalizer).to(logp)
        loss = (per_token * mask).sum() / denom  # []
    elif aggregation == "dr_grpo":
        loss = (per_token * mask).sum() / (logp.size(0) * (max_completion_length or logp.size(1)))  # []
    else:
        raise ValueError(f"unknown aggregation '{aggregation}'; choose grpo, dapo or dr_grpo")
    is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))  # [N, C]
    denom = tokens.clamp(min=1)
    return GRPOLossOutput(
        loss,
        ((kl * mask).sum() / denom).detach(),
        ((is_clipped.to(mask.dtype) * mask).sum() / denom).detach(),
        ((ratio * mask).sum() / denom).detach(),
    )


# --------------------------------------------------------------------------------------------- distillation


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Per-token generalised Jensen-Shannon divergence, ``[..., V]`` logits -> ``[...]`` (GKD, Agarwal et al. 2024).

    With ``p = softmax(teacher / T)``, ``q = softmax(student / T)`` and the mixture ``m = beta p + (1 - beta) q``:

    - ``beta = 0``: forward KL, ``KL(p || q)`` (mode covering; the classic distillation loss);
    - ``beta = 1``: reverse KL, ``KL(q || p)`` (mode seeking);
    - otherwise ``beta KL(p || m) + (1 - beta) KL(q || m)``, which tends to ``beta KL(p || q)`` as beta -> 0
      and to ``(1 - beta) KL(q || p)`` as beta -> 1.

    The temperature divides both sides' logits. Computed in float32.
    """
    if not 0.0 <= beta <= 1.0 or temperature <= 0:
        raise ValueError(f"need 0 <= beta <= 1 and temperature > 0, got beta={beta}, temperature={temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)

    def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:  # KL(a || b), summed over the vocabulary
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(beta)),
                                         log_q + torch.log(torch.tensor(1.0 - beta))]), dim=0)  # fmt: skip
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


class DistillLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable: weighted mean divergence per target token
    divergence_sum: torch.Tensor  # scalar, detached: unweighted summed divergence
    tokens: torch.Tensor  # scalar, detached: number of target tokens


def _chunk_jsd(student_h: torch.Tensor, student_w: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
               temperature: float) -> torch.Tensor:  # fmt: skip
    return generalized_jsd(student_h @ student_w.T, teacher_logits, beta, temperature)  # [n]


def distill_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    normalizer: torch.Tensor | float | None = None,
) -> DistillLossOutput:
    """Token-level distillation on the masked positions, from both models' hidden states, in chunks.

    Args:
        student_hidden: ``[B, T, H]`` student hidden states at the positions that predict the targets.
        student_head: ``[V, H]`` student output embedding.
        teacher_hidden: ``[B, T, H']`` teacher hidden states at the same positions (no gradient).
        teacher_head: ``[V', H']`` teacher output embedding, ``V' >= V``: a larger teacher vocabulary
            (padded embedding rows, e.g. 152,064 vs 151,936) is sliced to the student's first ``V`` rows.
        mask: ``[B, T]`` 1 where a target token is.
        weights: ``[B]`` per-sequence weights (teacher-cluster scores; 0 drops a sequence), default 1.
        beta: see :func:`generalized_jsd`.
        temperature: see :func:`generalized_jsd`.
        chunk_size: tokens per chunk. Neither model's ``[B, T, V]`` logits are ever built: each chunk's
            teacher logits are made on the fly and the student's chunk is checkpointed, so one
            ``[chunk, V]`` block of each is alive at a time (2.5 GB per side saved at 2 x 2048 tokens).

    The loss is ``sum_t w_b D_t / normalizer``; the default normaliser is the number of target tokens, which
    does not depend on the weights, so a sequence judged 0.05 contributes 5% of what the same sequence judged
    1.0 does, whatever else is in the micro-batch (dividing by the sum of the weights instead would cancel
    them out for a lone sequence). Every weight 0 gives loss 0.

    Args (continued):
        normalizer: divide by this instead of the target-token count (e.g. the step's token count).
    """
    v = student_head.size(0)
    if teacher_head.size(0) < v:
        raise ValueError(f"teacher vocabulary ({teacher_head.size(0)}) is smaller than the student's ({v})")
    keep = mask.bool()  # [B, T]
    h, th = student_hidden[keep], teacher_hidden[keep]  # [N, H], [N, H']
    head_t = teacher_head[:v]  # [V, H']
    w = (weights if weights is not None else mask.new_ones(mask.size(0), dtype=torch.float32)).float()
    w = w.to(h.device)[:, None].expand_as(keep)[keep]  # [N]
    total = student_hidden[:, :0].sum().float()  # [] zero, in the graph
    raw = total.detach().clone()
    for start in range(0, h.size(0), chunk_size):
        with torch.no_grad():
            t_logits = th[start : start + chunk_size] @ head_t.T  # [n, V]
        part = (h[start : start + chunk_size], student_head, t_logits.to(h.device), beta, temperature)
        d = checkpoint(_chunk_jsd, *part, use_reentrant=False) if h.requires_grad else _chunk_jsd(*part)  # [n]
        total = total + (d * w[start : start + chunk_size]).sum()
        raw = raw + d.detach().sum()
    count = torch.tensor(float(h.size(0)), device=h.device)
    denom = count.clamp(min=1.0) if normalizer is None else torch.as_tensor(normalizer, device=h.device)
    return DistillLossOutput(total / denom, raw, count)
