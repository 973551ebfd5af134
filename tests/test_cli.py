"""The CLI end to end: every config parses, SFT trains and resumes exactly, bad input fails cleanly, DDP runs."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import CONFIGS, SHARED, needs_shared, run_qgen, scalars, write_jsonl

from qgen.cli import cli_main

STAGE_CONFIGS = sorted(p for p in glob.glob(os.path.join(CONFIGS, "*.yaml")))
OVERLAYS = sorted(glob.glob(os.path.join(CONFIGS, "*", "*.yaml")))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _print_config(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=os.path.basename)
def test_stage_config_parses_and_round_trips(config, capsys, tmp_path):
    printed = _print_config(["--config", config], capsys)
    assert "class_path: qgen." in printed and "ModelCheckpoint" in printed and "save_last: true" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    assert _print_config(["--config", str(tmp_path / "printed.yaml")], capsys) == printed


@pytest.mark.parametrize("overlay", OVERLAYS, ids=os.path.basename)
def test_overlay_composes_with_every_stage(overlay, capsys):
    import yaml

    for config in STAGE_CONFIGS:
        composed = _print_config(["--config", config, "--config", overlay], capsys)
        assert "sources:" in composed
        # an overlay of data sources or prompts never changes the stage's lengths
        alone = yaml.safe_load(_print_config(["--config", config], capsys))["data"]["max_length"]
        assert yaml.safe_load(composed)["data"]["max_length"] == alone, config


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", os.path.join(CONFIGS, "sft.yaml"), "--model.init_args.lora_rank=4"])
    assert exit_info.value.code != 0
    assert "lora_rank" in capsys.readouterr().err


def _sft_args(save_dir, steps, *extra):
    return [
        "fit",
        "--config",
        os.path.join(CONFIGS, "sft.yaml"),
        f"--trainer.max_steps={steps}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=1000",
        "--trainer.limit_val_batches=0",
        *QUIET,
        *extra,
    ]


@pytest.mark.parametrize("lora", [[], ["--model.init_args.lora.r=8", "--model.init_args.lora.dropout=0.1"]],
                         ids=["full", "lora-dropout"])  # fmt: skip
def test_resume_reproduces_the_uninterrupted_run(tmp_path, lora):
    """20 steps straight == 10 steps, then `--ckpt_path last` for 10 more: same train loss at every step.

    With LoRA dropout, the resumed steps must also draw the same dropout masks (the RNG state is checkpointed).
    """
    ckpt_every = ["--trainer.callbacks.init_args.every_n_train_steps=10", *lora]
    cli_main(_sft_args(tmp_path / "straight", 20, *ckpt_every))
    cli_main(_sft_args(tmp_path / "split", 10, *ckpt_every))
    cli_main(_sft_args(tmp_path / "split", 20, *ckpt_every, "--ckpt_path", "last"))
    straight = scalars(tmp_path / "straight" / "lightning_logs" / "version_0", "train/loss")
    first = scalars(tmp_path / "split" / "lightning_logs" / "version_0", "train/loss")
    second = scalars(tmp_path / "split" / "lightning_logs" / "version_1", "train/loss")
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10, 20))
    resumed = {**first, **second}
    for step in range(20):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step


def test_extending_max_steps_continues_the_epoch_and_the_schedule(tmp_path, capsys):
    """--trainer.max_steps=10, then 20 with --ckpt_path last (warm-up 3, so the horizon shows):

    - with ``total_steps`` set, the extended run IS the 20-step run: same data order, losses and LRs (before
      the fix the resumed run started a new epoch and skipped the rest of the first one);
    - with the default horizon (``max_steps``), it is recomputed at resume (and said so): from step 10 on the
      LR is the 20-step run's, never the first run's floor.
    """
    warm = ["--trainer.callbacks.init_args.every_n_train_steps=1000",
            "--model.init_args.scheduler.init_args.warmup_steps=3"]  # fmt: skip
    fixed = [*warm, "--model.init_args.scheduler.init_args.total_steps=20"]
    cli_main(_sft_args(tmp_path / "straight", 20, *fixed))
    cli_main(_sft_args(tmp_path / "fixed", 10, *fixed))
    cli_main(_sft_args(tmp_path / "fixed", 20, *fixed, "--ckpt_path", "last"))
    cli_main(_sft_args(tmp_path / "auto", 10, *warm))
    capsys.readouterr()
    cli_main(_sft_args(tmp_path / "auto", 20, *warm, "--ckpt_path", "last"))
    assert "horizon recomputed from max_steps: 10 -> 20" in capsys.readouterr().out

    def run(name, tag):
        logs = tmp_path / name / "lightning_logs"
        return {**scalars(logs / "version_0", tag), **scalars(logs / "version_1", tag)} if name != "straight" else \
            scalars(logs / "version_0", tag)  # fmt: skip

    straight, fixed_loss = run("straight", "train/loss"), run("fixed", "train/loss")
    assert sorted(fixed_loss) == list(range(20))
    for step in range(20):
        assert fixed_loss[step] == pytest.approx(straight[step], abs=1e-6), step
    straight_lr, auto_lr = run("straight", "train/lr"), run("auto", "train/lr")
    for step in range(10, 20):
        assert auto_lr[step] == pytest.approx(straight_lr[step], rel=1e-5), step
    assert auto_lr[10] > 3 * auto_lr[9]  # the first run had decayed near its floor by step 9; step 10 is back on course


@pytest.mark.slow
def test_sft_cli_trains_and_writes_run_files(tmp_path):
    proc = run_qgen(_sft_args(tmp_path, 30)[0:] + ["--trainer.limit_val_batches=4", "--trainer.val_check_interval=30"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    for name in ("config.yaml", "data_summary.json", "hparams.yaml", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert glob.glob(str(run / "events.out.tfevents.*"))
    loss = scalars(run, "train/loss")
    first, last = sum(loss[s] for s in range(5)) / 5, sum(loss[s] for s in range(25, 30)) / 5
    print(f"train/loss: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last < first - 0.25
    for tag in ("train/lr", "train/tokens_per_s", "val/loss", "val/ppl"):
        assert scalars(run, tag), tag
    # the memory pre-flight planned it (it fits) and the run logged its plan once and its peak at every log step
    planned, peak = scalars(run, "sys/planned_peak_gb"), scalars(run, "sys/peak_mem_gb")
    assert len(planned) == 1 and 0.5 < list(planned.values())[0] < 5  # the embedded model: under a GB + reserve
    assert len(peak) >= 29 and all(v > 0.1 for v in peak.values())  # resident memory of a torch process
    assert re.search(r"memory: planned \d+\.\d\d GB per device, measured \d+\.\d\d GB", proc.stdout)


@pytest.mark.slow
def test_broken_jsonl_fails_with_file_and_line_and_keeps_earlier_runs(tmp_path):
    earlier = tmp_path / "lightning_logs" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "metrics.txt").write_text("earlier run")
    good = {"question": "What is 1+1?", "answer": "2"}
    bad = write_jsonl(tmp_path / "broken.jsonl", [good, good, '{"question": "oops", "answer": '])
    proc = run_qgen(_sft_args(tmp_path, 2, f'--data.sources=[{{"format": "jsonl", "path": "{bad}"}}]'))
    assert proc.returncode != 0
    assert "broken.jsonl, line 3: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (earlier / "metrics.txt").read_text() == "earlier run"
    assert os.listdir(tmp_path / "lightning_logs") == ["version_0"]  # no half-made run either


@pytest.mark.slow
@needs_shared
def test_shared_overlay_summary_reports_exact_record_counts(tmp_path):
    proc = run_qgen(_sft_args(tmp_path, 1, "--config", os.path.join(CONFIGS, "data", "shared.yaml")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "lightning_logs" / "version_0" / "data_summary.json").read_text())
    n_gaokao = sum(
        len(json.load(open(p, encoding="utf-8"))["example"])
        for p in glob.glob(os.path.join(SHARED, "gaokao_bench", "*", "*.json"))
    )
    count = lambda p: sum(1 for line in open(os.path.join(SHARED, p), encoding="utf-8") if line.strip())  # noqa: E731
    assert summary["records_per_source"] == {
        "math-train": count("math/train.jsonl"),
        "gaokao-bench": n_gaokao,
        "tal-scq5k-zh-train": count("tal_scq5k/ch_single_choice_constructed_5K/ch_single_choice_train_3K.jsonl"),
        "tal-scq5k-en-train": count("tal_scq5k/en_single_choice_constructed_5K/en_single_choice_train_3K.jsonl"),
    }
    assert summary["split"]["train"] + summary["split"]["val"] == sum(summary["records_per_source"].values())


def test_ckpt_path_last_picks_the_newest_checkpoint_of_the_same_module(tmp_path):
    import time

    import torch

    from qgen.cli import find_last_checkpoint

    for version, cls in ((0, "qgen.SFTModule"), (1, "qgen.GRPOModule"), (2, "qgen.SFTModule")):
        path = tmp_path / f"version_{version}" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({"hyper_parameters": {"_class_path": cls}}, path)
        time.sleep(0.01)
    assert find_last_checkpoint(str(tmp_path), "qgen.SFTModule").endswith("version_2/checkpoints/last.ckpt")
    assert find_last_checkpoint(str(tmp_path), "qgen.GRPOModule").endswith("version_1/checkpoints/last.ckpt")
    with pytest.raises(FileNotFoundError, match="no last.ckpt from qgen.DistillModule"):
        find_last_checkpoint(str(tmp_path), "qgen.DistillModule")


def test_only_global_rank_zero_claims_a_run_folder(tmp_path, monkeypatch):
    """Under an external launcher (torchrun / SLURM) every process parses the CLI: only rank 0 makes
    ``version_N``; a worker launched by rank 0 (the folder in its environment) uses rank 0's.
    """
    from qgen.cli import QGenCLI

    claimed = []
    monkeypatch.setattr(QGenCLI, "_run_subcommand", lambda self, sub: claimed.append(self.trainer.logger._version))
    args = ["fit", "--config", os.path.join(CONFIGS, "sft.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"]
    monkeypatch.setenv("RANK", "1")
    cli_main(args)
    assert claimed == [None] and not (tmp_path / "lightning_logs").exists()
    monkeypatch.setenv("RANK", "0")
    cli_main(args)
    assert claimed[-1] == 0 and os.listdir(tmp_path / "lightning_logs") == ["version_0"]
    assert "QGEN_RUN_FOLDER" not in os.environ  # cleared after the run: the next run claims its own
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("QGEN_RUN_FOLDER", str(tmp_path / "lightning_logs" / "version_0"))
    cli_main(args)
    assert claimed[-1] == 0 and os.listdir(tmp_path / "lightning_logs") == ["version_0"]


def test_both_entry_points_list_and_run_all_eight_commands(capsys):
    """`python -m qgen --help`, the `qgen` console script and an unknown command name all eight commands; each
    command answers `--help` under its own parser (Lightning's or argparse's) through the same dispatcher, and
    the console script runs a plain command (`qgen score` was "invalid choice") and a Lightning one.
    """
    from qgen.commands import COMMANDS
    from qgen.commands import main as qgen_main

    script = os.path.join(os.path.dirname(sys.executable), "qgen")
    assert len(COMMANDS) == 8 and os.path.exists(script)
    module_help = run_qgen(["--help"])
    assert module_help.returncode == 0 and "usage: python -m qgen COMMAND" in module_help.stdout
    unknown = run_qgen(["frobnicate"])
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr
    script_help = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert script_help.returncode == 0 and "usage: qgen COMMAND" in script_help.stdout
    for listing in (module_help.stdout, unknown.stderr, script_help.stdout):
        assert all(re.search(rf"^  {name} +\S", listing, re.M) for name in COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            qgen_main([name, "--help"], prog="qgen")
        assert exit_.value.code in (0, None), name
        assert re.search(rf"usage: (python -m )?qgen.* {name}", capsys.readouterr().out), name
    for args, expect in ((["score", "--help"], "usage: python -m qgen score"), (["fit", "--help"], "--ckpt_path")):
        proc = subprocess.run([script, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and expect in proc.stdout, proc.stderr[-500:]


def test_the_solver_launch_template_serves_the_model_the_config_asks_for(monkeypatch):
    """configs/launch/solver-grpo.sbatch is valid bash, serves the solver under the name the config's
    ServedSolverDifficulty asks for, and hands the writer the server's URL through QGEN_SOLVER_URL, which the
    callback takes over its base_url.
    """
    import yaml

    from callbacks import ServedSolverDifficulty

    path = os.path.join(CONFIGS, "launch", "solver-grpo.sbatch")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path, encoding="utf-8").read()
    config = yaml.safe_load(open(os.path.join(CONFIGS, "qwen3-14b-grpo-solver.yaml"), encoding="utf-8"))
    callbacks = config["trainer"]["callbacks"]
    served = [c["init_args"] for c in callbacks if c["class_path"].endswith("ServedSolverDifficulty")]
    assert len(served) == 1 and f"SOLVER_NAME=${{SOLVER_NAME:-{served[0]['model']}}}" in text
    assert '--served-model-name "$SOLVER_NAME"' in text and 'export QGEN_SOLVER_URL="$url"' in text
    monkeypatch.setenv("QGEN_SOLVER_URL", "http://node7:8000/v1")
    assert ServedSolverDifficulty(served[0]["base_url"], "m").served.endpoint.base_url == "http://node7:8000/v1"
