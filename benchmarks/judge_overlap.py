"""How much of an LLM judge's latency a GRPO step hides: qgen with and without a judge that answers in 1 s.

qgen against itself (same model, prompts, seed, settings; EOS suppressed so every step generates exactly
``G x max_new_tokens`` tokens per prompt): the embedded default, LoRA r=32, 2 prompts x G = 8 per micro-batch,
2 micro-batches per optimizer step, the four model-free rewards, and in the judged runs an ``OpenAIJudge``
on a local server (127.0.0.1, a separate process, as a real judge is) that answers every request after
``--latency`` seconds.

Two step shapes (``--shape``): ``small`` (above) and ``14b``, the step of ``configs/qwen3-14b-grpo.yaml``
(4 prompts x G = 8 per micro-batch, 4 micro-batches, gradient checkpointing) on the embedded default with
completions of ``--max-new-tokens`` instead of 768. How much of a fixed latency a step can hide depends on how
much work it has after its questions exist: the reference passes and the first micro-batch's forward run
inside the wait, the rest of the step cannot start before the scores it needs.

Variants, alternated for ``--rounds`` rounds, every round printed:
- ``no judge``: the reference step time T0;
- ``judge, whole step`` (the default, ``generation_batch_size: null``): the step's rollouts in one
  ``generate`` call; the judge's requests go out at once and are answered while the first micro-batch
  runs its forward passes;
- ``judge, per micro-batch``: ``generation_batch_size`` = a micro-batch's prompts, one call per micro-batch;
  its judge requests are answered while the next micro-batch generates (smaller generate batches cost more
  on CPU).

The target of the correctness issue is ``T <= max(latency, T0) x 1.1``; the summary line prints each
variant's ratio to that bound (<= 1 meets it), the median over rounds of each round's ratio (a round's
judged and no-judge runs are adjacent in time, so drift of the machine cancels).

    python benchmarks/judge_overlap.py [--shape small|14b] [--steps 6] [--rounds 2] [--latency 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lightning as L
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from callbacks import DifficultyReward, DiversityReward, NoveltyReward, OpenAIJudge, RigorReward  # noqa: E402
from qgen.data import QuestionDataModule  # noqa: E402
from qgen.grpo import GRPOModule  # noqa: E402
from qgen.models import LoraSpec  # noqa: E402


def slow_judge(latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, payload):
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply({"data": [{"id": "judge"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(latency)
            self._reply({"choices": [{"message": {"role": "assistant", "content": "Score: 6"}}]})

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # a real judge server (uvicorn) listens with a deep backlog; the default 5 drops SYNs
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class StepTimer(Callback):
    """Wall time of each optimizer step (first micro-batch start to last micro-batch end)."""

    def __init__(self):
        self.times, self.start, self.tokens, self.windows = [], None, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()
            self.windows.append(batch["step_window"])  # the step's prompts (dataset indices), for the same-work check

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.times.append(time.perf_counter() - self.start)
            self.tokens.append(int(pl_module._rollouts.rollout.completion_mask.sum()))
            self.start = None


SHAPES = {  # prompts per micro-batch, micro-batches per step, gradient checkpointing
    "small": (2, 2, False),
    "14b": (4, 4, True),  # configs/qwen3-14b-grpo.yaml: data.batch_size 4, accumulate_grad_batches 4
}


def run(args, judge_url: str | None, generation_batch_size: int | None) -> tuple[list[float], list[int], list]:
    prompts, micro_batches, checkpointing = SHAPES[args.shape]
    L.seed_everything(0)
    rewards = [DifficultyReward(), NoveltyReward(), RigorReward(), DiversityReward()]
    if judge_url:  # no cache: every step asks the server
        rewards.append(OpenAIJudge(judge_url, "judge", weight=0.25, api_key_env=None, cache_dir=None, concurrency=32,
                                   timeout=args.latency + 10))  # fmt: skip
    module = GRPOModule(lora=LoraSpec(r=32, alpha=64, dropout=0.0), group_size=8, max_new_tokens=args.max_new_tokens,
                        min_new_tokens=args.max_new_tokens, beta=0.04, generation_batch_size=generation_batch_size,
                        gradient_checkpointing=checkpointing)  # fmt: skip
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(default_root_dir=root, max_steps=args.steps, accelerator="cpu", logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0, accumulate_grad_batches=micro_batches, callbacks=[*rewards, timer],
                  ).fit(module, QuestionDataModule(batch_size=prompts, max_length=256, seed=0))  # fmt: skip
    if judge_url:
        assert rewards[-1].failures == 0, "the judge failed ratings: the judged runs would not do the same work"
    return timer.times[1:], timer.tokens[1:], timer.windows  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the judge process itself
    args = parser.parse_args()
    if args.serve:
        server = slow_judge(args.latency)
        print(server.server_address[1], flush=True)
        threading.Event().wait()
    judge = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(args.latency)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{int(judge.stdout.readline())}/v1"
    prompts, micro_batches, checkpointing = SHAPES[args.shape]
    variants = {"no judge": (None, None), "judge, whole step": (url, None), "judge, per micro-batch": (url, prompts)}
    results: dict[str, list[float]] = {name: [] for name in variants}
    reference_windows = None
    print(
        f"shape {args.shape}: {prompts} prompts x G=8 per micro-batch, {micro_batches} micro-batches, "
        f"{args.max_new_tokens} tokens each, gradient checkpointing {'on' if checkpointing else 'off'}"
    )
    print(f"{'round':>5}  {'variant':<26} {'s/step':>8} {'tokens/step':>12}")
    for r in range(args.rounds):
        for name, (judge_url, chunk) in variants.items():
            times, tokens, windows = run(args, judge_url, chunk)
            # same work on every side: the same prompts in the same steps, and exactly G x max_new_tokens
            # tokens per prompt (EOS suppressed)
            reference_windows = reference_windows if r or name != "no judge" else windows
            assert windows == reference_windows, f"{name}: other prompts than the reference run"
            assert all(t == prompts * micro_batches * 8 * args.max_new_tokens for t in tokens), f"{name}: {tokens}"
            results[name].append(statistics.mean(times))
            print(f"{r:>5}  {name:<26} {statistics.mean(times):>8.3f} {statistics.mean(tokens):>12.0f}")
    t0 = statistics.mean(results["no judge"])
    print(f"\nno-judge step {t0:.3f} s (rounds: {', '.join(f'{t:.3f}' for t in results['no judge'])}); "
          f"target bound per round max({args.latency:g}, T0) x 1.1; each round's judged step against its own "
          "round's no-judge step (adjacent in time), median over rounds")  # fmt: skip
    summary = []
    for name in list(variants)[1:]:
        ratios = [t / (max(args.latency, t0r) * 1.1) for t, t0r in zip(results[name], results["no judge"])]
        overheads = [t - t0r for t, t0r in zip(results[name], results["no judge"])]
        print(f"{name:<26} overhead per round {', '.join(f'{o:+.3f}' for o in overheads)} s; of the bound "
              f"{', '.join(f'{q:.2f}' for q in ratios)} (median {statistics.median(ratios):.2f})")  # fmt: skip
        summary.append(f"{name.replace(', ', '_').replace(' ', '_')}_vs_bound={statistics.median(ratios):.2f}")
    judge.terminate()
    print(" ".join([f"shape={args.shape}", f"judge_latency_s={args.latency:g}", f"no_judge_s_per_step={t0:.3f}",
                    *summary]))  # fmt: skip


if __name__ == "__main__":
    main()
