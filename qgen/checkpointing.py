"""What every stage's checkpoint holds beyond Lightning's defaults, and what it leaves out.

- Only trainable weights: under LoRA / QLoRA the adapter, never the frozen or quantized base (nor a
  teacher or reference model), so a 14B checkpoint is megabytes.
- RNG states, as plain values (lists and tensors) so checkpoints load with ``torch.load(weights_only=True)``.
  Lightning does not save them; without them a resumed run draws different dropout masks and samples
  than the uninterrupted run would have.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn


def get_rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(state), gauss_next],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def slim_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint`` of every stage: keep the trainable weights only, add the RNG states."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
    checkpoint["rng_states"] = get_rng_states()


def restore_rng(checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint`` of every stage."""
    if "rng_states" in checkpoint:
        set_rng_states(checkpoint["rng_states"])
