"""bitsandbytes NF4 layers that qgen builds itself, outside transformers' loader, for two cases:

- **quantizing in memory** (:func:`quantize_linear`): a random-init model (:mod:`qgen.random_init`) has no
  checkpoint for transformers to quantize while loading; its linear layers are drawn and quantized on the
  device one at a time, so the full-precision model never exists at once;
- **one host copy per node under FSDP1** (:func:`share_layout`): ranks > 0 build their model on the meta
  device and receive their shards from rank 0 (:class:`qgen.strategies.FSDP1Strategy`). FSDP broadcasts
  tensors it manages, but a 4-bit layer's quantization state (its absmax, code book and packed shape) lives
  outside them: rank 0 sends it, and each rank > 0 turns the named linear layers of its meta model into 4-bit
  layers that carry it. The packed weights themselves stay on the meta device until FSDP fills them.

Both leave a model that peft and qgen treat exactly as one transformers loaded in 4 bits (:func:`mark_4bit`).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn


def bnb_config(compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None):
    """The ``BitsAndBytesConfig`` qgen loads NF4 models with (double quantization, ``compute_dtype``)."""
    from transformers import BitsAndBytesConfig

    storage = {"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **storage)  # fmt: skip


def linear_names(model: nn.Module) -> list[str]:
    """The linear layers transformers quantizes in a causal LM: all but the output layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def _empty_4bit(linear: nn.Linear, compute_dtype: torch.dtype, quant_storage: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              quant_storage=quant_storage, device="meta")  # fmt: skip
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer


def quantize_linear(linear: nn.Linear, weight: torch.Tensor, compute_dtype: torch.dtype,
                    quant_storage: torch.dtype | None = None) -> nn.Module:  # fmt: skip
    """A 4-bit layer in place of ``linear``, its weights ``weight`` (full precision, on the target device)
    quantized to NF4 there, as transformers' loader quantizes a checkpoint's.
    """
    import bitsandbytes as bnb

    storage = quant_storage or torch.uint8
    layer = _empty_4bit(linear, compute_dtype, storage)
    param = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                              quant_storage=storage, module=layer)  # fmt: skip
    layer.weight = param._quantize(weight.device)
    return layer


def mark_4bit(model: nn.Module, config) -> None:
    """What transformers sets on a model it loaded in 4 bits (peft's k-bit preparation and LoRA read it)."""
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    model.config.quantization_config = config


# ----------------------------------------------------------------------------------- one host copy per node
def wire_device() -> torch.device:
    """Where the default process group's collectives take tensors: a GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank, through the process group's device (:func:`wire_device` unless
    ``device``); the result is on that device (``tensor`` itself when it is already there).
    """
    import torch.distributed as dist

    moved = tensor.to(device or wire_device())
    dist.broadcast(moved, src=0)
    return moved


def _broadcast_header(header: Any | None, device: torch.device) -> Any:
    import torch.distributed as dist

    data = json.dumps(header).encode() if dist.get_rank() == 0 else b""
    size = broadcast_from_rank0(torch.tensor([len(data)], dtype=torch.int64), device)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(size), dtype=torch.uint8)
    return json.loads(bytes(broadcast_from_rank0(buffer, device).cpu().tolist()).decode())


def share_layout(model: nn.Module, device: torch.device | str | None, config) -> int:
    """Rank 0's 4-bit layout into every rank's ``model`` (a collective: every rank of the default process
    group calls it, with the same architecture). On rank 0, ``model`` is loaded in 4 bits; on ranks > 0 it
    is on the meta device, and its linear layers that are 4-bit on rank 0 become 4-bit layers holding rank
    0's quantization state on ``device`` and a meta weight of the packed shape, for FSDP to fill. Returns
    the number of 4-bit layers. Sent: names, shapes and the quantization state (for a 14B model about
    1/64 of its 4-bit weights); never the weights.
    """
    import bitsandbytes as bnb
    import torch.distributed as dist
    from bitsandbytes.functional import QuantState

    wire = wire_device()
    target = torch.device(device or "cpu")
    header, tensors = None, []
    if dist.get_rank() == 0:
        header = []
        for name, layer in model.named_modules():
            if not isinstance(layer, bnb.nn.Linear4bit):
                continue
            weight = layer.weight
            state = weight.quant_state.as_dict(packed=True)
            header.append({"name": name, "shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
                           "compute": str(layer.compute_dtype).removeprefix("torch."), "blocksize": weight.blocksize,
                           "state": [[key, list(value.shape), str(value.dtype).removeprefix("torch.")]
                                     for key, value in state.items()]})  # fmt: skip
            tensors.extend(state.values())
    header = _broadcast_header(header, wire)
    if dist.get_rank() == 0:
        for tensor in tensors:
            broadcast_from_rank0(tensor, wire)
        return len(header)
    for entry in header:
        state = {key: broadcast_from_rank0(torch.empty(shape, dtype=getattr(torch, dtype)), wire)
                 for key, shape, dtype in entry["state"]}  # fmt: skip
        linear = model.get_submodule(entry["name"])
        if type(linear) is not nn.Linear:
            raise RuntimeError(f"rank 0 holds a 4-bit layer at {entry['name']}, this rank a {type(linear).__name__}: "
                               "ranks built different models")  # fmt: skip
        storage = getattr(torch, entry["dtype"])
        layer = _empty_4bit(linear, getattr(torch, entry["compute"]), storage)
        # the layer keeps the state too: FSDP turns its weight into a plain view, and the layer restores it
        layer.quant_state = QuantState.from_dict(state, device=target)
        layer.weight = bnb.nn.Params4bit(torch.empty(entry["shape"], dtype=storage, device="meta"), requires_grad=False,
                                         quant_state=layer.quant_state,
                                         blocksize=entry["blocksize"], compress_statistics=True, quant_type="nf4",
                                         quant_storage=storage, module=layer, bnb_quantized=True)  # fmt: skip
        model.set_submodule(entry["name"], layer)
    mark_4bit(model, config)
    return len(header)


def materialize(module: nn.Module, device: torch.device, memo: dict[int, nn.Parameter] | None = None) -> None:
    """Give ``module``'s own meta parameters and buffers (not its children's) uninitialised storage on
    ``device``, keeping each 4-bit weight a 4-bit weight with its quantization state and each shared
    (tied) parameter shared through ``memo``. ``nn.Module.to_empty`` would turn 4-bit weights into plain
    parameters and untie tied ones. The values come later (a broadcast from rank 0).
    """
    import bitsandbytes as bnb

    memo = {} if memo is None else memo
    for name, param in list(module._parameters.items()):
        if param is None or not param.is_meta:
            continue
        if id(param) not in memo:
            data = torch.empty(param.shape, dtype=param.dtype, device=device)
            if isinstance(param, bnb.nn.Params4bit):
                memo[id(param)] = bnb.nn.Params4bit(
                    data, requires_grad=False, quant_state=param.quant_state, blocksize=param.blocksize,
                    compress_statistics=param.compress_statistics, quant_type=param.quant_type,
                    quant_storage=param.quant_storage, module=param.module, bnb_quantized=True)  # fmt: skip
            else:
                memo[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
        module._parameters[name] = memo[id(param)]
    for name, buffer in list(module._buffers.items()):
        if buffer is not None and buffer.is_meta:
            module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
