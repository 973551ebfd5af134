"""``python -m qgen pipeline``: the whole product on the embedded default, in one command.

    python -m qgen pipeline                      # SFT -> GRPO -> distillation -> sample questions
    python -m qgen pipeline --sft-steps 30 --grpo-steps 4 --distill-steps 10    # a smoke run

1. SFT (``configs/sft.yaml``) on the bundled question bank;
2. GRPO (``configs/grpo.yaml``) from the SFT checkpoint, rewarded by the four reward callbacks;
3. distillation (``configs/distill.yaml``): the GRPO model is the teacher, ``embedded:mini`` the student;
4. ``predict`` with the GRPO model and the distilled student on ``data/prompts/sample.jsonl``; the questions and
   their scores are printed and written to ``<root>/pipeline/predictions_<stage>.jsonl``.

Each stage is an ordinary ``python -m qgen fit`` run (its own ``version_N`` under ``lightning_logs/``, with
TensorBoard events and checkpoints), so any stage can be rerun or resumed on its own afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from qgen.records import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str) -> str:
    path = os.path.join("configs", name)
    return path if os.path.exists(path) else os.path.join(ROOT, "configs", name)


def run_stage(args: list[str]) -> str:
    """Run one ``fit`` through the CLI; returns its last.ckpt."""
    from qgen.cli import cli_main

    cli = cli_main(["fit", *args])
    ckpt = os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt")
    if not os.path.exists(ckpt):
        raise RuntimeError(f"the stage wrote no {ckpt}")
    return ckpt


def predict(config: str, ckpt: str, prompts: str, output: str, extra: list[str]) -> list[dict]:
    from qgen.cli import cli_main

    if os.path.exists(output):
        os.remove(output)
    cli_main(["predict", "--config", config, "--ckpt_path", ckpt, "--data.predict_prompts", prompts,
              "--trainer.logger", "false", "--trainer.callbacks", "callbacks.PredictionWriter",
              "--trainer.callbacks.output", output, *extra])  # fmt: skip
    with open(output, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def show(stage: str, rows: list[dict], width: int = 400) -> None:
    print(f"\n=== questions written by the {stage} model ===")
    for row in rows:
        s = row["scores"]
        print(f"\n[{row['key']}] {row['subject']} ({row['task']}) | difficulty {s['difficulty']:.2f} "
              f"rigor {s['rigor']:.2f} novelty {s['novelty']:.2f} educational {s['educational_value']:.2f} "
              f"| parsed: {row['valid']}")  # fmt: skip
        text = row["text"].strip()
        print(text[:width] + (" ..." if len(text) > width else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgen pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, help="override trainer.max_steps of configs/sft.yaml")
    parser.add_argument("--grpo-steps", type=int, help="override trainer.max_steps of configs/grpo.yaml")
    parser.add_argument("--distill-steps", type=int, help="override trainer.max_steps of configs/distill.yaml")
    parser.add_argument("--prompts", default=os.path.join(ROOT, "data", "prompts", "sample.jsonl"),
                        help="prompts JSONL for the final samples")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the final samples")
    parser.add_argument("--root", default=".", help="save_dir of the logger: runs go to ROOT/lightning_logs")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # the stages get their arguments from us, not from the command line
    common = ["--trainer.logger.init_args.save_dir", args.root]

    def steps(n: int | None) -> list[str]:
        if n is None:
            return []
        every = str(max(1, n // 2))
        return ["--trainer.max_steps", str(n), "--trainer.val_check_interval", every]

    timings = {}
    try:
        started = time.perf_counter()
        sft = run_stage(["--config", _config("sft.yaml"), *common, *steps(args.sft_steps)])
        timings["sft"] = time.perf_counter() - started
        started = time.perf_counter()
        grpo = run_stage(["--config", _config("grpo.yaml"), "--model.init_args.init_from", sft, *common,
                          *steps(args.grpo_steps)])  # fmt: skip
        timings["grpo"] = time.perf_counter() - started
        started = time.perf_counter()
        distill = run_stage(["--config", _config("distill.yaml"), "--model.init_args.teacher", grpo, *common,
                             *steps(args.distill_steps)])  # fmt: skip
        timings["distill"] = time.perf_counter() - started
        started = time.perf_counter()
        out_dir = os.path.join(args.root, "lightning_logs", "pipeline")
        os.makedirs(out_dir, exist_ok=True)
        results = {}
        temperature = str(args.temperature)
        for stage, config, ckpt, extra in (
            ("grpo", "grpo.yaml", grpo, ["--model.init_args.temperature", temperature]),
            ("distill", "distill.yaml", distill, ["--model.init_args.generation.temperature", temperature]),
        ):
            results[stage] = predict(_config(config), ckpt, args.prompts,
                                     os.path.join(out_dir, f"predictions_{stage}.jsonl"), extra)  # fmt: skip
        timings["predict"] = time.perf_counter() - started
    except DataError as err:
        print(f"qgen pipeline: data error: {err}", file=sys.stderr)
        return 2
    show("GRPO (teacher)", results["grpo"])
    show("distilled student (embedded:mini)", results["distill"])
    print("\ncheckpoints: " + ", ".join(f"{k} {v}" for k, v in (("sft", sft), ("grpo", grpo), ("distill", distill))))
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0
