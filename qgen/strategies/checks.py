"""Start-up checks of the trainer's strategy against the run: one clear line before any model is loaded.

Shipped strategies (``configs/strategy/``): single process, DDP, and FSDP2 through
:class:`qgen.strategies.FSDP2Strategy` (LoRA on a full-precision base). Facts behind the refusals below are
from the Lightning 2.6, torch, peft, transformers and bitsandbytes sources and their issue threads:

- Lightning's plain ``ModelParallelStrategy`` defaults to tensor parallelism, which qgen's modules do not
  apply: refused, with the FSDP2 overlay named instead;
- FSDP1 (``fsdp``) and DeepSpeed need CUDA under Lightning: refused on CPU. On a GPU they are not shipped by
  qgen: their checkpoints (sharded folders, DeepSpeed's optimizer files) are read back with full unpickling,
  which breaks qgen's rule that a checkpoint cannot run code, and generation over FSDP1 units is not wired;
  refused with the reason and the alternatives;
- FSDP2 with packed 4-bit / 8-bit weights: refused (bitsandbytes' FSDP2 support for NF4 is open upstream;
  it has trained with loss 0 or kept the 4-bit weights unsharded); FSDP2 without a LoRA adapter: refused
  (the output layer stays replicated, see :mod:`qgen.strategies.fsdp2`);
- ``backend: vllm`` with a sharded strategy: the weight push reads full parameters: refused;
- reentrant activation checkpointing under DDP ("mark a variable ready only once"): qgen always uses the
  non-reentrant form, so there is nothing to refuse.

Generation over FSDP2 (GRPO rollouts, on-policy distillation, ``predict`` / ``test``) runs with
``synced_gpus`` (:func:`qgen.sampling.generate_group`).
"""

from __future__ import annotations

from typing import Any


class StrategyError(ValueError):
    """A strategy that cannot run this configuration (the message says why and what to use)."""


def strategy_kind(strategy: Any) -> str:
    """``ddp``, ``fsdp`` (FSDP1), ``fsdp2`` (qgen's), ``modelparallel`` (Lightning's, as is), ``deepspeed2``
    (stages 1-2), ``deepspeed3`` or ``single`` for a
    ``trainer.strategy`` value: a registered name (``"deepspeed_stage_3_offload"``) or ``class_path`` +
    ``init_args`` as in YAML.
    """
    if strategy is None:
        return "single"
    if isinstance(strategy, str):
        name, args = strategy.lower(), {}
    else:
        getter = strategy.get if hasattr(strategy, "get") else lambda k, d=None: getattr(strategy, k, d)
        name, args = str(getter("class_path", "") or type(strategy).__name__).lower(), getter("init_args") or {}
    if name.endswith("fsdp2strategy"):
        return "fsdp2"
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
    if kind in ("fsdp", "deepspeed2", "deepspeed3"):
        engine = "Lightning's FSDPStrategy (FSDP1)" if kind == "fsdp" else "DeepSpeed"
        if on_cpu:
            raise StrategyError(f"{where}: {engine} needs CUDA under Lightning; on CPU use ddp or "
                                "configs/strategy/fsdp2-lora.yaml")  # fmt: skip
        raise StrategyError(f"{where}: {engine} is not shipped by qgen: its checkpoints are read back with full "
                            "unpickling (a checkpoint must not run code); use ddp (QLoRA up to 14B on one 24 GB "
                            "GPU) or configs/strategy/fsdp2-lora.yaml (bf16 LoRA sharded); python -m qgen plan "
                            "says which fits")  # fmt: skip
    for option in ("quantization", "teacher_quantization"):
        if model_args.get(option):
            raise StrategyError(f"{where} with model.{option} {model_args.get(option)}: FSDP2 cannot shard "
                                "bitsandbytes' packed 4-bit / 8-bit weights (open upstream); use ddp, or bf16 "
                                f"weights sharded by FSDP2 (--model.init_args.{option} null)")  # fmt: skip
    if model_args.get("lora", "unset") is None:
        raise StrategyError(f"{where} with model.lora null: qgen's FSDP2 path trains LoRA adapters (the output "
                            "layer stays replicated and frozen); set model.lora, or use ddp for full "
                            "fine-tuning")  # fmt: skip
    vllm = model_args.get("vllm") or {}
    weight_sync = vllm.get("weight_sync", "auto") if isinstance(vllm, dict) else getattr(vllm, "weight_sync", "auto")
    if model_args.get("backend") == "vllm" and weight_sync == "adapter":
        raise StrategyError(f"{where} with model.vllm.weight_sync adapter: the adapter would be saved from shards; "
                            "under FSDP2 the engine takes the merged push, gathered one parameter at a time "
                            "(weight_sync merged or auto)")  # fmt: skip
