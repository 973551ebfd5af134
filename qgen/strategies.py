"""Start-up checks of the trainer's strategy against the run: one clear line before any model is loaded.

Today qgen is tested with DDP (and a single process). Sharded strategies (Lightning's ``FSDPStrategy``,
``ModelParallelStrategy`` / FSDP2, DeepSpeed) are chosen with ``--trainer.strategy`` like any Lightning
option; the combinations below are known not to work (facts from the Lightning 2.6, torch, peft and
bitsandbytes sources and their issue threads) or are not wired in qgen yet, and are refused here instead of
failing deep inside a step, hanging, or training silently wrong:

- FSDP1 (``fsdp``) and DeepSpeed need CUDA under Lightning: refused on CPU;
- QLoRA under FSDP1 needs ``bnb_4bit_quant_storage`` equal to FSDP's bf16 ``param_dtype``; qgen's loader keeps
  bitsandbytes' default uint8 storage ("Integer parameters are unsupported"): refused;
- FSDP2 (``ModelParallelStrategy``) with packed 4-bit / 8-bit weights: refused (bitsandbytes' FSDP2 support
  for NF4 is still open upstream; it has trained with loss 0 or kept the 4-bit weights unsharded);
- DeepSpeed with bitsandbytes-quantized weights: refused;
- generation with sharded parameters (GRPO rollouts, on-policy distillation, ``predict`` / ``test``): HF
  ``generate`` hangs under ZeRO-3 / FSDP unless every rank takes the same number of decoding steps, and
  qgen does not pass ``synced_gpus`` yet: refused for ZeRO-3, FSDP1 and FSDP2;
- ``backend: vllm`` with any sharded strategy: the weight push reads full parameters: refused.
"""

from __future__ import annotations

from typing import Any


class StrategyError(ValueError):
    """A strategy that cannot run this configuration (the message says why and what to use)."""


def strategy_kind(strategy: Any) -> str:
    """``ddp``, ``fsdp``, ``fsdp2``, ``deepspeed2`` (stages 1-2), ``deepspeed3`` or ``single`` for a
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
    if "deepspeed" in name:
        stage = args.get("stage") if hasattr(args, "get") else None
        return "deepspeed3" if "stage_3" in name or stage == 3 else "deepspeed2"
    if "modelparallel" in name:
        return "fsdp2"
    if "fsdp" in name:
        return "fsdp"
    if "ddp" in name:
        return "ddp"
    return "single"


def check_strategy(strategy: Any, accelerator: Any, model_class: str, model_args: Any,
                   subcommand: str = "fit") -> None:  # fmt: skip
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
    if on_cpu and kind in ("fsdp", "deepspeed2", "deepspeed3"):
        engine = "Lightning's FSDPStrategy (FSDP1)" if kind == "fsdp" else "DeepSpeed"
        raise StrategyError(f"{where}: {engine} needs CUDA under Lightning; on CPU use ddp")
    quantized = model_args.get("quantization") or model_args.get("teacher_quantization")
    if quantized and kind == "fsdp":
        raise StrategyError(f"{where} with quantization {quantized}: QLoRA under FSDP needs bnb_4bit_quant_storage = "
                            "bf16 = FSDP's param_dtype, which qgen's loader does not set yet; use ddp (a 14B QLoRA "
                            "run fits one 24 GB GPU: python -m qgen plan)")  # fmt: skip
    if quantized and kind == "fsdp2":
        raise StrategyError(f"{where} with quantization {quantized}: FSDP2 cannot shard bitsandbytes' packed 4-bit / "
                            "8-bit weights (open upstream); use ddp, or bf16 LoRA (quantization: null) under FSDP2")  # fmt: skip
    if quantized and kind.startswith("deepspeed"):
        raise StrategyError(f"{where} with quantization {quantized}: DeepSpeed does not take bitsandbytes-quantized "
                            "weights; use ddp")  # fmt: skip
    if model_args.get("backend") == "vllm":
        raise StrategyError(f"{where} with model.backend vllm: the engine's weight push reads full parameters, "
                            "which sharding splits; use backend: hf or ddp")  # fmt: skip
    generates = subcommand in ("predict", "test") or "GRPO" in model_class or \
        ("Distill" in model_class and float(model_args.get("lmbda", 0.5)) > 0)  # fmt: skip
    if generates and kind in ("fsdp", "fsdp2", "deepspeed3"):
        raise StrategyError(f"{where}: {model_class.rsplit('.', 1)[-1]} {subcommand} generates, and generation "
                            "over sharded parameters (synced_gpus) is not wired in qgen yet; use ddp or "
                            "deepspeed stage 2")  # fmt: skip
