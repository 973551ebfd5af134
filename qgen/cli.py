"""``python -m qgen``: a LightningCLI whose stage is chosen by the module class.

    python -m qgen fit --config configs/sft.yaml
    python -m qgen fit --config configs/sft.yaml --ckpt_path last          # resume the newest run
    python -m qgen fit --model qgen.SFTModule --print_config > my.yaml      # a complete config

``--ckpt_path last`` is resolved to ``lightning_logs/version_N/checkpoints/last.ckpt`` of the newest
version that has one from the same module class (under the logger's ``save_dir``), so resuming needs no
path typing.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

import callbacks  # noqa: F401  (registers callback classes for `trainer.callbacks` in YAML)
from callbacks.guards import FiniteGuard, HangWatchdog, NonFiniteError
from callbacks.memory import MemoryMonitor
from qgen.audit import EngineMismatchError
from qgen.backends import BackendError
from qgen.backends.vllm import BackendUnavailableError
from qgen.checkpointing import (
    CheckpointError,
    SafeCheckpointIO,
    find_last_checkpoint,
    load_checkpoint_file,
    locate_source,
    same_class,
)
from qgen.data import QuestionDataModule
from qgen.endpoint import EndpointError
from qgen.preflight import MODES, PreflightError, check_model_files, run_preflight
from qgen.records import DataError
from qgen.strategies import StrategyError, check_strategy

VERSION_ENV = "QGEN_RUN_FOLDER"  # the run folder rank 0 claimed, inherited by the DDP workers it launches


def _env_rank() -> int:
    """This process's global rank as the launcher's environment tells it (0 when there is none)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


CLAIMED: list[str] = []  # run folders made by this process, removed again if the run fails before writing to them


def claim_version_dir(root: str, name: str) -> int:
    """The next free ``version_N`` under ``root/name``, created here with ``mkdir`` (which fails if another run
    got there first, and then the next number is tried): two runs started together never share a folder.
    """
    parent = os.path.join(root, name) if name else root
    os.makedirs(parent, exist_ok=True)
    taken = [int(d.removeprefix("version_")) for d in os.listdir(parent)
             if d.startswith("version_") and d.removeprefix("version_").isdigit()]  # fmt: skip
    version = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(os.path.join(parent, f"version_{version}"))
            CLAIMED.append(os.path.join(parent, f"version_{version}"))
            return version
        except FileExistsError:
            version += 1


# model arguments that only steer sampling
GENERATION_ARGS = ("generation", "max_new_tokens", "temperature", "top_p", "backend", "vllm")


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
    planned_gb: float | None = None  # the memory pre-flight's per-device plan (fit)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")
        parser.add_argument("--preflight", choices=MODES, default="refuse",
                            help="fit's memory pre-flight (qgen.preflight): refuse a run planned above 90%% of the "
                                 "free memory, warn and start, or skip the check")  # fmt: skip

    def _save_dir(self, config) -> tuple[str, str]:
        """``(save_dir, name)`` of the run's logger: where ``version_N`` folders and checkpoints go."""
        save_dir, name = config.trainer.default_root_dir or ".", "lightning_logs"
        logger = config.trainer.get("logger")
        if hasattr(logger, "init_args"):
            save_dir = logger.init_args.get("save_dir") or save_dir
            name = logger.init_args.get("name", name) or ""
        return save_dir, name

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        starting = None  # where the checkpoint says its starting policy (init_from) is
        if config is not None and config.get("ckpt_path"):
            if config.ckpt_path == "last":
                save_dir, name = self._save_dir(config)
                config.ckpt_path = find_last_checkpoint(os.path.join(save_dir, name), config.model.get("class_path"))
                print(f"resuming from {config.ckpt_path}")
            # checked before the logger makes a run folder: a bad path fails with one line and leaves nothing
            loaded = load_checkpoint_file(config.ckpt_path, mmap=True)
            hparams = loaded.get("hyper_parameters") or {}
            starting = (loaded.get("qgen") or {}).get("init_from")
            saved, wanted = hparams.get("_class_path"), config.model.get("class_path") if config.get("model") else None
            if saved and wanted and not same_class(saved, wanted):
                raise CheckpointError(
                    f"--ckpt_path {config.ckpt_path} was written by {saved}, but this run is {wanted}: --ckpt_path "
                    f"resumes a run of the same stage. To start {wanted} from that model, pass it as "
                    "--model.init_args.init_from (GRPO) or --model.init_args.teacher (distillation)"
                )
        # Lightning overwrites the model's arguments with the checkpoint's hyperparameters. For predict and
        # test the sampling settings of this command (config or command line) must win over training's.
        kept = {}
        if subcommand in ("predict", "test") and self.config[subcommand].get("model") is not None:
            init_args = self.config[subcommand].model.get("init_args") or {}
            kept = {k: init_args[k] for k in GENERATION_ARGS if k in init_args}
        super()._parse_ckpt_path()
        for key, value in kept.items():
            self.config[subcommand].model.init_args[key] = value
        init_args = self.config[subcommand].model.get("init_args") if config is not None and config.get("model") else None
        if config is not None and config.get("ckpt_path") and init_args is not None and init_args.get("init_from"):
            # a run folder that moved: its starting policy is found beside the checkpoint (and checked by hash)
            init_args["init_from"] = locate_source(config.ckpt_path, init_args["init_from"], starting)

    def before_instantiate_classes(self) -> None:
        """Checks that need no model, then the run folder: paths first (one clear line, no folder left behind),
        then ``version_N`` claimed atomically for ``fit``.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        init_args = config.model.get("init_args") if config.get("model") is not None else None
        if init_args is not None:  # a strategy that cannot run this model: one line, before anything is built
            check_strategy(config.trainer.get("strategy"), config.trainer.get("accelerator"), init_args)
        if subcommand == "fit" and init_args is not None:  # memory, from the architecture alone: no weight read yet
            verdict = run_preflight(config.as_dict(), config.get("preflight") or "refuse")
            self.planned_gb = None if verdict is None else verdict.planned / 1e9
        if init_args is not None:  # then the model's files: cached or reachable, else one line
            check_model_files(init_args.get("model_name_or_path"), init_args.get("teacher"))
        init_from = init_args.get("init_from") if init_args is not None else None
        if init_from:
            if not os.path.exists(init_from):
                raise CheckpointError(
                    f"--model.init_args.init_from {init_from}: no such checkpoint file or adapter folder"
                )
            if os.path.isfile(init_from):
                load_checkpoint_file(init_from, mmap=True)  # readable and safe, before anything is created
            init_args["init_from"] = os.path.abspath(init_from)  # checkpoints must work from any folder
        logger = config.trainer.get("logger")
        if subcommand == "fit" and hasattr(logger, "init_args") and logger.init_args.get("version") is None:
            if logger.class_path.rsplit(".", 1)[-1] in ("TensorBoardLogger", "CSVLogger"):
                save_dir, name = self._save_dir(config)
                parent = os.path.abspath(os.path.join(save_dir, name) if name else save_dir)
                inherited = os.environ.get(VERSION_ENV, "")
                if inherited.startswith(parent + os.sep + "version_"):
                    # a DDP worker started by rank 0 (Lightning's launcher copies the environment): rank 0's folder
                    logger.init_args["version"] = int(inherited.rsplit("version_", 1)[1])
                elif _env_rank() == 0:
                    logger.init_args["version"] = claim_version_dir(save_dir, name)
                    os.environ[VERSION_ENV] = os.path.join(parent, f"version_{logger.init_args['version']}")
                # other ranks started by an external launcher (torchrun, SLURM) claim nothing: rank 0 writes the
                # logs, and the checkpoint folder is rank 0's (Lightning broadcasts it)

    def instantiate_trainer(self, **kwargs):
        """Every run writes and reads checkpoints through :class:`qgen.checkpointing.SafeCheckpointIO`."""
        plugins = kwargs.pop("plugins", None) or self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else ([plugins] if plugins else [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        if self.subcommand == "fit":  # the guards (README, "When something goes wrong"), unless configured
            for kind, make in ((MemoryMonitor, lambda: MemoryMonitor(self.planned_gb)), (HangWatchdog, HangWatchdog),
                               (FiniteGuard, FiniteGuard)):  # fmt: skip
                if not any(isinstance(c, kind) for c in trainer.callbacks):  # first: before checkpointing's hooks
                    trainer.callbacks.insert(0, make())
        return trainer


def cli_main(args: ArgsType = None, run: bool = True, prog: str | None = None) -> QGenCLI:
    try:
        return QGenCLI(
            LightningModule,
            QuestionDataModule,
            subclass_mode_model=True,
            args=args,
            run=run,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"prog": prog} if prog else {},
        )
    except BaseException:
        for folder in CLAIMED:  # a run that failed at start leaves no empty version_N behind
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise
    finally:
        CLAIMED.clear()
        os.environ.pop(VERSION_ENV, None)  # the next run in this process claims its own folder


def main(args: list[str] | None = None, prog: str | None = None) -> None:
    """The Lightning commands (``fit``, ``validate``, ``test``, ``predict``), bad input answered in one line."""
    try:
        cli_main(args, prog=prog)
    except DataError as err:  # bad input: one clear line, not a traceback
        print(f"qgen: data error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as err:
        print(f"qgen: checkpoint error: {err}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as err:
        print(f"qgen: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (BackendUnavailableError, BackendError, StrategyError, PreflightError, EndpointError) as err:
        print(f"qgen: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteError, EngineMismatchError) as err:
        print(f"qgen: error: {err}", file=sys.stderr)
        sys.exit(3)
