"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for qgen's LoRA stages, through Lightning's
``ModelParallelStrategy``.

What qgen configures (and nothing more; the sharding, collectives and optimizer-state handling are torch's
and Lightning's):

- **pure data parallelism**: ``ModelParallelStrategy`` defaults to tensor parallelism over a node's GPUs;
  :class:`FSDP2Strategy` sets the data-parallel size to the world size and tensor parallelism to 1;
- **units** (:func:`shard_model`): every decoder layer is one ``fully_shard`` unit (its frozen base weights
  and LoRA weights together; FSDP2 shards per parameter, so mixed ``requires_grad`` is fine), the decoder
  (embeddings, final norm) is the root unit. The output layer stays outside FSDP, replicated and frozen: qgen's
  losses multiply hidden states by the output weights in chunks, outside any module's ``forward``, where an
  FSDP-sharded weight would be a shard. A trainable output layer is refused (its gradient would not be
  synchronised). For a tied embedding the embedding weight is therefore kept replicated too;
- **checkpoints**: one file written by rank 0 through the run's checkpoint I/O (atomic, read back with
  ``weights_only``), holding the full (gathered) trainable weights and optimizer state only: it resumes
  exactly at the same world size, loads at any other, and ``export`` / ``predict`` read it in one process
  (the data position of a resume at another world size is not exact: the sampler's shards differ).
  Lightning's distributed-checkpoint folders are not used: their metadata is a pickle.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's frozen floating-point weights (its base), else of any weight."""
    floating = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [p for p in floating if not p.requires_grad]
    return (frozen or floating)[0].dtype


def decoder_parts(model: nn.Module, engine: str) -> tuple[nn.Module, nn.ModuleList, list[nn.Parameter]]:
    """The decoder, its layers and the decoder weights tied to the output layer (kept replicated), of a model
    to shard with ``engine``; :class:`StrategyError` for a model without decoder layers or with a trainable
    output layer.
    """
    from qgen.strategies.checks import StrategyError

    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise StrategyError(f"{engine}: {type(decoder).__name__} has no decoder layers to shard (get_decoder().layers)")
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    trainable_head = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in head_params]
    if trainable_head:
        raise StrategyError(f"{engine}: the output layer is trainable ({trainable_head[0]}); qgen's sharded path "
                            "trains LoRA adapters on a frozen base (model.lora; not on lm_head)")  # fmt: skip
    return decoder, layers, [p for p in decoder.parameters() if id(p) in head_params]


def shard_model(model: nn.Module, mesh: Any, param_dtype: Literal["auto", "bfloat16", "float32"] = "auto") -> nn.Module:
    """Shard a (PEFT) causal LM in place with FSDP2: one unit per decoder layer, the decoder as root; the
    output layer (and a tied embedding) replicated. Raises :class:`StrategyError` for a model whose trainable
    weights would not all be sharded.

    ``param_dtype``: the dtype layers compute in (``auto``: the base weights' dtype; LoRA weights kept in
    float32 by peft are cast to it for compute); gradients are reduced in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from qgen.strategies.checks import StrategyError

    decoder, layers, tied = decoder_parts(model, "FSDP2")
    dtype = compute_dtype(model) if param_dtype == "auto" else getattr(torch, param_dtype)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # the root too frees its gathered weights after forward: a frozen teacher runs no backward that would
    fully_shard(decoder, mesh=mesh, mp_policy=policy, ignored_params=set(tied) or None, reshard_after_forward=True)
    stray = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if stray:
        raise StrategyError(f"FSDP2: trainable weights outside the decoder's layers would not be synchronised "
                            f"across ranks: {', '.join(stray[:3])}")  # fmt: skip
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 data parallelism for qgen's stages (experimental in
    Lightning). The stage modules shard themselves in ``configure_model`` (:func:`shard_model`); checkpoints
    are single files of the trainable weights (see the module docstring).

    Args:
        param_dtype: the dtype the sharded layers compute in; ``auto`` = the base weights' dtype.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU (Lightning's choice when unset).
        timeout_s: collective timeout in seconds (Lightning's default when unset).
    """

    def __init__(
        self,
        param_dtype: Literal["auto", "bfloat16", "float32"] = "auto",
        process_group_backend: str | None = None,
        timeout_s: float | None = None,
    ):
        from datetime import timedelta

        from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

        timeout = default_pg_timeout if timeout_s is None else timedelta(seconds=timeout_s)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timeout)  # fmt: skip
        self.param_dtype = param_dtype

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank is a data-parallel replica
        self._tensor_parallel_size = 1
        super().setup_environment()

    @property
    def loads_on_rank0(self) -> bool:
        """Rank 0 alone loads the weights and sends them to the others (always, past one rank)."""
        return self.world_size > 1

    @property
    def builds_empty(self) -> bool:
        """Ranks > 0 build their models on the meta device (no weight read); :meth:`shard` fills them from
        rank 0, so a node's host memory holds one full copy of the weights, not one per rank.
        """
        return self.global_rank > 0

    def shard(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` (:func:`shard_model`), then give every rank rank 0's weights: its full state dict
        is broadcast tensor by tensor into the shards (meta tensors of ranks > 0 are replaced), and the
        buffers that state dicts leave out (rotary frequencies) are broadcast as they are.
        """
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from qgen.fourbit import wire_device

        full = dict(model.state_dict()) if self.global_rank == 0 else {}
        shard_model(model, self.device_mesh["data_parallel"], self.param_dtype)
        if self.world_size > 1:
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=True))  # fmt: skip
            del full
            device = wire_device()  # cuda under NCCL, cpu under gloo
            for module in model.modules():
                for name, buffer in list(module._buffers.items()):
                    if buffer is None:
                        continue
                    value = buffer.to(device) if self.global_rank == 0 else torch.empty_like(buffer, device=device)
                    dist.broadcast(value, src=0)
                    module._buffers[name] = value.to(buffer.device if buffer.device.type != "meta" else device)
        return model

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full trainable weights (gathered one tensor at a time), on rank 0; frozen weights never leave
        their shards.
        """
        from torch.distributed.tensor import DTensor

        state = {}
        for name, param in self.lightning_module.named_parameters():
            if not param.requires_grad:
                continue
            full = param.full_tensor() if isinstance(param, DTensor) else param  # a collective: every rank
            if self.global_rank == 0:
                state[name] = full.detach().to("cpu", copy=True)
        return state

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from qgen.checkpointing import load_checkpoint_file

        path = self.broadcast(os.fspath(checkpoint_path))
        load_checkpoint_file(path, mmap=True)  # one clear error for a folder, a missing, truncated or unsafe file
        return super().load_checkpoint(path, weights_only=True)
