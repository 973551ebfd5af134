"""How qgen runs past one process: Lightning's strategies, configured and checked, nothing re-implemented.

- :mod:`qgen.strategies.checks`: start-up validation of a strategy against the run (one clear line each,
  before any model is loaded);
- :mod:`qgen.strategies.fsdp2`: FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``, as
  pure data parallelism with single-file, trainable-only checkpoints (:class:`FSDP2Strategy`);
- :func:`shard_stage_models`: what a stage module calls in ``configure_model`` so that the strategy shards it;
- :func:`sharded_parameters`: whether a model's weights are split across ranks (generation must then keep
  every rank in step: ``synced_gpus``).

The overlays in ``configs/strategy/`` select them; README "Scaling out" says which to use when.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qgen.strategies.checks import StrategyError, check_strategy, strategy_kind
from qgen.strategies.fsdp2 import FSDP2Strategy, shard_model


def sharded_parameters(model: nn.Module) -> bool:
    """True when some of ``model``'s weights are shards (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def shard_stage_models(strategy: Any, *models: nn.Module | None) -> None:
    """Shard a stage's models (policy, teacher) in place where the trainer's strategy asks for it; under any
    other strategy (single device, DDP) nothing happens.
    """
    if isinstance(strategy, FSDP2Strategy):
        for model in models:
            if model is not None:
                strategy.shard(model)


__all__ = ["FSDP2Strategy", "StrategyError", "check_strategy", "shard_model", "shard_stage_models",
           "sharded_parameters", "strategy_kind"]  # fmt: skip
