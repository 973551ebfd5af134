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
FSDP1 = {"class_path": "qgen.strategies.FSDP1Strategy"}
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
    assert strategy_kind(FSDP1) == strategy_kind({**FSDP1, "init_args": {"param_dtype": "auto"}}) == "fsdp1"


LORA = {"lora": {"r": 8}}


@pytest.mark.parametrize("strategy, accelerator, args, message", [
    ("fsdp", "gpu", LORA, "FSDPStrategy as it is would wrap the whole module in one unit.*fsdp-qlora.yaml"),
    ("deepspeed_stage_2", "cpu", LORA, "DeepSpeed needs CUDA"),
    ("deepspeed_stage_3", "gpu", LORA, "DeepSpeed is not shipped"),
    (FSDP1, "gpu", {**LORA, "quantization": "int8"}, "FSDP1 shards 4-bit \\(nf4\\) weights only"),
    (FSDP1, "gpu", {**LORA, "quantization": "nf4", "dtype": "float32"}, "must be bfloat16 \\(bnb_4bit_quant_storage"),
    ({**FSDP1, "init_args": {"param_dtype": "float32"}}, "gpu", {**LORA, "quantization": "nf4", "dtype": "bfloat16"},
     "a float32 base: under FSDP the 4-bit weights are stored in FSDP's param dtype"),
    (FSDP1, "gpu", {**LORA, "dtype": "bfloat16", "teacher_quantization": "nf4", "teacher_dtype": "float16"},
     "model.teacher_quantization nf4 and a float16 base"),
    (FSDP1, "gpu", {"lora": None}, "FSDP1 path trains LoRA adapters"),
    (FSDP1, "cpu", {**LORA, "backend": "vllm"}, "backend vllm: the engine's weight push is built for FSDP2"),
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
    check_strategy(FSDP1, "gpu", {**LORA, "quantization": "nf4", "dtype": "bfloat16"})  # as the overlay ships it
    check_strategy(FSDP1, "cpu", {**LORA, "quantization": "nf4", "dtype": "bfloat16"})  # bitsandbytes' CPU kernels
    check_strategy(FSDP1, "cpu", {**LORA, "dtype": "float32"})  # fp32 LoRA: torch's FSDP1 CPU path (test_sharding)


def test_the_cli_refuses_before_creating_anything(tmp_path):
    with pytest.raises(StrategyError, match="DeepSpeed needs CUDA"):
        cli_main(["fit", "--config", os.path.join(CONFIGS, "sft.yaml"), "--trainer.strategy=deepspeed_stage_2",
                  "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    assert os.listdir(tmp_path) == []  # no version folder claimed, no model loaded


def _composed(config, overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", config, "--config", overlay, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("overlay", STRATEGY_OVERLAYS, ids=os.path.basename)
def test_every_strategy_overlay_composes_with_every_stage(overlay, capsys):
    """Each overlay parses with each stage config and changes only the strategy (and, for FSDP, the base
    precision and quantization); the check passes for every LoRA stage and names the option to change for the
    others.
    """
    for config in STAGE_CONFIGS:
        cfg = _composed(config, overlay, capsys)
        strategy, args = cfg["trainer"]["strategy"], cfg["model"]["init_args"]
        assert strategy["class_path"] in ("qgen.strategies.FSDP2Strategy", "qgen.strategies.FSDP1Strategy",
                                          "lightning.pytorch.strategies.DDPStrategy")  # fmt: skip
        if strategy_kind(strategy) == "ddp":
            check_strategy(strategy, "gpu", args)
            continue
        fsdp1 = strategy_kind(strategy) == "fsdp1"
        assert args["quantization"] == ("nf4" if fsdp1 else None) and args["dtype"] == "bfloat16"
        if fsdp1 and args["lora"] is not None:  # QLoRA sharded: the teacher may stay 4-bit too (bf16 storage)
            check_strategy(strategy, "gpu", args)
            continue
        if args["lora"] is None:  # the embedded default's full fine-tuning configs
            with pytest.raises(StrategyError, match="model.lora null"):
                check_strategy(strategy, "gpu", args)
        elif args.get("teacher_quantization"):  # Qwen3-32B NF4 teacher: must be bf16 to be sharded
            with pytest.raises(StrategyError, match="teacher_quantization null"):
                check_strategy(strategy, "gpu", args)
        else:
            check_strategy(strategy, "gpu", args)


def test_shipped_overlays_are_the_documented_ones():
    assert [os.path.basename(p) for p in STRATEGY_OVERLAYS] == ["ddp.yaml", "fsdp-qlora.yaml", "fsdp2-lora.yaml"]


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_activation_checkpointing_is_never_reentrant(quantization):
    """Reentrant checkpointing breaks DDP ("mark a variable ready only once"); peft's QLoRA preparation passes
    no arguments, and torch's default is reentrant: qgen's loader must ask for the other form on both paths.
    """
    from qgen.models import LoraSpec, load_causal_lm

    model = load_causal_lm(None, LoraSpec(r=4), quantization, "float32", gradient_checkpointing=True, device="cpu")
    funcs = [m._gradient_checkpointing_func for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert funcs and all(f.keywords.get("use_reentrant") is False for f in funcs)


def test_the_solver_reward_is_refused_under_fsdp():
    """Each rank solves a data-dependent number of questions: over sharded layers the ranks would hang."""
    from types import SimpleNamespace

    from callbacks import SolverDifficulty
    from qgen.strategies import FSDP1Strategy, FSDP2Strategy

    for strategy in (FSDP2Strategy(), FSDP1Strategy()):
        with pytest.raises(StrategyError, match="under FSDP use the difficulty model"):
            SolverDifficulty().setup(SimpleNamespace(strategy=strategy), None, "fit")


def test_a_plain_trainer_gets_the_same_refusal_as_the_command_line(tmp_path):
    """The checks run from the stage's ``setup``, so a notebook's ``L.Trainer(strategy=...)`` is refused in one
    line too, before any model is built.
    """
    import lightning as L
    import torch

    from qgen.data import QuestionDataModule
    from qgen.sft import SFTModule
    from qgen.strategies import FSDP2Strategy

    module = SFTModule(lora=None)
    environ = dict(os.environ)
    try:
        trainer = L.Trainer(strategy=FSDP2Strategy(), accelerator="cpu", devices=1, max_steps=1, logger=False,
                            enable_checkpointing=False, default_root_dir=str(tmp_path))  # fmt: skip
        with pytest.raises(StrategyError, match="fsdp2 with model.lora null") as refused:
            trainer.fit(module, datamodule=QuestionDataModule(batch_size=2))
    finally:  # the strategy's one-process group and its environment must not leak into later tests
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert "\n" not in str(refused.value) and module.model is None
