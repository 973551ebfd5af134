"""FSDP1 (torch's ``FullyShardedDataParallel``) for qgen's LoRA / QLoRA stages, through Lightning's
``FSDPStrategy``: the engine that bitsandbytes' 4-bit weights can be sharded with (FSDP2 cannot shard packed
NF4 yet).

What qgen configures (the sharding, collectives and optimizer-state handling are torch's and Lightning's):

- **units** (:func:`wrap_model`): FSDP1 flattens each unit's weights into one ``FlatParameter``, which must
  have one dtype and (for the optimizer's sake) one ``requires_grad``. Every module that holds trainable
  weights of its own (peft's ``lora_A`` / ``lora_B`` layers) is therefore its own unit, every decoder layer
  (its frozen base weights) is one unit, the decoder (embeddings, final norm) the root. Frozen floating-point
  weights inside a layer are cast to the layer's compute dtype so that the unit is uniform (peft's k-bit
  preparation keeps norms in float32). The output layer stays outside FSDP, replicated and frozen, as under
  FSDP2: qgen's losses multiply hidden states by its weight in chunks, outside any ``forward``;
- **QLoRA**: the 4-bit weights are stored in the compute dtype (``bnb_4bit_quant_storage`` = FSDP's
  ``param_dtype``, :attr:`FSDP1Strategy.quant_storage`), without which FSDP refuses the integer storage;
- **gradient clipping** by norm over the shards (Lightning's FSDP precision plugin refuses it): the squared
  norm of each rank's gradient shards, summed over ranks;
- **checkpoints**: one file written by rank 0 through the run's checkpoint I/O (atomic, read back with
  ``weights_only``), holding the full trainable weights (gathered one unit at a time: a LoRA unit is a few
  hundred kilobytes) and their full optimizer state (torch's ``get_optimizer_state_dict``). It resumes at any
  world size and loads in one process (``export``, ``predict``). Lightning's sharded folders are not used:
  their metadata is a pickle.

One host copy per node (``one_host_copy``, the default): rank 0 loads the model (a QLoRA base quantized
straight onto its GPU) and the other ranks build theirs on the meta device; rank 0 sends its 4-bit layout
(:func:`qgen.fourbit.share_layout`), the replicated weights, and each unit's weights as FSDP builds it
(``sync_module_states``), so a rank > 0 holds its shards, never the model.

Torch's FSDP1 also runs on CPU with gloo (Lightning's own ``FSDPStrategy`` refuses a CPU accelerator; this
subclass does not), which is how the tests exercise this path: float32 LoRA, and the QLoRA overlay itself on
bitsandbytes' CPU kernels.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from qgen.checkpointing import clean_name


def _own_trainable(unit: nn.Module) -> bool:
    return any(p.requires_grad for p in unit.parameters(recurse=False))


def wrap_model(model: nn.Module, param_dtype: Literal["auto", "bfloat16", "float32"] = "auto",
               device_id: torch.device | None = None, cpu_offload: bool = False,
               from_rank0: bool = False) -> nn.Module:  # fmt: skip
    """Wrap a (PEFT) causal LM in place with FSDP1 units (see the module docstring); returns the model.
    Raises :class:`~qgen.strategies.checks.StrategyError` for a model whose trainable weights would not all
    be sharded.

    ``from_rank0``: rank 0's weights go to every rank (a collective), whose model may be on the meta device
    (:func:`receive_from_rank0`).
    """
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._runtime_utils import _lazy_init  # private: makes the decoder the root now
    from torch.distributed.fsdp.wrap import CustomPolicy

    from qgen.strategies.checks import StrategyError
    from qgen.strategies.fsdp2 import compute_dtype, decoder_parts

    decoder, layers, tied = decoder_parts(model, "FSDP1")
    if param_dtype != "auto":
        dtype = getattr(torch, param_dtype)
    else:  # the dtype the model was loaded in (peft's k-bit preparation leaves float32 norms and embeddings)
        dtype = getattr(model.config, "dtype", None) or compute_dtype(model)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    # one dtype per FlatParameter, and the replicated output layer in the dtype the decoder hands it: every
    # frozen floating-point weight in the compute dtype (peft's k-bit preparation upcasts norms, embeddings
    # and the output layer to float32); trainable (LoRA) weights keep their dtype in units of their own
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    lora_units = {m for layer in layers for m in layer.modules() if m is not layer and _own_trainable(m)}
    units = lora_units | set(layers)
    mixed = None if dtype == torch.float32 else MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32,
                                                               buffer_dtype=dtype)  # fmt: skip

    def policy(module: nn.Module) -> bool | dict:
        # LoRA units compute in their own (float32) dtype, as peft does without FSDP: peft casts the layer's
        # input to lora_A.weight.dtype, read outside the unit's forward, where it is the stored dtype
        return {"mixed_precision": None} if module in lora_units else module in units

    init = {}
    if from_rank0:
        init = receive_from_rank0(model, decoder, tied, device_id)
        tied = decoder_parts(model, "FSDP1")[2]  # the materialised tied weights
    with _sync_on_cpu(from_rank0 and (device_id is None or torch.device(device_id).type == "cpu")):
        root = FSDP(decoder, auto_wrap_policy=CustomPolicy(policy), mixed_precision=mixed,
                    sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=device_id, use_orig_params=True,
                    cpu_offload=CPUOffload(offload_params=cpu_offload), limit_all_gathers=True,
                    ignored_states=list(tied) or None, **init)  # fmt: skip
    parent = next(m for m in model.modules() if any(child is decoder for child in m.children()))
    name = next(n for n, child in parent.named_children() if child is decoder)
    setattr(parent, name, root)
    # transformers' get_decoder() looks through the wrapper to the module inside, whose weights are shards
    # outside the unit's forward; qgen's losses call the decoder through get_decoder(): hand them the unit
    parent.get_decoder = lambda: root
    _lazy_init(root, root)  # the decoder is the root: nested units may then be gathered on their own (checkpoints)
    stray = [n for n, p in model.named_parameters() if p.requires_grad and "_fsdp_wrapped_module." not in n]
    if stray:
        raise StrategyError(f"FSDP1: trainable weights outside the decoder's layers would not be synchronised "
                            f"across ranks: {', '.join(clean_name(n) for n in stray[:3])}")  # fmt: skip
    return model


def receive_from_rank0(model: nn.Module, decoder: nn.Module, tied: list[nn.Parameter],
                       device: torch.device | None) -> dict[str, Any]:  # fmt: skip
    """One host copy per node: the weights FSDP will not manage (the output layer, a tied embedding, anything
    outside the decoder: replicated) are broadcast from rank 0 now, materialised first where this rank built
    them on the meta device; returns FSDP's arguments that do the same for each unit as it is built
    (``sync_module_states``; ``param_init_fn`` materialises a meta unit, 4-bit weights included, before rank
    0's values arrive), so a rank > 0 never holds more than its shards and one unit.
    """
    import functools

    from qgen.fourbit import broadcast_from_rank0, materialize

    device = torch.device(device or "cpu")
    memo: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    in_decoder, tied_ids, sent = {id(m) for m in decoder.modules()}, {id(p) for p in tied}, set()
    for module in model.modules():
        outside = id(module) not in in_decoder
        if not outside and not any(id(p) in tied_ids for p in module.parameters(recurse=False)):
            continue  # FSDP's: materialised by param_init_fn and synchronised unit by unit
        materialize(module, device, memo)
        for tensor in [*module.parameters(recurse=False), *(module.buffers(recurse=False) if outside else ())]:
            if id(tensor) not in sent:
                sent.add(id(tensor))
                moved = broadcast_from_rank0(tensor.data)
                if moved is not tensor.data:
                    tensor.data.copy_(moved)
    return {"sync_module_states": True, "param_init_fn": functools.partial(materialize, device=device)}


@contextlib.contextmanager
def _sync_on_cpu(active: bool):
    """Torch's FSDP1 refuses ``sync_module_states`` for CPU tensors (a guard against slow broadcasts on a GPU
    machine); gloo broadcasts them, which is how a CPU run (the tests) receives rank 0's weights.
    """
    from torch.distributed.fsdp import _init_utils  # private: the guard, lifted for CPU runs only

    check = _init_utils._check_module_states_for_sync_module_states
    if active:
        _init_utils._check_module_states_for_sync_module_states = lambda states: None
    try:
        yield
    finally:
        _init_utils._check_module_states_for_sync_module_states = check


def trainable_units(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """The FSDP1 units of ``model`` that manage trainable weights directly, each with those weights, in
    the same order on every rank.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = []
    for unit in FSDP.fsdp_modules(model):
        own = [p for n, p in unit.module.named_parameters() if "_fsdp_wrapped_module." not in n and p.requires_grad]
        if own:
            units.append((unit, own))
    return units


class FSDP1Precision(FSDPPrecision):
    """Lightning's FSDP precision plugin, without its module conversion (the units hold their own dtypes), and
    with gradient clipping by norm over sharded gradients: each element
    of a trainable weight lives on exactly one rank (full shard), so the global squared norm is the sum over
    ranks of the local ones (what ``FullyShardedDataParallel.clip_grad_norm_`` computes).
    """

    def convert_module(self, module: nn.Module) -> nn.Module:
        # the units set their dtypes when they are built (:func:`wrap_model`); a ``.to(dtype)`` of the whole
        # model afterwards would recast the shards but not FSDP's gather buffers
        return module

    def clip_grad_by_norm(self, optimizer, clip_val: int | float) -> None:
        import torch.distributed as dist

        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        squared = torch.zeros((), dtype=torch.float32, device=device)
        for grad in grads:
            squared += grad.detach().float().pow(2).sum()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(squared)
        coefficient = torch.clamp(clip_val / (squared.sqrt() + 1e-6), max=1.0)
        for grad in grads:
            grad.detach().mul_(coefficient.to(grad.dtype))


class FSDP1Strategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1, full shard) for qgen's LoRA and QLoRA stages. The stage modules
    wrap themselves in ``configure_model`` (:func:`wrap_model`); checkpoints are single files of the trainable
    weights and their optimizer state (see the module docstring).

    Args:
        param_dtype: the dtype the units compute in and, for QLoRA, the 4-bit storage dtype; ``auto`` = the
            base weights' dtype (``model.dtype``).
        cpu_offload: keep the sharded weights in host memory between uses (slower; for the largest models).
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU (Lightning's choice when unset).
        timeout_s: collective timeout in seconds (Lightning's default when unset).
        one_host_copy: rank 0 alone loads (or draws) the weights; the other ranks build their models on the meta
            device and receive their shards from it, so a node's host memory holds one copy of the model, not
            one per rank (:func:`receive_from_rank0`). ``false``: every rank loads the model itself.
    """

    def __init__(
        self,
        param_dtype: Literal["auto", "bfloat16", "float32"] = "auto",
        cpu_offload: bool = False,
        process_group_backend: str | None = None,
        timeout_s: float | None = None,
        one_host_copy: bool = True,
    ):
        from datetime import timedelta

        from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

        timeout = default_pg_timeout if timeout_s is None else timedelta(seconds=timeout_s)
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, sharding_strategy="FULL_SHARD",
                         state_dict_type="full")  # fmt: skip
        self.param_dtype, self.offload, self.one_host_copy = param_dtype, cpu_offload, one_host_copy

    @property
    def loads_on_rank0(self) -> bool:
        """Whether rank 0 alone loads the weights and sends them to the others (``one_host_copy``, > 1 rank)."""
        return self.one_host_copy and self.world_size > 1

    @property
    def builds_empty(self) -> bool:
        """Whether this rank builds its models on the meta device (ranks > 0 under ``one_host_copy``)."""
        return self.loads_on_rank0 and self.global_rank > 0

    # the precision plugin Lightning picks for FSDP refuses clipping by norm: ours computes it over shards
    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:
            plugin = FSDP1Precision(plugin.precision, getattr(plugin, "scaler", None))
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def quant_storage(self, dtype: torch.dtype) -> torch.dtype:
        """The storage dtype of 4-bit weights for a model loaded in ``dtype``: FSDP's ``param_dtype``."""
        return dtype if self.param_dtype == "auto" else getattr(torch, self.param_dtype)

    def shard(self, model: nn.Module) -> nn.Module:
        return wrap_model(model, self.param_dtype, device_id=self.root_device, cpu_offload=self.offload,
                          from_rank0=self.loads_on_rank0)  # fmt: skip

    # ------------------------------------------------------------------------------------------ checkpoints
    def _names(self) -> dict[int, str]:
        return {id(p): clean_name(n) for n, p in self.lightning_module.named_parameters()}

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full trainable weights on rank 0, gathered one unit at a time (every rank takes part); the
        frozen base never leaves its shards.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        names, state = self._names(), {}
        for unit, params in trainable_units(self.lightning_module):
            # every rank gathers the unit (a LoRA layer: kilobytes); rank0_only with offload_to_cpu crashes on CPU
            with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                if self.global_rank == 0:
                    state.update({names[id(p)]: p.detach().to("cpu", copy=True) for p in params})
        return state

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The full optimizer state, keyed (and ordered in ``param_groups``) by the weights' names: one process
        loads it positionally, as torch's optimizers do. Each per-element state (Adam's moments) is gathered
        through its weight's own unit (:func:`gather_like`): torch's FSDP1 optimizer-state helpers
        (``FSDP.optim_state_dict`` / ``optim_state_dict_to_load``, and ``get`` / ``set_optimizer_state_dict``)
        loaded ``exp_avg`` with ``exp_avg_sq``'s values in a round trip on torch 2.13 (nested units,
        ``use_orig_params``).
        """
        from lightning.pytorch.core.optimizer import LightningOptimizer

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        owners = {id(p): unit for unit, params in trainable_units(self.lightning_module) for p in params}
        names, state = self._names(), {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                entry = {}
                for key, value in optimizer.state.get(param, {}).items():
                    per_element = torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape
                    entry[key] = gather_like(owners[id(param)], param, value) if per_element else value
                state[names[id(param)]] = entry
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
                  for g in optimizer.param_groups]  # fmt: skip
        return {"state": state, "param_groups": groups} if self.global_rank == 0 else {}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A single-file checkpoint (of any world size): the trainable weights into their shards, and when
        fitting, the optimizer state. Nothing in the file can run code (:func:`load_checkpoint_file`).
        """
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from qgen.checkpointing import CheckpointError, load_checkpoint_file

        path = self.broadcast(os.fspath(checkpoint_path))
        checkpoint = load_checkpoint_file(path, mmap=True)  # refuses folders, truncated and unsafe files
        units = trainable_units(self.lightning_module)
        weights, names = checkpoint.pop("state_dict", {}), self._names()
        owners = {id(p): unit for unit, params in units for p in params}
        wanted = [names[id(p)] for _, params in units for p in params]
        missing = [n for n in wanted if n not in weights]
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} of this run's {len(wanted)} trainable tensors "
                                  f"(first: {missing[0]}): a checkpoint of another model or adapter?")  # fmt: skip
        fitting = self.lightning_module.trainer.state.fn == "fit"
        for optimizer, saved in zip(self.optimizers if fitting else [], checkpoint.get("optimizer_states") or []):
            order = [p for g in optimizer.param_groups for p in g["params"]]
            saved_names = [n for g in saved["param_groups"] for n in g["params"]]
            if saved_names != [names[id(p)] for p in order]:
                raise CheckpointError(f"{path}: its optimizer state is not keyed by this run's trainable weights "
                                      "(written by another strategy?); resume it with the strategy that wrote it")  # fmt: skip
            local = {}
            for i, (param, name) in enumerate(zip(order, saved_names)):
                full = weights[name].shape  # per-element states have the weight's full shape in the file
                local[i] = {key: scatter_like(owners[id(param)], param, value)
                            if torch.is_tensor(value) and value.dim() > 0 and value.shape == full else value
                            for key, value in saved["state"].get(name, {}).items()}  # fmt: skip
            groups, start = [], 0
            for group in saved["param_groups"]:
                groups.append({**group, "params": list(range(start, start + len(group["params"])))})
                start += len(group["params"])
            optimizer.load_state_dict({"state": local, "param_groups": groups})
        for unit, params in units:
            with torch.no_grad(), FSDP.summon_full_params(unit, recurse=False, writeback=True):
                for param in params:
                    value = weights[names[id(param)]]
                    if value.shape != param.shape:
                        raise CheckpointError(f"{path}: {names[id(param)]} has shape {tuple(value.shape)}, this "
                                              f"run's has {tuple(param.shape)}")  # fmt: skip
                    param.copy_(value)
        return checkpoint


def gather_like(unit: nn.Module, param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """The full tensor of which ``local`` is this rank's shard, laid out as ``param``'s shard (an optimizer's
    per-element state): it takes the weight's place in the unit's shard for one gather of the unit, then the
    weight is put back. A collective: every rank calls it, in the same order.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with torch.no_grad():
        kept = param.detach().clone()
        param.copy_(local)
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            full = param.detach().to("cpu", copy=True)
        param.copy_(kept)
    return full


def scatter_like(unit: nn.Module, param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full``, laid out as ``param``'s (the inverse of :func:`gather_like`)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with torch.no_grad():
        kept = param.detach().clone()
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            param.copy_(full)
        local = param.detach().clone()
        param.copy_(kept)
    return local
