"""``predict`` throughput with each generation backend: ``hf`` (``transformers`` ``generate``) vs ``vllm``.

Same work on both sides (asserted): the embedded default (fp32, no checkpoint), the same prompts file
(``--prompts`` prompts written by code from the bundled data's subjects), ``--tokens`` new tokens per
question with EOS suppressed (``generation.min_new_tokens``), temperature 0.8 / top-p 0.95, through the real
``predict`` path: ``trainer.predict`` with ``callbacks.PredictionWriter`` writing the JSONL file. ``hf`` runs
at its best batch on this machine among ``--hf-batches`` (all tried, each reported); ``vllm`` gets the whole
file as one wave (``model.vllm.predict_wave``; continuous batching inside it).

Reported per side and round: generated tokens/s inside generation (tokens / time in the backend's sampling
calls) and the end-to-end wall time of ``predict`` (model load and, for vLLM, engine start-up included).
Rounds alternate; the summary is the median over rounds of the per-round ratio of generation tokens/s.

    python benchmarks/predict_throughput.py [--prompts 64] [--tokens 256] [--rounds 3]

Run it in the vLLM environment (README, "Generation backends"). Last line: ``predict_vllm_vs_hf=…``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from callbacks import PredictionWriter  # noqa: E402
from qgen.backends import HFBackend, VLLMSpec  # noqa: E402
from qgen.backends.vllm import VLLMBackend  # noqa: E402
from qgen.data import QuestionDataModule  # noqa: E402
from qgen.generation import GenerationSpec  # noqa: E402
from qgen.sft import SFTModule  # noqa: E402

SUBJECTS = ["数学", "物理", "Algebra", "Number Theory", "Geometry", "Counting & Probability", "化学", "Precalculus"]


def write_prompts(path: str, n: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"p{i}", "subject": SUBJECTS[i % len(SUBJECTS)]}, ensure_ascii=False) + "\n")


def run(backend: str, batch: int, args, prompts: str, out_dir: str) -> dict:
    L.seed_everything(0)
    spec = GenerationSpec(max_new_tokens=args.tokens, temperature=0.8, top_p=0.95, min_new_tokens=args.tokens)
    module = SFTModule(generation=spec, backend=backend,
                       vllm=VLLMSpec(kv_cache_gib=2, max_model_len=1024, predict_wave=args.prompts))  # fmt: skip
    cls = VLLMBackend if backend == "vllm" else HFBackend
    generate, timing = cls.generate, {"tokens": 0, "seconds": 0.0}

    def timed(self, *a, **k):  # the backend's sampling calls only (not the engine's start-up or weight push)
        started = time.perf_counter()
        rollout = generate(self, *a, **k)
        timing["seconds"] += time.perf_counter() - started
        timing["tokens"] += int(rollout.completion_mask.sum())
        return rollout

    cls.generate = timed
    output = os.path.join(out_dir, f"{backend}-{batch}-{time.time_ns()}.jsonl")
    data = QuestionDataModule(batch_size=batch, max_length=512, predict_prompts=prompts, seed=0)
    started = time.perf_counter()
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[PredictionWriter(output)]).predict(module, data, return_predictions=False)  # fmt: skip
    wall = time.perf_counter() - started
    cls.generate = generate
    with open(output, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == args.prompts, f"{backend}: wrote {len(rows)} rows"
    assert timing["tokens"] == args.prompts * args.tokens, f"{backend}: generated {timing['tokens']} tokens"
    return {"tok_s": timing["tokens"] / timing["seconds"], "wall": wall, "gen_s": timing["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hf-batches", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    sides = [("hf", b) for b in args.hf_batches] + [("vllm", args.prompts)]
    results: dict[tuple, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.jsonl")
        write_prompts(prompts, args.prompts)
        print(f"{'round':>5}  {'side':<12} {'gen tokens/s':>12} {'gen s':>7} {'predict wall s':>14}")
        for r in range(args.rounds):
            for backend, batch in sides:
                res = run(backend, batch, args, prompts, tmp)
                results[(backend, batch)].append(res)
                name = f"{backend} b{batch}" if backend == "hf" else "vllm (wave)"
                print(f"{r:>5}  {name:<12} {res['tok_s']:>12.0f} {res['gen_s']:>7.1f} {res['wall']:>14.1f}", flush=True)
    best_hf = max(args.hf_batches, key=lambda b: statistics.median(x["tok_s"] for x in results[("hf", b)]))
    hf, vllm = results[("hf", best_hf)], results[("vllm", args.prompts)]
    ratios = [v["tok_s"] / h["tok_s"] for v, h in zip(vllm, hf)]
    walls = [h["wall"] / v["wall"] for v, h in zip(vllm, hf)]
    print(f"\npredict, embedded default, {args.prompts} prompts x {args.tokens} tokens (EOS suppressed); hf at its "
          f"best batch here ({best_hf}); {args.rounds} rounds")  # fmt: skip
    print(f"generation tokens/s vllm / hf: median {statistics.median(ratios):.2f} (rounds "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); end-to-end predict wall hf / vllm: median "
          f"{statistics.median(walls):.2f} (rounds {', '.join(f'{x:.2f}' for x in walls)})")  # fmt: skip
    print(f"predict_vllm_vs_hf={statistics.median(ratios):.2f} predict_wall_vllm_vs_hf={statistics.median(walls):.2f} "
          f"hf_batch={best_hf} tokens={args.prompts * args.tokens}")  # fmt: skip


if __name__ == "__main__":
    main()
