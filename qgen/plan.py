"""``python -m qgen plan``: per-GPU memory of a run before it starts, from the model's config alone.

    python -m qgen plan --config configs/qwen3-14b-sft.yaml --gpus 2 --gpu-memory 24
    python -m qgen plan --config configs/qwen3-14b-grpo.yaml --config my_overlay.yaml --gpus 8 --gpu-memory 80

The ``--config`` files are the ones ``fit`` takes (merged in order, later files win). No weights are read:
the architecture comes from ``qgen/arch/<name>.json`` for the hub models the shipped configs name (Qwen3
0.6B, 1.7B, 4B, 14B, 32B), from a local folder's ``config.json``, from the embedded default, or for
``random:<architecture>`` (:mod:`qgen.random_init`) from that architecture.

What is counted, per GPU, for each shipped strategy (``configs/strategy/``) that can run the config (columns):
``ddp`` (the config as written), ``fsdp-qlora`` (the config with the FSDP1 overlay: NF4 linear weights
stored in bf16, the other frozen weights in bf16, all sharded; LoRA only) and ``fsdp2-lora`` (the config with
the FSDP2 overlay: bf16 base weights, never quantized, sharded; LoRA only):

- **base weights**: linear layers at 0.5 byte/parameter + one fp32 absmax per 64 weights (NF4) or 1 byte (int8)
  under quantization, else the dtype's size; embeddings, norms and head at the dtype's size. FSDP shards
  all but the output layer (and a tied embedding), which stay replicated, plus the one decoder layer
  gathered at a time (twice with prefetching);
- **trainable state**: LoRA weights (fp32, as peft keeps adapters), their gradients and AdamW's two moments,
  16 bytes a parameter; FSDP shards all of it;
- **activations**: what autograd keeps for backward, per token and decoder layer ``4 H + 5 Hq + 4 Hkv + 4 I``
  elements (the norms' inputs and outputs, q / k / v before and after their norms and RoPE, attention
  output, the MLP's gate, up, SiLU and product), plus the LoRA dropout copies when dropout > 0; with
  gradient checkpointing only each layer's input is kept and one layer is recomputed at a time. Tokens
  are ``batch x max_length`` for SFT and distillation, ``prompts x (P + G x C)`` for GRPO (each prompt's
  forward pass is shared by its group);
- **logits**: one chunk of ``chunk_size`` rows x vocabulary in fp32, with its gradient (qgen never holds the
  whole ``[tokens, vocab]`` logits);
- **KV cache** (GRPO, on-policy distillation, generating with ``transformers``): ``2 x layers x Hkv`` values a
  token for the sequences of the run's largest ``generate`` call, ``P + C`` tokens each, at the dtype's size.
  GRPO generates a whole optimizer step in one call by default (``generation_batch_size: null``): ``prompts x
  accumulate_grad_batches x G`` sequences (128 for ``configs/qwen3-14b-grpo.yaml``), else
  ``generation_batch_size x G``; on-policy distillation one micro-batch's ``batch`` sequences;
- **vllm engine** (``backend: vllm``, colocated): the share of the GPU vLLM takes for its weights and KV cache,
  ``gpu_memory_utilization x`` the GPU's memory, and never less than its weights: the whole merged model in the
  run's dtype (merged route), or the quantized base plus the adapter (adapter route). Every rank's engine holds
  the whole model, under FSDP too (the trainer's KV-cache term is then 0: the engine generates); on a CPU
  machine (``fit``'s pre-flight) its weights plus its fixed KV cache, ``kv_cache_gib``;
- **teacher** (distillation): its weights (replicated under DDP; sharded like the student under FSDP, in
  bf16 under FSDP2 and as configured, NF4 or bf16, under FSDP1: :func:`qgen.strategies.shard_stage_models`)
  and one chunk of its logits;
- **reserve**: 0.75 GB CUDA context + 10% allocator fragmentation of the rest.

``H`` hidden size, ``Hq`` / ``Hkv`` query / key-value width, ``I`` MLP width. The activation and logits terms
are checked against the tensor memory ``torch.profiler`` records for a scaled-up random Qwen3 on CPU
(``tests/test_plan.py``); the GPU-only terms (quantized storage, CUDA context, NCCL buffers) have not been
checked on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace

from qgen.backends.spec import resolve_weight_sync

GB = 1e9
ARCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arch")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STRATEGIES = ("ddp", "fsdp-qlora", "fsdp2-lora")  # the overlays in configs/strategy/


class PlanError(ValueError):
    """A config the planner cannot size (one line naming what is missing)."""


@dataclass
class Arch:
    """What memory depends on in a Qwen3-style decoder."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Arch:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return cls(vocab=config["vocab_size"], hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                   layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                   kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"], head_dim=head_dim,
                   tied=bool(config.get("tie_word_embeddings", False)))  # fmt: skip

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """``(in, out)`` of one decoder layer's linear layers: q, k, v, o, gate, up, down."""
        h, i = self.hidden, self.intermediate
        return [(h, self.q_width), (h, self.kv_width), (h, self.kv_width), (self.q_width, h), (h, i), (h, i), (i, h)]

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes())

    def other_params(self) -> int:
        """Embedding, head (unless tied), norms (2 per layer + q/k norms + the final one)."""
        norms = self.layers * (2 * self.hidden + 2 * self.head_dim) + self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + norms

    def params(self) -> int:
        return self.layers * self.layer_linear_params() + self.other_params()


def load_arch(name: str | None) -> Arch:
    """The architecture of ``model_name_or_path`` without loading weights (see the module docstring)."""
    if name is None or str(name).startswith(("embedded", "random:")):
        from qgen.models import resolve

        try:  # the embedded default's folder (built offline on first use), a random-init model's folder
            name = resolve(name)
        except ValueError as err:
            raise PlanError(str(err)) from None
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        if not os.path.exists(path):
            raise PlanError(f"model {name}: no config.json in that folder")
    else:
        path = os.path.join(ARCH_DIR, f"{name.rsplit('/', 1)[-1]}.json")
        if not os.path.exists(path):
            known = ", ".join(sorted(f[:-5] for f in os.listdir(ARCH_DIR) if f.endswith(".json")))
            raise PlanError(f"model {name}: no architecture file for it (bundled: {known}); pass a local folder "
                            "that holds its config.json")  # fmt: skip
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    return Arch.from_config(config.get("text_config", config))


@dataclass
class Workload:
    """The run's settings that memory depends on (from the resolved config)."""

    stage: str  # sft | grpo | distill
    arch: Arch
    lora_r: int | None
    lora_dropout: float
    quantization: str | None
    dtype: str
    checkpointing: bool
    batch: int  # sequences (SFT, distill) or prompts (GRPO) per micro-batch
    seq_len: int  # data.max_length
    chunk_size: int  # rows of the logits chunk
    group_size: int = 1
    prompt_tokens: int = 0
    new_tokens: int = 0
    teacher: Arch | None = None
    teacher_quantization: str | None = None
    teacher_dtype: str | None = None
    mixed_precision: bool = False  # bf16-mixed: activations at 2 bytes
    accumulate: int = 1  # trainer.accumulate_grad_batches
    generation_batch: int | None = None  # GRPO prompts per generate call; None: the whole optimizer step
    engine: str | None = None  # "vllm": a colocated vLLM engine generates
    engine_memory_share: float = 0.3  # model.vllm.gpu_memory_utilization
    weight_sync: str = "merged"  # how the engine holds the policy (model.vllm.weight_sync, resolved)
    engine_kv_bytes: float | None = None  # on a CPU machine: the engine's KV cache (model.vllm.kv_cache_gib)


def _linear_bytes(quantization: str | None, dtype: str) -> float:
    """Bytes a linear-layer weight takes: NF4 (half a byte + one fp32 absmax per 64), int8, or the dtype."""
    return {"nf4": 0.5 + 4 / 64, "int8": 1.0}.get(quantization or "", DTYPE_BYTES[dtype])


def _weight_bytes(arch: Arch, quantization: str | None, dtype: str) -> float:
    linear = _linear_bytes(quantization, dtype)
    return arch.layers * arch.layer_linear_params() * linear + arch.other_params() * DTYPE_BYTES[dtype]


def lora_params(arch: Arch, r: int | None) -> int:
    """LoRA on every linear layer of every decoder layer (``target_modules: all-linear``)."""
    return 0 if not r else arch.layers * sum(r * (a + b) for a, b in arch.linear_shapes())


def activation_elements_per_token_layer(arch: Arch, lora_dropout: float) -> int:
    h, q, kv, i = arch.hidden, arch.q_width, arch.kv_width, arch.intermediate
    elements = 4 * h + 5 * q + 4 * kv + 4 * i
    if lora_dropout > 0:  # peft keeps each adapted layer's dropped input: q, k, v, gate, up share H; o Hq; down I
        elements += 5 * h + q + i
    return elements


def activation_bytes(w: Workload) -> float:
    """Autograd's saved activations plus the backward working set, for one micro-batch (see the docstring)."""
    a = w.arch
    act = 2 if w.mixed_precision or w.dtype != "float32" else 4
    if w.stage == "grpo":
        tokens = w.batch * (w.prompt_tokens + w.group_size * w.new_tokens)
    else:
        tokens = w.batch * w.seq_len
    per_layer = activation_elements_per_token_layer(a, w.lora_dropout) * tokens * act
    working = 2 * tokens * max(a.intermediate, a.hidden) * act  # gradients flowing through one layer in backward
    if w.checkpointing:
        return a.layers * tokens * a.hidden * act + per_layer + working
    return a.layers * per_layer + working


def logits_bytes(arch: Arch, chunk_size: int, tokens: int) -> float:
    return 2 * min(chunk_size, tokens) * arch.vocab * 4  # one fp32 chunk and its gradient


def generation_sequences(w: Workload) -> int:
    """Sequences of the run's largest ``generate`` call (see the module docstring)."""
    if w.stage == "grpo":
        return (w.generation_batch or w.batch * w.accumulate) * w.group_size
    return w.batch


def kv_cache_bytes(w: Workload) -> float:
    """The ``transformers`` KV cache of the largest ``generate`` call (0 when a vLLM engine generates)."""
    if w.stage == "sft" or w.engine == "vllm" or (w.stage == "distill" and not w.new_tokens):
        return 0.0
    length = (w.prompt_tokens if w.stage == "grpo" else w.seq_len) + w.new_tokens
    return 2 * w.arch.layers * w.arch.kv_width * generation_sequences(w) * length * DTYPE_BYTES[w.dtype]


def engine_bytes(w: Workload, gpu_memory: float) -> float:
    """The colocated vLLM engine on each GPU: its memory share, at least its weights (0 without an engine)."""
    if w.engine != "vllm":
        return 0.0
    if w.weight_sync == "adapter":  # the base as the trainer holds it (quantized) and the adapter beside it
        weights = _weight_bytes(w.arch, w.quantization, w.dtype) + lora_params(w.arch, w.lora_r) * DTYPE_BYTES[w.dtype]
    else:  # the whole merged model in the run's dtype, whatever the strategy shards
        weights = _weight_bytes(w.arch, None, w.dtype)
    if w.engine_kv_bytes is not None:  # a CPU engine: its weights and a KV cache of a fixed size
        return weights + w.engine_kv_bytes
    return max(w.engine_memory_share * gpu_memory, weights)


def applicable(w: Workload) -> list[str]:
    """The shipped strategies that can run ``w``: FSDP trains LoRA only (see :mod:`qgen.strategies.checks`)."""
    return list(STRATEGIES) if w.lora_r else ["ddp"]


def _head_bytes(arch: Arch, dtype: str) -> float:
    """The output layer (the embedding when tied), which FSDP keeps replicated."""
    return arch.vocab * arch.hidden * DTYPE_BYTES[dtype]


def plan(w: Workload, gpus: int, gpu_memory: float = 80 * GB) -> dict[str, dict[str, float]]:
    """Per-GPU bytes of every component, for each strategy that can run ``w`` (see the module docstring);
    ``gpu_memory``: one GPU's memory in bytes (the vLLM engine's share is a fraction of it).
    """
    out = {}
    for strategy in applicable(w):
        sharded, run = strategy != "ddp", w
        if strategy == "fsdp2-lora":  # what the overlay runs: bf16 base and teacher, nothing quantized
            run = replace(w, quantization=None, dtype="bfloat16", teacher_quantization=None, teacher_dtype="bfloat16")
        elif strategy == "fsdp-qlora":  # NF4 stored in bf16, every other frozen weight in bf16; the teacher as set
            run = replace(w, quantization="nf4", dtype="bfloat16", teacher_dtype="bfloat16",
                          teacher_quantization="nf4" if w.teacher_quantization else None)  # fmt: skip
        a = run.arch
        weights = _weight_bytes(a, run.quantization, run.dtype)
        layer = a.layer_linear_params() * _linear_bytes(run.quantization, run.dtype)  # one decoder layer, gathered
        trainable = lora_params(a, run.lora_r) if run.lora_r else a.params()
        state = trainable * 16 if run.lora_r else trainable * (DTYPE_BYTES[run.dtype] * 2 + 8)
        tokens = run.batch * (run.prompt_tokens + run.group_size * run.new_tokens) if run.stage == "grpo" else \
            run.batch * run.seq_len  # fmt: skip
        if sharded:
            head = _head_bytes(a, run.dtype)
            rows = {"base weights": (weights - head) / gpus + head + (2 * layer if gpus > 1 else 0.0),
                    "trainable state": state / gpus}  # fmt: skip
        else:
            rows = {"base weights": weights, "trainable state": state + (trainable * 4 if gpus > 1 else 0)}
        rows["activations"] = activation_bytes(run)
        rows["logits chunk"] = logits_bytes(a, run.chunk_size, tokens)
        rows["kv cache (generation)"] = kv_cache_bytes(run)
        if run.engine == "vllm":
            rows["vllm engine"] = engine_bytes(run, gpu_memory)
        if run.teacher is not None:
            t = run.teacher
            t_weights = _weight_bytes(t, run.teacher_quantization, run.teacher_dtype or run.dtype)
            if sharded:
                t_head = _head_bytes(t, run.teacher_dtype)
                t_layer = t.layer_linear_params() * _linear_bytes(run.teacher_quantization, run.teacher_dtype)
                t_weights = (t_weights - t_head) / gpus + t_head + (2 * t_layer if gpus > 1 else 0.0)
            rows["teacher"] = t_weights + logits_bytes(t, run.chunk_size, tokens) / 2
        rows["reserve"] = 0.75 * GB + 0.1 * sum(rows.values())
        rows["total"] = sum(rows.values())
        out[strategy] = rows
    return out


# --------------------------------------------------------------------------------------------- config
def _merge(into: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def workload_from_configs(paths: list[str], prompt_tokens: int = 256) -> Workload:
    """The :class:`Workload` of ``fit --config A --config B ...`` (files merged in order)."""
    import yaml

    config: dict = {}
    for path in paths:
        if not os.path.exists(path):
            raise PlanError(f"--config {path}: no such file")
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise PlanError(f"--config {path}: not a mapping of settings")
        _merge(config, loaded)
    return workload_from_config(config, prompt_tokens)


def workload_from_config(config: dict, prompt_tokens: int = 256, arch_of=None) -> Workload:
    """The :class:`Workload` of one merged ``fit`` config (``model`` / ``data`` / ``trainer`` mappings).
    ``arch_of``: how a model name becomes an :class:`Arch` (default :func:`load_arch`).
    """
    arch_of = arch_of or load_arch
    model = config.get("model") or {}
    args, cls = model.get("init_args") or {}, str(model.get("class_path", ""))
    stage = "grpo" if "GRPO" in cls else "distill" if "Distill" in cls else "sft" if "SFT" in cls else None
    if stage is None:
        raise PlanError(f"model.class_path {cls!r}: not one of qgen.SFTModule, qgen.GRPOModule, qgen.DistillModule")
    data, trainer = config.get("data") or {}, config.get("trainer") or {}
    lora = args.get("lora", {} if stage != "distill" else None)
    default_name = "embedded:mini" if stage == "distill" else None
    generation = args.get("generation") or {}
    vllm = args.get("vllm") or {}
    engine = "vllm" if args.get("backend", "hf") == "vllm" else None
    w = Workload(
        stage=stage, arch=arch_of(args.get("model_name_or_path", default_name)),
        lora_r=None if lora is None else int(lora.get("r", 16)), lora_dropout=float((lora or {}).get("dropout", 0.05)),
        quantization=args.get("quantization"), dtype=args.get("dtype", "float32"),
        checkpointing=bool(args.get("gradient_checkpointing", False)), batch=int(data.get("batch_size", 8)),
        seq_len=int(data.get("max_length", 512)),
        chunk_size=int(args.get("logprob_chunk_size", args.get("loss_chunk_size", 1024))),
        group_size=int(args.get("group_size", 8)) if stage == "grpo" else 1,
        prompt_tokens=min(prompt_tokens, int(data.get("max_length", 512))),
        new_tokens=int(args.get("max_new_tokens", 256) if stage == "grpo" else generation.get("max_new_tokens", 0)),
        mixed_precision=str(trainer.get("precision", "32")).startswith(("bf16", "16")),
        accumulate=int(trainer.get("accumulate_grad_batches", 1) or 1),
        generation_batch=args.get("generation_batch_size") if stage == "grpo" else None,
        engine=engine, engine_memory_share=float(vllm.get("gpu_memory_utilization", 0.3)),
        weight_sync=resolve_weight_sync(vllm.get("weight_sync", "auto"), args.get("quantization")),
    )  # fmt: skip
    if stage == "distill":
        teacher = args.get("teacher", "last")
        if teacher == "last" or str(teacher).endswith(".ckpt"):
            w.teacher = w.arch  # a qgen checkpoint of the same family: sized as the student's backbone
        else:
            w.teacher = arch_of(teacher)
        w.teacher_quantization, w.teacher_dtype = args.get("teacher_quantization"), args.get("teacher_dtype")
    return w


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def render(w: Workload, gpus: int, gpu_memory_gb: float) -> str:
    table = plan(w, gpus, gpu_memory_gb * GB)
    names = list(table)
    lines = [f"per-GPU memory (GB) on {gpus} GPU(s) of {gpu_memory_gb:g} GB: {w.stage}, "
             f"{_count(w.arch.params())} parameters, quantization {w.quantization or 'none'}, {w.dtype}, "
             f"LoRA r={w.lora_r or 'full fine-tune'}, checkpointing {'on' if w.checkpointing else 'off'}"]  # fmt: skip
    if "fsdp2-lora" in names and (w.quantization or w.dtype != "bfloat16" or w.teacher_quantization):
        lines.append("(fsdp2-lora: bf16 base and teacher, unquantized and sharded, as configs/strategy/fsdp2-lora.yaml "
                     "runs this config)")  # fmt: skip
    if "fsdp-qlora" in names and (w.quantization != "nf4" or w.dtype != "bfloat16"):
        lines.append("(fsdp-qlora: NF4 base stored in bf16, sharded, as configs/strategy/fsdp-qlora.yaml runs this "
                     "config)")  # fmt: skip
    lines.append(f"{'':<24}" + "".join(f"{n:>24}" for n in names))
    for row in table[names[0]]:
        lines.append(f"{row:<24}" + "".join(f"{table[n][row] / GB:>24.2f}" for n in names))
    fits = [n for n in names if table[n]["total"] <= gpu_memory_gb * GB]
    lines.append(f"{'fits':<24}" + "".join(f"{'yes' if n in fits else 'no':>24}" for n in names))
    if not w.checkpointing:
        on = plan(replace(w, checkpointing=True), gpus, gpu_memory_gb * GB)
        lines.append(f"{'with checkpointing':<24}" + "".join(f"{on[n]['total'] / GB:>24.2f}" for n in names))
    advice = "lower data.batch_size" + (" or group_size / max_new_tokens" if w.stage == "grpo" else "") + \
        ("" if w.checkpointing else ", enable gradient checkpointing") + ", or add GPUs / a larger GPU"  # fmt: skip
    lines.append("fits: " + (", ".join(fits) if fits else f"none of the shipped strategies at this size: {advice}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgen plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="a fit config; repeat to overlay")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="GRPO prompt length (tokens)")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.gpu_memory <= 0:
        parser.error("--gpus must be >= 1 and --gpu-memory > 0")
    try:
        print(render(workload_from_configs(args.config, args.prompt_tokens), args.gpus, args.gpu_memory))
    except PlanError as err:
        print(f"qgen plan: error: {err}", file=sys.stderr)
        return 2
    return 0
