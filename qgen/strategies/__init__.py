"""How qgen runs past one process: Lightning's strategies, configured and checked, nothing re-implemented.

- :mod:`qgen.strategies.checks`: start-up validation of a strategy against the run (one clear line each,
  before any model is loaded);
- :mod:`qgen.strategies.fsdp2`: FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``, as
  pure data parallelism with single-file, trainable-only checkpoints (:class:`FSDP2Strategy`);
- :mod:`qgen.strategies.fsdp1`: FSDP1 (``FullyShardedDataParallel``) through Lightning's ``FSDPStrategy``,
  the engine for sharded QLoRA (4-bit weights stored in bf16), with the same checkpoints
  (:class:`FSDP1Strategy`);
- :func:`shard_stage_models`: what a stage module calls in ``configure_model`` so that the strategy shards it;
- :func:`sharded_parameters` / :func:`shards_weights`: whether a model's weights / a strategy split weights
  across ranks (generation must then keep every rank in step: ``synced_gpus``, equal prediction shares).

The overlays in ``configs/strategy/`` select them; README "Scaling out" says which to use when.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qgen.strategies.checks import StrategyError, check_strategy, strategy_kind
from qgen.strategies.fsdp1 import FSDP1Strategy
from qgen.strategies.fsdp2 import FSDP2Strategy, shard_model


def sharded_parameters(model: nn.Module) -> bool:
    """True when some of ``model``'s weights are shards (FSDP2 DTensors, FSDP1 units, DeepSpeed ZeRO-3
    partitions).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


def shards_weights(strategy: Any) -> bool:
    """Whether ``strategy`` splits the models' weights across ranks (qgen's FSDP1 and FSDP2): every rank must
    then take part in every forward pass, so generation runs in step on all ranks.
    """
    return isinstance(strategy, (FSDP1Strategy, FSDP2Strategy))


def shard_stage_models(strategy: Any, *models: nn.Module | None) -> None:
    """Shard a stage's models (policy, teacher) in place where the trainer's strategy asks for it; under any
    other strategy (single device, DDP) nothing happens.
    """
    if shards_weights(strategy):
        for model in models:
            if model is not None:
                strategy.shard(model)


__all__ = ["FSDP1Strategy", "FSDP2Strategy", "StrategyError", "check_strategy", "shard_model", "shard_stage_models",
           "sharded_parameters", "shards_weights", "strategy_kind"]  # fmt: skip
