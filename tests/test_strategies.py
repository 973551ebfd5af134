"""Start-up checks of ``trainer.strategy`` against the run (qgen.strategies): one line, nothing created; the
shipped overlays in configs/strategy/ against every stage config.
"""

import glob
import os

import pytest
import yaml
from conftest import CONFIGS

from qgen.cli import cli_main
from qgen.strategies import StrategyError, check_strategy, strategy_kind

FSDP2 = {"class_path": "qgen.strategies.FSDP2Strategy"}
STRATEGY_OVERLAYS = sorted(glob.glob(os.path.join(CONFIGS, "strategy", "*.yaml")))
STAGE_CONFIGS = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))


def test_strategy_names_and_class_paths_are_recognised():
    assert strategy_kind("auto") == strategy_kind(None) == "single"
    assert strategy_kind("ddp_find_unused_parameters_true") == "ddp"
    assert strategy_kind({"class_path": "lightning.pytorch.strategies.DDPStrategy"}) == "ddp"
    assert strategy_kind("fsdp") == "fsdp"
    assert strategy_kind("deepspeed_stage_2") == "deepspeed2"
    assert strategy_kind("deepspeed_stage_3_offload") == "deepspeed3"
    assert strategy_kind({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
                          "init_args": {"stage": 3}}) == "deepspeed3"  # fmt: skip
    assert strategy_kind({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}) == "modelparallel"
    assert strategy_kind(FSDP2) == "fsdp2"


LORA = {"lora": {"r": 8}}


@pytest.mark.parametrize("strategy, accelerator, args, message", [
    ("fsdp", "cpu", LORA, "FSDPStrategy \\(FSDP1\\) needs CUDA"),
    ("deepspeed_stage_2", "cpu", LORA, "DeepSpeed needs CUDA"),
    ("fsdp", "gpu", LORA, "FSDP1\\) is not shipped by qgen: its checkpoints are read back with full unpickling"),
    ("deepspeed_stage_3", "gpu", LORA, "DeepSpeed is not shipped"),
    ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, "cpu", LORA, "tensor parallelism"),
    (FSDP2, "gpu", {**LORA, "quantization": "nf4"}, "model.quantization nf4: FSDP2 cannot shard"),
    (FSDP2, "gpu", {**LORA, "teacher_quantization": "int8"}, "teacher_quantization null"),
    (FSDP2, "cpu", {"lora": None}, "model.lora null"),
    (FSDP2, "gpu", {**LORA, "backend": "vllm", "vllm": {"weight_sync": "adapter"}}, "would be saved from shards"),
])  # fmt: skip
def test_each_refused_combination_says_why(strategy, accelerator, args, message):
    with pytest.raises(StrategyError, match=message):
        check_strategy(strategy, accelerator, args)


def test_allowed_combinations_pass():
    check_strategy("ddp", "cpu", {"quantization": "nf4", "backend": "vllm", "lora": None})
    check_strategy(None, "cpu", {"lora": None})
    check_strategy(FSDP2, "cpu", LORA)  # FSDP2 has a CPU path (gloo): tested in test_sharding.py
    check_strategy(FSDP2, "gpu", {**LORA, "dtype": "bfloat16", "teacher_quantization": None})
    check_strategy(FSDP2, "cpu", {**LORA, "backend": "vllm"})  # the merged push, gathered parameter by parameter


def test_the_cli_refuses_before_creating_anything(tmp_path):
    with pytest.raises(StrategyError, match="FSDP1\\) needs CUDA"):
        cli_main(["fit", "--config", os.path.join(CONFIGS, "sft.yaml"), "--trainer.strategy=fsdp",
                  "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    assert os.listdir(tmp_path) == []  # no version folder claimed, no model loaded


def _composed(config, overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", config, "--config", overlay, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("overlay", STRATEGY_OVERLAYS, ids=os.path.basename)
def test_every_strategy_overlay_composes_with_every_stage(overlay, capsys):
    """Each overlay parses with each stage config and changes only the strategy (and, for FSDP2, the base
    precision); the check passes for every LoRA stage and names the option to change for the others.
    """
    for config in STAGE_CONFIGS:
        cfg = _composed(config, overlay, capsys)
        strategy, args = cfg["trainer"]["strategy"], cfg["model"]["init_args"]
        assert strategy["class_path"] in ("qgen.strategies.FSDP2Strategy", "lightning.pytorch.strategies.DDPStrategy")
        if strategy_kind(strategy) == "ddp":
            check_strategy(strategy, "gpu", args)
            continue
        assert args["quantization"] is None and args["dtype"] == "bfloat16"
        if args["lora"] is None:  # the embedded default's full fine-tuning configs
            with pytest.raises(StrategyError, match="model.lora null"):
                check_strategy(strategy, "gpu", args)
        elif args.get("teacher_quantization"):  # Qwen3-32B NF4 teacher: must be bf16 to be sharded
            with pytest.raises(StrategyError, match="teacher_quantization null"):
                check_strategy(strategy, "gpu", args)
        else:
            check_strategy(strategy, "gpu", args)


def test_shipped_overlays_are_the_documented_ones():
    assert [os.path.basename(p) for p in STRATEGY_OVERLAYS] == ["ddp.yaml", "fsdp2-lora.yaml"]


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_activation_checkpointing_is_never_reentrant(quantization):
    """Reentrant checkpointing breaks DDP ("mark a variable ready only once"); peft's QLoRA preparation passes
    no arguments, and torch's default is reentrant: qgen's loader must ask for the other form on both paths.
    """
    from qgen.models import LoraSpec, load_causal_lm

    model = load_causal_lm(None, LoraSpec(r=4), quantization, "float32", gradient_checkpointing=True, device="cpu")
    funcs = [m._gradient_checkpointing_func for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert funcs and all(f.keywords.get("use_reentrant") is False for f in funcs)


def test_the_solver_reward_is_refused_under_fsdp2():
    """Each rank solves a data-dependent number of questions: over sharded layers the ranks would hang."""
    from types import SimpleNamespace

    from callbacks import SolverDifficulty
    from qgen.strategies import FSDP2Strategy

    with pytest.raises(StrategyError, match="under FSDP2 use the difficulty model"):
        SolverDifficulty().setup(SimpleNamespace(strategy=FSDP2Strategy()), None, "fit")
