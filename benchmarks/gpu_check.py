"""One-shot check of qgen on a bare CUDA machine with no network: the first CUDA figures, in order of value.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--only a b ...] [--budget-scale 1.0]
    python benchmarks/gpu_check.py --dry --out /tmp/x.json      # the same code path on the CPU, in about 2 min

Each part runs in its own process under its own time budget (a part that fails or runs out of time is
recorded as such, with the tail of its output, and the next one runs); after each part the results are
written to ``--out`` (JSON, one top-level entry per part, plus ``machine``) and to a Markdown table beside it
(``gpu_check.md``). Every model is a random-init model of an architecture qgen bundles (``random:<arch>``,
:mod:`qgen.random_init`): nothing is downloaded and no checkpoint is read. The data is the bundled ``data/``.

a. **QLoRA SFT, Qwen3-14B architecture**, ``configs/qwen3-14b-sft.yaml`` as written (NF4, bf16 compute,
   gradient checkpointing, batch 2 x 8 accumulated, max_length 2048): 10 optimizer steps; tokens/s, and the
   peak CUDA memory against ``qgen plan``'s figure for the same run (target: within 15%).
b. **GRPO, Qwen3-14B architecture**, ``configs/qwen3-14b-grpo.yaml`` (hf backend) with completions shortened
   to 128 tokens (768 in the config) to fit the budget: 2 steps; generation tokens/s, step time, peak vs plan.
c. **qgen vs TRL on Qwen3-1.7B, bf16 LoRA**: ``benchmarks/sft_throughput.py`` and ``grpo_throughput.py`` with
   ``--model random:Qwen3-1.7B --device cuda --dtype bfloat16`` (their rules: the same batches and work on
   both sides, alternating rounds): ``sft_vs_trl_gpu``, ``grpo_vs_trl_gpu``.
d. **Log-prob peak memory at vocabulary 151,936** (hidden 5120, 16 x 256 tokens, frozen head):
   ``benchmarks/logprob_memory.py``'s probes on CUDA, qgen vs TRL's chunked kernel (its Triton path; at
   TRL's chunk and at 4,096). Liger's fused linear cross-entropy is not measured: its wheel is not carried.
e. **The ``gpu``-marked tests** (``pytest -m gpu``).

Design points:
- *Tokenizer of a 151,936-id model*: the embedded tokenizer, extended with filler tokens to the model's
  vocabulary (:mod:`qgen.random_init`), so the embedding and output layer keep their real size (the plan's
  and the log-prob figures depend on it) and every id a random model samples decodes to text.
- *A random-init NF4 14B with no checkpoint*: each linear layer is drawn in bf16 on the GPU and quantized
  there at once (:func:`qgen.fourbit.quantize_linear`): about 10 GB of GPU memory, never the 29.5 GB of the
  bf16 model, nothing on disk.

The last line is ``parts_ok=N sft_vs_trl_gpu=… grpo_vs_trl_gpu=… logprob_mem_vs_trl_gpu=…`` (the ratios of the
parts that ran). Part d checks that every side computed the same log-probs and gradients; part c's scripts
assert their own same-work conditions.

``--dry`` runs every part through the same code (same commands and parsing) on the CPU with the embedded
default, a few steps each, so that the script cannot rot between visits to a GPU (``tests/test_gpu_check.py``);
its figures are CPU figures and say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

GRPO_NEW_TOKENS = 128  # configs/qwen3-14b-grpo.yaml generates up to 768; shortened to fit part b's budget
PLAN_TARGET = 0.15  # |measured / planned - 1| the planner should stay within
DRY_SLACK = 3  # --dry: the budgets x 3 (a 2-core CPU on a slow day, not a GPU)


@dataclass
class Part:
    key: str
    title: str
    budget_s: int
    run: Callable[[argparse.Namespace], dict]


# ------------------------------------------------------------------------------------------------ helpers
def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], cwd: str = ROOT) -> str:
    """Run ``cmd``; its output, or :class:`RuntimeError` with the output's tail when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{out[-3000:]}")
    return out


def _scalars(run_dir: str, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)] if tag in acc.Tags()["scalars"] else []


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def _fit(args, config: str, model: str, steps: int, *extra: str) -> tuple[str, str]:
    """``python -m qgen fit`` of a shipped config with a random-init model (the embedded default when dry);
    returns the run's TensorBoard folder and its output.
    """
    out_dir = tempfile.mkdtemp(prefix=f"gpu_check_{os.path.basename(config)[:-5]}_")
    cmd = [sys.executable, "-m", "qgen", "fit", "--config", os.path.join(ROOT, "configs", config),
           f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
           "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={out_dir}",
           f"--trainer.default_root_dir={out_dir}"]  # fmt: skip
    if args.dry:  # the embedded default on the CPU, one micro-batch a step
        cmd += ["--model.init_args.model_name_or_path=null", "--trainer.accelerator=cpu",
                "--trainer.accumulate_grad_batches=1", "--data.max_length=256"]  # fmt: skip
    else:
        cmd += [f"--model.init_args.model_name_or_path={model}"]
    output = _run([*cmd, *extra])
    return os.path.join(out_dir, "lightning_logs", "version_0"), output


def _memory(run_dir: str) -> dict:
    peak, planned = _scalars(run_dir, "sys/peak_mem_gb"), _scalars(run_dir, "sys/planned_peak_gb")
    figures = {"peak_gb": round(max(peak), 2) if peak else None,
               "planned_gb": round(planned[0], 2) if planned else None}  # fmt: skip
    if peak and planned:
        figures["peak_vs_plan"] = round(max(peak) / planned[0], 3)
        figures["within_15pct"] = abs(max(peak) / planned[0] - 1) <= PLAN_TARGET
    return figures


# -------------------------------------------------------------------------------------------------- parts
def part_a(args) -> dict:
    run, _ = _fit(args, "qwen3-14b-sft.yaml", "random:Qwen3-14B", 2 if args.dry else 10)
    tokens = _scalars(run, "train/tokens_per_s")
    return {"figures": {"tokens_per_s": _median(tokens[1:] or tokens), **_memory(run)},
            "notes": "10 optimizer steps of 2 x 8 micro-batches; tokens/s: median after the first step"}  # fmt: skip


def part_b(args) -> dict:
    extra = [f"--model.init_args.max_new_tokens={8 if args.dry else GRPO_NEW_TOKENS}"]
    if args.dry:
        extra += ["--data.batch_size=1"]
    run, _ = _fit(args, "qwen3-14b-grpo.yaml", "random:Qwen3-14B", 2, *extra)
    gen, step = _scalars(run, "train/gen_tokens_per_s"), _scalars(run, "train/step_seconds")
    return {"figures": {"gen_tokens_per_s": _median(gen), "step_seconds": _median(step), **_memory(run)},
            "notes": f"hf backend; completions of {GRPO_NEW_TOKENS} tokens, not the config's 768 (budget)"}  # fmt: skip


def _last_line_figures(output: str) -> dict:
    line = [x for x in output.strip().splitlines() if "=" in x and " " not in x.split("=")[0]][-1]
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split())}


def part_c(args) -> dict:
    machine = ["--threads", "2"] if args.dry else ["--model", "random:Qwen3-1.7B", "--device", "cuda",
                                                   "--dtype", "bfloat16"]  # fmt: skip
    size = ["--steps", "1", "--warmup", "1", "--rounds", "1"] if args.dry else \
        ["--steps", "6", "--warmup", "2", "--rounds", "2"]  # fmt: skip
    sft = _run([sys.executable, os.path.join(BENCH, "sft_throughput.py"), "--sides", "qgen", "trl", *size,
                "--batch-size", "2" if args.dry else "8", "--max-length", "128" if args.dry else "512", *machine])
    grpo = _run([sys.executable, os.path.join(BENCH, "grpo_throughput.py"), "--sides", "qgen", "trl", *size,
                 "--max-new-tokens", "8" if args.dry else "64", *([] if args.dry else machine)])  # fmt: skip
    s, g = _last_line_figures(sft), _last_line_figures(grpo)
    return {"figures": {"sft_vs_trl_gpu": s["sft_vs_trl"], "grpo_vs_trl_gpu": g["grpo_vs_trl"],
                        "sft_tokens_per_step": s.get("tokens_per_step"),
                        "grpo_gen_tokens_per_step": g.get("gen_tokens_per_step")},
            "notes": "ratios > 1: qgen faster (tokens/s for SFT, s/step for GRPO); LoRA r=32 on all linear layers"}


def part_d(args) -> dict:
    from logprob_memory import measure

    device, hidden, n, t = ("cpu", 64, 1, 64) if args.dry else ("cuda", 5120, 16, 256)
    sides = ["qgen", "trl_chunked", "trl_chunked_4096"]
    runs = {side: measure(side, False, device, hidden, n, t) for side in sides}
    ref = runs["trl_chunked"]
    for side, row in runs.items():  # the same work: every side computes the same log-probs and gradients
        assert abs(row["logp_sum"] - ref["logp_sum"]) <= 1e-4 * abs(ref["logp_sum"]), (side, row, ref)
        assert abs(row["grad_h_norm"] - ref["grad_h_norm"]) <= 1e-3 * ref["grad_h_norm"], (side, row, ref)
    peaks = {side: round(row["peak_mb"], 1) for side, row in runs.items()}
    best_trl = min(v for k, v in peaks.items() if k.startswith("trl"))
    figures = {f"{side}_peak_mb": v for side, v in peaks.items()}
    figures["logprob_mem_vs_trl_gpu"] = round(peaks["qgen"] / best_trl, 3) if best_trl else None
    return {"figures": figures, "notes": "frozen output layer; fp32; ratio against TRL's leaner chunk setting; "
                                         "Liger not measured (liger-kernel is not among the wheels)"}  # fmt: skip


def part_e(args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, env=_env())  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
    if proc.returncode not in (0, 5) or counts.get("failed") or counts.get("error") or counts.get("errors"):
        raise RuntimeError(f"pytest -m gpu: {tail}\n{proc.stdout[-3000:]}")
    return {"figures": {k: counts.get(k, 0) for k in ("passed", "skipped", "deselected")}, "notes": tail}


PARTS = [
    # budgets: 440 s in all, so that start-up and the wheel install keep the whole run under 8 minutes
    Part("a", "QLoRA SFT, Qwen3-14B architecture (configs/qwen3-14b-sft.yaml)", 130, part_a),
    Part("b", "GRPO, Qwen3-14B architecture (configs/qwen3-14b-grpo.yaml, hf)", 120, part_b),
    Part("c", "qgen vs TRL, Qwen3-1.7B bf16 LoRA (SFT, GRPO)", 130, part_c),
    Part("d", "log-prob peak memory, vocabulary 151,936", 30, part_d),
    Part("e", "gpu-marked tests", 30, part_e),
]


# ---------------------------------------------------------------------------------------------- reporting
def machine() -> dict:
    import importlib.metadata as md

    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}  # fmt: skip
    for package in ("torch", "transformers", "lightning", "peft", "bitsandbytes", "trl"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
    return info


def markdown(results: dict) -> str:
    meta = results["machine"]
    lines = [f"Measured on {meta['device']} ({meta['date']}; torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"transformers {meta['transformers']}, bitsandbytes {meta['bitsandbytes']})"
             + (" - DRY RUN on the CPU: no GPU figure" if results["dry"] else ""), "",
             "| part | what | status | seconds | figures |", "|---|---|---|---|---|"]  # fmt: skip
    for part in PARTS:
        entry = results.get(part.key)
        if entry is None:
            continue
        figures = ", ".join(f"{k} {v}" for k, v in entry.get("figures", {}).items())
        lines.append(f"| {part.key} | {part.title} | {entry['status']} | {entry['seconds']:.0f} | {figures} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: str) -> None:
    """The JSON and the Markdown table, each replaced atomically (a reader never sees half a file)."""
    table = os.path.splitext(out)[0] + ".md"
    for path, text in ((out, json.dumps(results, indent=2) + "\n"), (table, markdown(results))):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)


def run_part(key: str, args, result: str) -> None:
    """Child process: one part, its entry written to ``result``."""
    part = next(p for p in PARTS if p.key == key)
    entry = part.run(args)
    with open(result, "w", encoding="utf-8") as fh:
        json.dump({"status": "ok", **entry}, fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--dry", action="store_true", help="the same code path on the CPU with the embedded default")
    parser.add_argument("--only", nargs="+", choices=[p.key for p in PARTS], help="run these parts only")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every part's time budget (2: a slower GPU, or a cold disk cache)")  # fmt: skip
    parser.add_argument("--part", help=argparse.SUPPRESS)  # child process: run one part
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        run_part(args.part, args, args.result)
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = {"machine": machine(), "dry": args.dry}
    for part in PARTS:
        if args.only and part.key not in args.only:
            continue
        result = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part.key, "--result", result,
               *(["--dry"] if args.dry else [])]  # fmt: skip
        budget = part.budget_s * args.budget_scale * (DRY_SLACK if args.dry else 1)
        started = time.perf_counter()
        # its own process group: a part out of time is stopped with everything it started (a fit, pytest)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                start_new_session=True)  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=budget)
            if proc.returncode == 0 and os.path.exists(result):
                with open(result, encoding="utf-8") as fh:
                    entry = json.load(fh)
            else:
                entry = {"status": "failed", "error": out[-3000:]}
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            entry = {"status": f"timeout ({budget:.1f} s)", "error": (out or "")[-3000:]}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        entry["title"] = part.title
        results[part.key] = entry
        write(results, args.out)
        print(f"part {part.key}: {entry['status']} in {entry['seconds']:.0f} s  {entry.get('figures', '')}", flush=True)
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.md")
    # the summary line: parts that ran, and the comparison figures where their parts did
    figures = {k: v for key in "abcd" for k, v in results.get(key, {}).get("figures", {}).items()}
    summary = {"parts_ok": sum(results[p.key]["status"] == "ok" for p in PARTS if p.key in results),
               **{name: figures[name] for name in ("sft_vs_trl_gpu", "grpo_vs_trl_gpu", "logprob_mem_vs_trl_gpu")
                  if figures.get(name) is not None}}  # fmt: skip
    print(" ".join(f"{name}={value}" for name, value in summary.items()))


if __name__ == "__main__":
    main()
