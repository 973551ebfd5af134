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
    151,936-token vocabulary), and prompt tokens cost no output-layer FLOPs at all.

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
        total = total + (checkpoint(_chunk_nll_sum, *part, use_reentrant=False) if h.requires_grad else _chunk_nll_sum(*part))
    count = torch.tensor(float(y.numel()), device=hidden.device)  # []
    denom = count.clamp(min=1.0) if normalizer is None else torch.as_tensor(normalizer, device=hidden.device)
    return NLLOutput(total / denom, total.detach(), count)


def reference_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain full-logits mean token NLL (the textbook definition), for tests and benchmarks."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
