"""Random-init models of a real architecture, with no checkpoint anywhere: ``model_name_or_path:
random:Qwen3-14B`` (an architecture qgen bundles, ``qgen/arch/``) or ``random:/path/to/config.json`` (any
Qwen3-style ``config.json``). For checking memory and speed on a machine that has no weights and no network
(``benchmarks/gpu_check.py``, the multi-process tests): the same code paths as a real model of that shape,
none of its skill.

- **weights** are drawn on the device they will live on, from a fixed seed per tensor (the same model in
  every process and run); an NF4 model is quantized one linear layer at a time as it is drawn
  (:func:`qgen.fourbit.quantize_linear`), so a 14B model needs about 10 GB of GPU memory, never its 29.5 GB
  in bf16, and nothing is written to disk;
- **tokenizer**: the embedded default's (trained on the bundled data, with its chat template), extended with
  byte-level filler tokens up to the model's vocabulary (151,936 ids for Qwen3), so that the embedding and
  output layer have their real size and every id a random model samples decodes to text. The bundled data
  encodes to the embedded tokenizer's ids only.

``resolve()`` turns the name into a cached folder holding ``config.json``, the tokenizer and a marker
(:data:`MARKER`); :func:`qgen.models.load_causal_lm` builds the weights when it meets the marker.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import zlib

import torch
from torch import nn

PREFIX = "random:"
MARKER = "qgen_random.json"
SEED = 1234
VERSION = 1  # bump when the folder's build changes


def is_random(folder: str | None) -> bool:
    return bool(folder) and os.path.exists(os.path.join(folder, MARKER))


def _arch_file(name: str) -> str:
    from qgen.plan import ARCH_DIR

    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise ValueError(f"{PREFIX}{name}: no such architecture file")
        return name
    path = os.path.join(ARCH_DIR, f"{name.rsplit('/', 1)[-1]}.json")
    if not os.path.exists(path):
        known = ", ".join(sorted(f[:-5] for f in os.listdir(ARCH_DIR) if f.endswith(".json")))
        raise ValueError(f"{PREFIX}{name}: no bundled architecture of that name (bundled: {known}); or give the path "
                         "of a config.json")  # fmt: skip
    return path


def random_folder(name: str) -> str:
    """The cached folder of ``random:<name>`` (config, tokenizer, marker), built on first call (process-safe)."""
    from qgen.models import cache_root, embedded_path

    path = _arch_file(name)
    with open(path, encoding="utf-8") as fh:
        try:
            arch = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
    tokenizer = embedded_path()
    digest = hashlib.sha256(json.dumps([VERSION, arch, os.path.basename(tokenizer)], sort_keys=True).encode())
    out = os.path.join(cache_root(), f"random-{digest.hexdigest()[:16]}")
    if os.path.exists(os.path.join(out, MARKER)):
        return out
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks and parallel tests wait for one builder
        if not os.path.exists(os.path.join(out, MARKER)):
            tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".build-")
            _build_folder(tmp, arch, tokenizer, source=path)
            os.replace(tmp, out)
    return out


def _build_folder(out: str, arch: dict, tokenizer_dir: str, source: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    arch = dict(arch.get("text_config", arch))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = arch.get("vocab_size")
    if not isinstance(vocab, int) or vocab < len(tok):
        raise ValueError(f"{source}: vocab_size must be an integer of at least {len(tok)} (the embedded tokenizer's "
                         f"size), got {vocab!r}")  # fmt: skip
    tok.save_pretrained(out)
    _extend_tokenizer(os.path.join(out, "tokenizer.json"), vocab)
    model_type = arch.pop("model_type", "qwen3")
    arch.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    AutoConfig.for_model(model_type, **arch).save_pretrained(out)
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as fh:
        json.dump({"architecture": source, "seed": SEED}, fh)


def _extend_tokenizer(path: str, size: int) -> None:
    """Filler tokens (2-3 byte-level characters not already in the vocabulary) up to ``size`` ids."""
    from itertools import product

    from tokenizers import pre_tokenizers

    with open(path, encoding="utf-8") as fh:
        spec = json.load(fh)
    vocab = spec["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in spec.get("added_tokens", [])}
    next_id = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for length in (2, 3):
        for chars in product(alphabet, repeat=length):
            if next_id >= size:
                break
            token = "".join(chars)
            if token not in taken:
                vocab[token] = next_id
                next_id += 1
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh, ensure_ascii=False)


def _draw(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device, std: float) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(SEED * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)


def build_random(folder: str, dtype: torch.dtype, device: torch.device | str | None = None,
                 quantization: str | None = None, quant_storage: torch.dtype | None = None,
                 attn_implementation: str = "sdpa") -> nn.Module:  # fmt: skip
    """The model of ``folder`` (:func:`random_folder`) with weights drawn on ``device``: matrices from
    N(0, ``initializer_range``), norms 1, biases 0; ``quantization="nf4"``: every linear layer but the output
    layer quantized as it is drawn, the rest in ``dtype``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from qgen import fourbit

    if quantization not in (None, "nf4"):
        raise ValueError(f"random-init models are quantized to nf4 only, not {quantization}")
    config = AutoConfig.from_pretrained(folder)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    quantize = set(fourbit.linear_names(model)) if quantization else set()
    std = getattr(config, "initializer_range", 0.02)
    drawn: dict[int, nn.Parameter] = {}  # tied weights are drawn once
    for name, module in list(model.named_modules()):
        if name in quantize:
            weight = _draw(f"{name}.weight", module.weight.shape, dtype, device, std)
            model.set_submodule(name, fourbit.quantize_linear(module, weight, dtype, quant_storage))
            del weight
            continue
        for key, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in drawn:
                if param.dim() > 1:
                    data = _draw(f"{name}.{key}", param.shape, param.dtype, device, std)
                else:
                    data = torch.full(param.shape, 0.0 if key == "bias" else 1.0, dtype=param.dtype, device=device)
                drawn[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
            module._parameters[key] = drawn[id(param)]
        if any(b.is_meta for b in module.buffers(recurse=False)):
            with torch.device(device):  # computed buffers (rotary frequencies): the module built again on the device
                fresh = type(module)(model.config)
            for key, buffer in fresh.named_buffers(recurse=False):
                module._buffers[key] = buffer
    if quantization:
        fourbit.mark_4bit(model, fourbit.bnb_config(dtype, quant_storage))
    return model
