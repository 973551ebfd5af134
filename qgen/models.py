"""Backbone loading in one place: HF causal LMs, LoRA / QLoRA via peft + bitsandbytes, and the embedded default.

The *embedded default* (``model_name_or_path: null``) is a tiny Qwen3-architecture model with random
weights from a fixed seed and a byte-level BPE tokenizer trained on the project's bundled ``data/`` with a
Qwen-style chat template. It is built offline on first use and cached (``$QGEN_CACHE`` or
``~/.cache/qgen``), keyed by a hash of the bundled data and the build settings, so every process of a
run (DDP ranks included) loads the very same files. Nothing on this path touches the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from qgen.checkpointing import find_last_checkpoint, load_checkpoint_file, locate_source

BUNDLED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
EMBEDDED_VERSION = 2  # bump when the build below changes

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft).

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear".
        cpu_kernels: on a CPU run, compute the adapted layers with :mod:`qgen.lora`'s fused layers (peft's
            maths and state dict, fewer passes: 1.2-1.3x faster SFT steps on the embedded default). A CPU-only
            speed-up: a run on a GPU keeps peft's own layers whatever this says; ``false`` keeps them on CPU too.
    """

    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    cpu_kernels: bool = True


@dataclass
class EmbeddedSpec:
    """Shape of the embedded default model (a tiny Qwen3)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 2048
    seed: int = 1234


def cache_root() -> str:
    return os.environ.get("QGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qgen")


def _bundled_files(data_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(data_dir, "*.jsonl")))
    if not files:
        raise FileNotFoundError(
            f"no bundled *.jsonl question files in {data_dir}: the embedded default is built from them"
        )
    return files


def embedded_path(spec: EmbeddedSpec | None = None, data_dir: str = BUNDLED_DATA) -> str:
    """Folder of the embedded default model + tokenizer, built on first call (process-safe)."""
    spec = spec or EmbeddedSpec()
    digest = hashlib.sha256(json.dumps([EMBEDDED_VERSION, vars(spec)]).encode())
    for f in _bundled_files(data_dir):
        with open(f, "rb") as fh:
            digest.update(fh.read())
    path = os.path.join(cache_root(), f"embedded-{digest.hexdigest()[:16]}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(cache_root(), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # DDP ranks and parallel tests wait for one builder
        if not os.path.exists(os.path.join(path, "config.json")):
            tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".build-")
            _build_embedded(tmp, spec, data_dir)
            os.replace(tmp, path)
    return path


def _corpus(data_dir: str) -> list[str]:
    """Training text for the tokenizer: bundled records rendered exactly as the SFT examples see them."""
    from qgen.records import read_source
    from qgen.tasks import TASKS, prompt_messages, target_text

    texts = []
    for rec in read_source("jsonl", os.path.join(data_dir, "*.jsonl")).records:
        for task in TASKS:
            messages = prompt_messages(task, rec, partner=rec) + [{"role": "assistant", "content": target_text(rec)}]
            texts.extend(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return texts


def _build_embedded(out: str, spec: EmbeddedSpec, data_dir: str) -> None:
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    if spec != EmbeddedSpec() and spec.vocab_size == EmbeddedSpec.vocab_size:
        # a preset shares the default's tokenizer files, so a teacher and a student of different sizes
        # can be distilled token for token
        tok = PreTrainedTokenizerFast.from_pretrained(embedded_path(EmbeddedSpec(), data_dir))
    else:
        tok = _train_tokenizer(spec, data_dir)
    tok.save_pretrained(out)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    with _fork_rng(spec.seed):
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)


def _train_tokenizer(spec: EmbeddedSpec, data_dir: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # Han characters and digits stand alone (as in Qwen's splitting of digits), so a small corpus cannot
    # fuse whole Chinese sentences into single tokens; words and merges form inside the byte-level pieces.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\u3400-\u9fff\uf900-\ufaff]|\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(data_dir), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@contextlib.contextmanager
def _fork_rng(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


EMBEDDED_PRESETS = {
    # the embedded default (about 3.4 M parameters)
    "default": EmbeddedSpec(),
    # a smaller student for distillation demos (about 0.5 M parameters), same tokenizer
    "mini": EmbeddedSpec(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, seed=4321),  # fmt: skip
}


def resolve(model_name_or_path: str | None) -> str:
    """The folder or hub id to load: the embedded default when ``None``, a preset for ``embedded:<name>``, a
    random-init model's folder for ``random:<architecture>`` (:mod:`qgen.random_init`).
    """
    if model_name_or_path is None:
        return embedded_path()
    if model_name_or_path.startswith("random:"):
        from qgen.random_init import PREFIX, random_folder

        return random_folder(model_name_or_path.removeprefix(PREFIX))
    if model_name_or_path.startswith("embedded:"):
        name = model_name_or_path.removeprefix("embedded:")
        if name not in EMBEDDED_PRESETS:
            raise ValueError(f"unknown embedded model {model_name_or_path!r}; presets: {sorted(EMBEDDED_PRESETS)}")
        return embedded_path(EMBEDDED_PRESETS[name])
    return model_name_or_path


def load_tokenizer(model_name_or_path: str | None, padding_side: Literal["left", "right"] = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(model_name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError(f"tokenizer of {model_name_or_path!r} has no chat template; qgen needs one to build prompts")
    tok.padding_side = padding_side
    return tok


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(
    model_name_or_path: str | None,
    lora: LoraSpec | None = None,
    quantization: Literal["nf4", "int8"] | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    gradient_checkpointing: bool = False,
    device: torch.device | str | None = None,
    frozen: bool = False,
    attn_implementation: str = "sdpa",
    liger_kernels: bool = False,
    empty: bool = False,
    quant_storage: torch.dtype | None = None,
    share_4bit: bool = False,
) -> nn.Module:
    """Load a causal LM, optionally quantized (bitsandbytes) and wrapped with a LoRA adapter (peft).
    ``liger_kernels``: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (CUDA; :func:`check_liger`).
    ``empty``: the same model on the meta device, no weight read (ranks > 0 under FSDP2 and FSDP1, which
    receive their shards from rank 0: host memory holds one copy of the weights per node, not one per rank).
    ``share_4bit``: every rank of the run calls this together, rank 0 loading and the others ``empty``; rank 0
    sends the layout and quantization state of its NF4 layers, which the empty models take
    (:func:`qgen.fourbit.share_layout`).
    ``quant_storage``: the dtype 4-bit weights are packed into (``bnb_4bit_quant_storage``; FSDP1 needs its
    ``param_dtype`` there, :meth:`qgen.strategies.FSDP1Strategy.quant_storage`); ``None``: bitsandbytes' uint8.

    Quantized weights are loaded straight onto ``device`` (bitsandbytes quantizes on load); everything
    else is loaded on CPU and moved by Lightning. ``frozen`` models (teachers) may be quantized without
    an adapter, and are not prepared for k-bit training.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qgen import fourbit
    from qgen.random_init import build_random, is_random

    if quantization is not None and lora is None and not frozen:
        raise ValueError("quantization (QLoRA) needs a LoRA adapter: quantized base weights cannot be trained")
    source = resolve(model_name_or_path)
    if empty and quantization is not None and not (share_4bit and quantization == "nf4"):
        raise ValueError("empty (meta-device) models are quantized only as rank 0's NF4 model (share_4bit)")
    kwargs: dict = {"dtype": _DTYPES[dtype], "attn_implementation": check_attn_implementation(attn_implementation)}
    quantized = None
    if quantization == "nf4":
        quantized = fourbit.bnb_config(_DTYPES[dtype], quant_storage)
    elif quantization is not None:
        quantized = BitsAndBytesConfig(load_in_8bit=True)
    if empty:
        from transformers import AutoConfig

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), **kwargs)
    elif is_random(source):
        model = build_random(source, _DTYPES[dtype], device if quantization else "cpu", quantization, quant_storage,
                             kwargs["attn_implementation"])  # fmt: skip
    else:
        if quantized is not None:
            kwargs.update(quantization_config=quantized, device_map={"": str(device or "cpu")})
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if share_4bit and quantization == "nf4":
        fourbit.share_layout(model, device, quantized)
    check_final_logits(model, model_name_or_path)
    if quantization == "nf4":
        keep_4bit_layout(model)
    if liger_kernels:
        apply_liger(model)
    if quantization is not None and not frozen:
        from peft import prepare_model_for_kbit_training

        # peft passes no checkpointing arguments of its own, and torch's default is the reentrant form, which
        # fails under DDP ("mark a variable ready only once"): always the non-reentrant one
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = add_lora(model, lora, gradient_checkpointing, device)
    return model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as it finds them


def keep_4bit_layout(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer in its stored layout on every CPU; returns how many it set.

    On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` rewrites its weight in place into a packed layout
    at its first eval / no-grad forward (``_convert_weight_packed_for_cpu``). That rewrite asserts the output
    size is a multiple of 32, replaces ``weight.data`` (under FSDP1 a view into the flat parameter, which FSDP
    sets back at the next unshard while the quant state still says "packed") and computes through another
    kernel, so the same run would give other numbers, or fail, depending on the CPU. qgen keeps the one
    layout on every CPU: the dequantize-then-matmul path every other x86-64 CPU takes. GPUs are unaffected.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def has_sliding_layers(model: nn.Module) -> bool:
    """Whether any decoder layer attends through a sliding window (a prompt's cache cannot then be shared)."""
    return any(kind != "full_attention" for kind in getattr(model.config, "layer_types", None) or [])


def check_attn_implementation(name: str, option: str = "model.attn_implementation") -> str:
    """``name`` if this machine can run it, else a clear error naming ``option`` (before any model loads)."""
    import importlib.util

    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"{option} must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError(f"{option}=flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn --no-build-isolation), which is not installed")  # fmt: skip
        if not torch.cuda.is_available():
            raise ValueError(f"{option}=flash_attention_2 runs on CUDA GPUs only; use sdpa here")
    return name


def check_liger(enabled: bool, option: str = "model.liger_kernels") -> None:
    """Refuse ``liger_kernels: true`` where Liger cannot run (no liger-kernel package, no CUDA), before loading."""
    import importlib.util

    if not enabled:
        return
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(f"{option}=true needs the liger-kernel package (pip install liger-kernel), which is not "
                         "installed")  # fmt: skip
    if not torch.cuda.is_available():
        raise ValueError(f"{option}=true runs Triton kernels on CUDA GPUs only; set it to false here")


def apply_liger(model: nn.Module) -> None:
    """Swap the model's RMSNorm, SwiGLU MLP and rotary embedding for Liger's fused kernels, on this instance.
    Its fused linear cross-entropy stays off: qgen's losses never build the full logits anyway (chunked
    output layer), and it would replace ``forward``, which generation uses.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", "")
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)  # fmt: skip
    if not any("Liger" in type(m).__name__ for m in model.modules()):
        raise ValueError(f"model.liger_kernels: Liger has no kernels for model type {model_type!r}")


# config fields through which a model post-processes its final logits (Gemma-2/3 soft-capping, Cohere's scale,
# Granite's divisor, ...): qgen builds log-probs as hidden state x output weights, which would skip them
_LOGIT_FIELDS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                 "output_multiplier_scale": 1.0}  # fmt: skip


def check_final_logits(model: nn.Module, name: str | None = None) -> None:
    """Refuse a model whose logits are not ``hidden @ W_out.T``: every qgen loss computes them that way, in
    chunks, so a model-specific final-logit step (soft-capping, scaling, an output bias) would be skipped
    silently and every loss, log-prob and KL would be of another model.
    """
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    found = []
    for field, neutral in _LOGIT_FIELDS.items():
        value = getattr(text, field, neutral)
        if value is not None and value != neutral:
            found.append(f"{field}={value}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "bias", None) is not None:
        found.append("an output-layer bias")
    if found:
        raise ValueError(
            f"{name or getattr(config, 'name_or_path', 'this model')}: its final logits are post-processed "
            f"({', '.join(found)}), which qgen's chunked losses do not apply; models whose logits are plain "
            "hidden-state x output-weight products (Qwen, Llama, Mistral, ...) are supported"
        )


def add_lora(model: nn.Module, lora: LoraSpec, gradient_checkpointing: bool = False,
             device: torch.device | str | None = None) -> nn.Module:  # fmt: skip
    """Wrap ``model`` with a fresh LoRA adapter (peft); only the adapter is trainable. On a CPU run
    (``device`` CPU or unknown) with ``lora.cpu_kernels``, its layers are :class:`qgen.lora.FastLoraLinear`
    (peft's maths and state dict, fewer passes on CPU); elsewhere they are peft's own.
    """
    from peft import LoraConfig, get_peft_model

    from qgen.lora import speed_up_lora

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, config)
    if lora.cpu_kernels and (device is None or torch.device(device).type == "cpu"):
        model = speed_up_lora(model)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def _names(keys: list[str], limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_trainable_weights(model: nn.Module, source: str) -> int:
    """Load adapter (or full) weights into ``model`` from a qgen ``.ckpt`` or a PEFT adapter folder.

    Every trainable tensor of ``model`` must be in ``source`` with its shape, and every tensor of ``source``
    must be one of them: a partial match (another LoRA rank, other target modules, another backbone) is an
    error that names the tensors, never a silent half-load. Returns the number of tensors loaded.
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if os.path.isdir(source):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        weights = load_peft_weights(source)
        result = set_peft_model_state_dict(model, weights)
        unexpected = list(getattr(result, "unexpected_keys", []))
        adapter_missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if unexpected or adapter_missing:
            raise ValueError(f"init_from: the adapter in {source} does not fit this model's LoRA layers ("
                             + "; ".join(x for x in (unexpected and f"unexpected: {_names(unexpected)}",
                                                     adapter_missing and f"missing: {_names(adapter_missing)}") if x)
                             + "); use the same lora settings and backbone it was trained with")  # fmt: skip
        loaded = len(weights)
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"init_from: {source} is neither a checkpoint file nor an adapter folder")
        state = load_checkpoint_file(source).get("state_dict") or {}
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        params = dict(model.named_parameters())
        unknown = [k for k in state if k not in params]
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(params[k].shape)}" for k in state
                 if k in params and params[k].shape != state[k].shape]  # fmt: skip
        missing = [k for k in trainable if k not in state]
        if unknown or wrong or missing:
            parts = [f"{label}: {_names(keys)}" for label, keys in
                     (("not in this model", unknown), ("other shapes", wrong), ("trainable but absent", missing)) if keys]  # fmt: skip
            raise ValueError(f"{source} does not match this model ({'; '.join(parts)}): a different backbone or "
                             "LoRA config (rank, target modules)?")  # fmt: skip
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v.to(params[k].dtype))
        loaded = len(state)
    if loaded == 0:
        raise ValueError(f"init_from: no weights in {source} match this model (a different backbone or LoRA config?)")
    return loaded


def causal_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The padding mask a causal LM needs for ``attention_mask`` ``[B, T]``: none when every row is right-padded.

    Under the causal mask a real token only sees earlier positions, which are all real when the padding is
    on the right, so real tokens' outputs are the same without a padding mask; pad positions carry no
    loss. Without it attention takes the plain causal kernel and no ``[B, 1, T, T]`` mask is built.
    """
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()) and bool(attention_mask[:, 0].all())
    return None if right_padded else attention_mask


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
    """The real tokens of a padded batch as one row: ``(ids [1, N], position_ids [1, N], labels [1, N])``.

    Positions restart at 0 for every sequence; with no attention mask, ``transformers`` reads the restarts
    as sequence boundaries (a block-diagonal causal mask under sdpa / eager, variable-length kernels under
    flash-attention), so every token sees exactly what it saw in its padded row and no compute is spent on
    padding. Each sequence's first label is set to ``IGNORE_INDEX``: it would be predicted from the end of
    the previous sequence.
    """
    from qgen.losses import IGNORE_INDEX

    keep = attention_mask.bool()
    lengths = keep.sum(-1)
    starts = torch.cumsum(lengths, 0) - lengths  # [B] offset of each sequence in the packed row
    total = int(lengths.sum())
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), lengths)  # [N]
    positions = torch.arange(total, device=input_ids.device) - starts[owner]
    packed_labels = None
    if labels is not None:
        packed_labels = labels[keep].clone()
        packed_labels[starts[lengths > 0]] = IGNORE_INDEX
        packed_labels = packed_labels[None]
    return input_ids[keep][None], positions[None], packed_labels


def causal_lm_nll(model: nn.Module, batch: dict[str, torch.Tensor], normalizer=None, chunk_size: int = 1024,
                  packed: bool = False):  # fmt: skip
    """Assistant-token NLL of ``batch`` under ``model`` (:func:`qgen.losses.token_nll` on the decoder's
    hidden states, so the full-vocabulary logits are never built). ``packed``: the batch's real tokens in
    one row (:func:`pack_rows`): same loss and gradients, no compute on padding.
    """
    from qgen.losses import token_nll

    if packed:
        ids, positions, labels = pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
        hidden = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        return token_nll(hidden, model.get_output_embeddings().weight, labels, normalizer, chunk_size)
    mask = causal_attention_mask(batch["attention_mask"])
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    return token_nll(hidden, model.get_output_embeddings().weight, batch["labels"], normalizer, chunk_size)


def checkpoint_backbone(ckpt_path: str) -> dict:
    """How to rebuild the model of a qgen checkpoint: ``model_name_or_path``, ``lora``, ``dtype``, and
    ``base_from`` (the checkpoint whose merged weights are its base, for a GRPO run started from SFT).
    """
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    data = load_checkpoint_file(ckpt_path, mmap=True)
    hparams = data.get("hyper_parameters") or {}
    if "model_name_or_path" not in hparams:
        raise ValueError(f"{ckpt_path} is not a qgen checkpoint (its hyper_parameters name no backbone)")
    return {"model_name_or_path": hparams["model_name_or_path"], "lora": hparams.get("lora"),
            "dtype": hparams.get("dtype", "float32"), "class_path": hparams.get("_class_path"),
            # GRPO started from a policy merged into its base (see GRPOModule.init_from): rebuild that first
            "base_from": hparams.get("init_from") if hparams.get("quantization") is None else None,
            "base_from_info": (data.get("qgen") or {}).get("init_from")}  # fmt: skip


TEACHER_CLASSES = ("qgen.GRPOModule", "qgen.grpo.GRPOModule", "qgen.SFTModule", "qgen.sft.SFTModule")


def resolve_teacher(teacher: str, root: str = "lightning_logs") -> str:
    """``last`` -> the newest GRPO ``last.ckpt`` under ``root``, else the newest SFT one; anything else as given."""
    if teacher != "last":
        return teacher
    for classes in (TEACHER_CLASSES[:2], TEACHER_CLASSES[2:]):
        for class_path in classes:
            try:
                return find_last_checkpoint(root, class_path)
            except FileNotFoundError:
                continue
    raise FileNotFoundError(f"model.teacher=last: no GRPO or SFT last.ckpt under {root}/; train one first")


def load_policy(
    source: str,
    model_name_or_path: str | None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """The model an earlier stage produced, merged into plain weights and trainable (train mode): a qgen
    ``.ckpt`` (any stage), or a PEFT adapter folder on ``model_name_or_path``. GRPO builds on it.
    """
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "adapter_config.json")):
        from peft import PeftModel

        base = load_causal_lm(model_name_or_path, None, None, dtype, device=device)
        model = PeftModel.from_pretrained(base, source).merge_and_unload()
    elif source.endswith(".ckpt"):
        info = checkpoint_backbone(source)
        if resolve(info["model_name_or_path"]) != resolve(model_name_or_path):
            trained, wanted = (n or "the embedded default" for n in (info["model_name_or_path"], model_name_or_path))
            raise ValueError(f"init_from: {source} was trained on {trained}, not on {wanted}")
        model = load_from_checkpoint(source, merge=True, dtype=dtype, device=device)
    else:
        raise FileNotFoundError(f"init_from: {source} is neither a checkpoint file nor an adapter folder")
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(check_attn_implementation(attn_implementation))
    model.requires_grad_(True)
    return model.train()


def load_from_checkpoint(
    ckpt_path: str,
    merge: bool = True,
    quantization: Literal["nf4", "int8"] | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    device: torch.device | str | None = None,
    quant_storage: torch.dtype | None = None,
) -> nn.Module:
    """The model a qgen ``.ckpt`` describes, frozen and in eval mode: its backbone (or, for a GRPO run started
    from SFT, the SFT model it was built on), its LoRA adapter (if any) and its trained weights.

    With ``merge`` the adapter is folded into the base weights (a plain ``PreTrainedModel``: a distillation
    teacher, ``export --merge``); otherwise the PEFT model is returned. Quantized base weights cannot take
    a merge exactly, so a quantized LoRA model stays unmerged (the adapter runs beside the 4-bit weights).
    """
    info = checkpoint_backbone(ckpt_path)
    lora = LoraSpec(**info["lora"]) if info["lora"] else None
    dtype = dtype or info["dtype"]
    if info["base_from"]:
        base_from = locate_source(ckpt_path, info["base_from"], info["base_from_info"])
        model = load_policy(base_from, info["model_name_or_path"], dtype, device)
        model = add_lora(model, lora) if lora is not None else model
    else:
        model = load_causal_lm(info["model_name_or_path"], lora, quantization, dtype, device=device, frozen=True,
                               quant_storage=quant_storage)  # fmt: skip
    load_trainable_weights(model, ckpt_path)
    if lora is not None and merge and quantization is None:
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
