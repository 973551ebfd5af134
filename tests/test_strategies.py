"""Start-up checks of ``trainer.strategy`` against the run (qgen.strategies): one line, nothing created."""

import os

import pytest
from conftest import CONFIGS

from qgen.cli import cli_main
from qgen.strategies import StrategyError, check_strategy, strategy_kind


def test_strategy_names_and_class_paths_are_recognised():
    assert strategy_kind("auto") == strategy_kind(None) == "single"
    assert strategy_kind("ddp_find_unused_parameters_true") == "ddp"
    assert strategy_kind("fsdp") == "fsdp"
    assert strategy_kind("deepspeed_stage_2") == "deepspeed2"
    assert strategy_kind("deepspeed_stage_3_offload") == "deepspeed3"
    assert strategy_kind({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
                          "init_args": {"stage": 3}}) == "deepspeed3"  # fmt: skip
    assert strategy_kind({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}) == "fsdp2"


@pytest.mark.parametrize("strategy, accelerator, cls, args, message", [
    ("fsdp", "cpu", "qgen.SFTModule", {}, "FSDPStrategy \\(FSDP1\\) needs CUDA"),
    ("deepspeed_stage_2", "cpu", "qgen.SFTModule", {}, "DeepSpeed needs CUDA"),
    ("fsdp", "gpu", "qgen.SFTModule", {"quantization": "nf4"}, "bnb_4bit_quant_storage"),
    ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, "gpu", "qgen.SFTModule",
     {"quantization": "nf4"}, "FSDP2 cannot shard"),
    ("deepspeed_stage_2", "gpu", "qgen.SFTModule", {"quantization": "int8"}, "DeepSpeed does not take"),
    ("deepspeed_stage_2", "gpu", "qgen.GRPOModule", {"backend": "vllm"}, "weight push reads full parameters"),
    ("deepspeed_stage_3", "gpu", "qgen.GRPOModule", {}, "generation over sharded parameters"),
    ("fsdp", "gpu", "qgen.DistillModule", {"lmbda": 0.1}, "generation over sharded parameters"),
])  # fmt: skip
def test_each_refused_combination_says_why(strategy, accelerator, cls, args, message):
    with pytest.raises(StrategyError, match=message):
        check_strategy(strategy, accelerator, cls, args)


def test_allowed_combinations_pass():
    check_strategy("ddp", "cpu", "qgen.GRPOModule", {"quantization": "nf4", "backend": "vllm"})
    check_strategy("deepspeed_stage_2", "gpu", "qgen.GRPOModule", {})  # ZeRO-2 keeps whole parameters
    check_strategy("fsdp", "gpu", "qgen.DistillModule", {"lmbda": 0.0})
    check_strategy({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, "gpu", "qgen.SFTModule", {})
    with pytest.raises(StrategyError, match="predict generates"):
        check_strategy("fsdp", "gpu", "qgen.SFTModule", {}, "predict")


def test_the_cli_refuses_before_creating_anything(tmp_path):
    with pytest.raises(StrategyError, match="FSDP1\\) needs CUDA"):
        cli_main(["fit", "--config", os.path.join(CONFIGS, "sft.yaml"), "--trainer.strategy=fsdp",
                  "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    assert os.listdir(tmp_path) == []  # no version folder claimed, no model loaded
