"""Start-up checks of the trainer's strategy against the run: one clear line before any model is loaded.

Shipped strategies (``configs/strategy/``): single process, DDP, FSDP2 through
:class:`qgen.strategies.FSDP2Strategy` (LoRA on a bf16 base) and FSDP1 through
:class:`qgen.strategies.FSDP1Strategy` (QLoRA: 4-bit weights stored in bf16). Facts behind the refusals
below are from the Lightning 2.6, torch, peft, transformers and bitsandbytes sources and their issue threads:

- Lightning's plain ``ModelParallelStrategy`` defaults to tensor parallelism, which qgen's modules do not
  apply: refused, with the FSDP2 overlay named instead;
- Lightning's plain ``FSDPStrategy`` (``fsdp``) would wrap the module as one unit (frozen and trainable
  weights together), gather the frozen base into checkpoints and read them back with full unpickling:
  refused, with the FSDP1 overlay named instead;
- DeepSpeed needs CUDA under Lightning (refused on CPU) and is not shipped: its engine checkpoints and
  optimizer partitions are read back with full unpickling, which breaks qgen's rule that a checkpoint cannot
  run code;
- FSDP1 with int8 weights, or 4-bit weights in a dtype other than bf16 (the storage dtype is FSDP's param
  dtype; FSDP flattens no integers): refused;
- FSDP2 with packed 4-bit / 8-bit weights: refused (bitsandbytes' FSDP2 support for NF4 is open upstream;
  it has trained with loss 0 or kept the 4-bit weights unsharded); FSDP without a LoRA adapter: refused
  (the output layer stays replicated, see :mod:`qgen.strategies.fsdp2`);
- ``backend: vllm`` under FSDP1, or with the adapter sync under FSDP2: refused (the engine's push is built
  from FSDP2 parameters gathered one at a time);
- reentrant activation checkpointing under DDP ("mark a variable ready only once"): qgen always uses the
  non-reentrant form, so there is nothing to refuse.

Generation over FSDP (GRPO rollouts, on-policy distillation, ``predict`` / ``test``) runs with
``synced_gpus`` (:func:`qgen.backends.hf.generate_group`).
"""

from __future__ import annotations

from typing import Any


class StrategyError(ValueError):
    """A strategy that cannot run this configuration (the message says why and what to use)."""


def _name_and_args(strategy: Any) -> tuple[str, Any]:
    """The lower-cased class (or registered) name of a ``trainer.strategy`` value and its arguments: YAML's
    ``class_path`` + ``init_args``, a registered name (no arguments) or a strategy object (its attributes).
    """
    if isinstance(strategy, str):
        return strategy.lower(), {}
    if hasattr(strategy, "get"):
        return str(strategy.get("class_path", "")).lower(), strategy.get("init_args") or {}
    return type(strategy).__name__.lower(), vars(strategy)


def strategy_kind(strategy: Any) -> str:
    """``ddp``, ``fsdp`` (Lightning's FSDP1 as is), ``fsdp1`` and ``fsdp2`` (qgen's), ``modelparallel`` (Lightning's, as is), ``deepspeed2``
    (stages 1-2), ``deepspeed3`` or ``single`` for a
    ``trainer.strategy`` value: a registered name (``"deepspeed_stage_3_offload"``) or ``class_path`` +
    ``init_args`` as in YAML.
    """
    if strategy is None:
        return "single"
    name, args = _name_and_args(strategy)
    if name.endswith("fsdp2strategy"):
        return "fsdp2"
    if name.endswith("fsdp1strategy"):
        return "fsdp1"
    if "deepspeed" in name:
        stage = args.get("stage") if hasattr(args, "get") else None
        return "deepspeed3" if "stage_3" in name or stage == 3 else "deepspeed2"
    if "modelparallel" in name:
        return "modelparallel"
    if "fsdp" in name:
        return "fsdp"
    if "ddp" in name:
        return "ddp"
    return "single"


def check_strategy(strategy: Any, accelerator: Any, model_args: Any) -> None:
    """Raise :class:`StrategyError` for a strategy that cannot run this model configuration."""
    kind = strategy_kind(strategy)
    if kind in ("single", "ddp"):
        return
    where = f"--trainer.strategy {strategy if isinstance(strategy, str) else kind}"
    accelerator = str(accelerator or "auto").lower()
    if accelerator == "auto":
        import torch

        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    on_cpu = accelerator == "cpu"
    if kind == "modelparallel":
        raise StrategyError(f"{where}: Lightning's ModelParallelStrategy means tensor parallelism by default, which "
                            "qgen's modules do not apply; for FSDP2 use --config configs/strategy/fsdp2-lora.yaml "
                            "(qgen.strategies.FSDP2Strategy)")  # fmt: skip
    if kind == "fsdp":
        raise StrategyError(f"{where}: Lightning's FSDPStrategy as it is would wrap the whole module in one unit "
                            "(frozen and trainable weights together), gather the frozen base into every checkpoint "
                            "and read it back with full unpickling; use --config configs/strategy/fsdp-qlora.yaml "
                            "(qgen.strategies.FSDP1Strategy)")  # fmt: skip
    if kind in ("deepspeed2", "deepspeed3"):
        if on_cpu:
            raise StrategyError(f"{where}: DeepSpeed needs CUDA under Lightning; on CPU use ddp, "
                                "configs/strategy/fsdp2-lora.yaml or configs/strategy/fsdp-qlora.yaml")  # fmt: skip
        raise StrategyError(f"{where}: DeepSpeed is not shipped by qgen: its checkpoints (engine folders, optimizer "
                            "partitions) are read back with full unpickling (a checkpoint must not run code); use "
                            "configs/strategy/fsdp-qlora.yaml (sharded QLoRA), configs/strategy/fsdp2-lora.yaml "
                            "(sharded bf16 LoRA) or ddp; python -m qgen plan says which fits")  # fmt: skip
    engine = "FSDP1" if kind == "fsdp1" else "FSDP2"
    if model_args.get("lora", "unset") is None:
        raise StrategyError(f"{where} with model.lora null: qgen's {engine} path trains LoRA adapters (the output "
                            "layer stays replicated and frozen); set model.lora, or use ddp for full "
                            "fine-tuning")  # fmt: skip
    if kind == "fsdp1":
        _check_fsdp1(where, strategy, model_args)
    else:
        for option in ("quantization", "teacher_quantization"):
            if model_args.get(option):
                raise StrategyError(f"{where} with model.{option} {model_args.get(option)}: FSDP2 cannot shard "
                                    "bitsandbytes' packed 4-bit / 8-bit weights (open upstream); use "
                                    "configs/strategy/fsdp-qlora.yaml (FSDP1) or ddp, or bf16 weights sharded by "
                                    f"FSDP2 (--model.init_args.{option} null)")  # fmt: skip
    vllm = model_args.get("vllm") or {}
    weight_sync = vllm.get("weight_sync", "auto") if isinstance(vllm, dict) else getattr(vllm, "weight_sync", "auto")
    if model_args.get("backend") == "vllm" and kind == "fsdp1":
        raise StrategyError(f"{where} with model.backend vllm: the engine's weight push is built for FSDP2 shards "
                            "(gathered one parameter at a time); use configs/strategy/fsdp2-lora.yaml or ddp with "
                            "vLLM, or backend hf under FSDP1")  # fmt: skip
    if model_args.get("backend") == "vllm" and weight_sync == "adapter":
        raise StrategyError(f"{where} with model.vllm.weight_sync adapter: the adapter would be saved from shards; "
                            "under FSDP2 the engine takes the merged push, gathered one parameter at a time "
                            "(weight_sync merged or auto)")  # fmt: skip


def _check_fsdp1(where: str, strategy: Any, model_args: Any) -> None:
    """QLoRA under FSDP1: 4-bit weights stored in FSDP's param dtype, bfloat16 (FSDP flattens no integers)."""
    param_dtype = _name_and_args(strategy)[1].get("param_dtype", "auto") or "auto"
    for option, dtype_option in (("quantization", "dtype"), ("teacher_quantization", "teacher_dtype")):
        value = model_args.get(option)
        if not value:
            continue
        if value != "nf4":
            raise StrategyError(f"{where} with model.{option} {value}: FSDP1 shards 4-bit (nf4) weights only, "
                                "stored in bfloat16; bitsandbytes' int8 weights cannot be flattened")  # fmt: skip
        dtype = param_dtype if param_dtype != "auto" else (model_args.get(dtype_option) or model_args.get("dtype")
                                                            or "float32")  # fmt: skip
        if dtype != "bfloat16":
            raise StrategyError(f"{where} with model.{option} nf4 and a {dtype} base: under FSDP the 4-bit weights "
                                "are stored in FSDP's param dtype, which must be bfloat16 (bnb_4bit_quant_storage "
                                f"= param_dtype); set --model.init_args.{dtype_option} bfloat16")  # fmt: skip
