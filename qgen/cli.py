"""``python -m qgen``: a LightningCLI whose stage is chosen by the module class.

    python -m qgen fit --config configs/sft.yaml
    python -m qgen fit --config configs/sft.yaml --ckpt_path last          # resume the newest run
    python -m qgen fit --model qgen.SFTModule --print_config > my.yaml      # a complete config

``--ckpt_path last`` is resolved to ``lightning_logs/version_N/checkpoints/last.ckpt`` of the newest
version that has one from the same module class (under the logger's ``save_dir``), so resuming needs no
path typing.
"""

from __future__ import annotations

import glob
import os
import sys

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

import callbacks  # noqa: F401  (registers callback classes for `trainer.callbacks` in YAML)
from qgen.data import QuestionDataModule
from qgen.records import DataError


def find_last_checkpoint(root: str = "lightning_logs", class_path: str | None = None) -> str:
    """The newest ``version_N/checkpoints/last.ckpt`` under ``root`` written by a ``class_path`` module.

    Filtering by the module class keeps ``--ckpt_path last`` of a GRPO run from picking up the SFT run
    that it was started from (both live under ``lightning_logs/``).
    """
    import torch

    found = sorted(glob.glob(os.path.join(root, "**", "checkpoints", "last.ckpt"), recursive=True),
                   key=os.path.getmtime, reverse=True)  # fmt: skip
    for path in found:
        if class_path is None:
            return path
        hparams = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        if hparams.get("_class_path") == class_path:
            return path
    which = f" from {class_path}" if class_path else ""
    raise FileNotFoundError(f"--ckpt_path last: no last.ckpt{which} under {root}/; run `fit` first or give a path")


GENERATION_ARGS = ("generation", "max_new_tokens", "temperature", "top_p")  # model arguments that only steer sampling


class RunConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` into the run's log directory, and nowhere when there is none: with
    ``trainer.logger: false`` (e.g. ``predict``) Lightning's log_dir is the working directory, where a
    ``config.yaml`` of the user's own must not be overwritten.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class QGenCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") == "last":
            config = self.config[subcommand]
            save_dir = config.trainer.default_root_dir or "."
            logger = config.trainer.get("logger")
            if hasattr(logger, "init_args") and logger.init_args.get("save_dir"):
                save_dir = logger.init_args.save_dir
            elif save_dir == ".":
                save_dir = "lightning_logs"
            config.ckpt_path = find_last_checkpoint(save_dir, config.model.get("class_path"))
            print(f"resuming from {config.ckpt_path}")
        # Lightning overwrites the model's arguments with the checkpoint's hyperparameters. For predict and
        # test the sampling settings of this command (config or command line) must win over training's.
        kept = {}
        if subcommand in ("predict", "test") and self.config[subcommand].get("model") is not None:
            init_args = self.config[subcommand].model.get("init_args") or {}
            kept = {k: init_args[k] for k in GENERATION_ARGS if k in init_args}
        super()._parse_ckpt_path()
        for key, value in kept.items():
            self.config[subcommand].model.init_args[key] = value


def cli_main(args: ArgsType = None, run: bool = True) -> QGenCLI:
    return QGenCLI(
        LightningModule,
        QuestionDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main() -> None:
    try:
        cli_main()
    except DataError as err:  # bad input: one clear line, not a traceback
        print(f"qgen: data error: {err}", file=sys.stderr)
        sys.exit(2)
