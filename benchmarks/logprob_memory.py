"""Peak memory of per-token log-probs, forward and backward: qgen vs TRL 1.16's own chunked kernel.

16 x 256 tokens, hidden size 256, Qwen's vocabulary of 151,936, fp32 on CPU. Each measurement runs in a
fresh Python process: inputs are built first, then the peak resident-set growth over forward + backward
of ``sum(w * logp)`` is read (``VmHWM``), so every side pays for exactly what its forward saves and its
backward allocates. Sides:

- ``qgen``: ``qgen.losses.token_logprobs`` (the GRPO policy and reference passes);
- ``TRL chunked``: ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` with the vocabulary chunk TRL's
  trainer uses (32,768; its torch fallback on CPU, Triton on CUDA), no optional outputs requested;
- ``TRL ch. 4096`` / ``TRL ch. 1024``: the same kernel with 4,096- and 1,024-column chunks (leaner settings a
  user could pick: the reference at its best; the ratio is against the leanest of the three TRL settings);
- ``TRL selective``: ``trl.trainer.utils.selective_log_softmax`` on full logits (TRL's older path).

Two cases: the output embedding frozen (LoRA, what qgen's GRPO trains) and trainable (full fine-tuning; its
``[V, H]`` gradient is then part of every side's peak). The log-probs of all sides are checked against each
other. Rounds alternate the sides and all are printed; the ratio uses the median over rounds.

    python benchmarks/logprob_memory.py [--rounds 2] [--device cuda --hidden 5120]

``--device cuda`` measures CUDA's peak allocation instead (``benchmarks/gpu_check.py`` part d).

Needs ``pip install -e ".[bench]"``. The last line is
``logprob_mem_vs_trl=X.XX logprob_mem_vs_trl_trainable_head=X.XX``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, H, N, T = 151_936, 256, 16, 256

PROBE = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(2)
side, trainable, device = {side!r}, {trainable!r}, {device!r}
g = torch.Generator().manual_seed(0)
head = (torch.randn({V}, {H}, generator=g) * 0.02).to(device).requires_grad_(trainable)
hidden = torch.randn({N} * {T}, {H}, generator=g).to(device).requires_grad_(True)
targets = torch.randint(0, {V}, ({N} * {T},), generator=g).to(device)
weights = torch.randn({N} * {T}, generator=g).to(device)
if side == "qgen":
    from qgen.losses import token_logprobs
    fn = lambda: token_logprobs(hidden[None], head, targets[None])[0]
elif side.startswith("trl_chunked"):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    chunk = int(side.rsplit("_", 1)[1]) if side[-1].isdigit() else _CHUNKED_LOGPROB_CHUNK_SIZE
    fn = lambda: ChunkedLogProbFunction.apply(hidden, head, None, targets, 1.0, chunk, None, 1.0, ())[0]
else:
    from trl.trainer.utils import selective_log_softmax
    fn = lambda: selective_log_softmax(hidden @ head.T, targets)
def used():  # KiB: the host's peak resident set, or CUDA's peak allocation
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 1024
    with open("/proc/self/status") as fh:  # VmHWM: this process's own peak (ru_maxrss carries the parent's over)
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
base = used()
started = time.perf_counter()
logp = fn()
(logp * weights).sum().backward()
peak = used()
seconds = time.perf_counter() - started
grad = hidden.grad.double()
print(json.dumps({{"peak_mb": (peak - base) / 1024, "seconds": seconds, "logp_sum": float(logp.double().sum()),
                  "grad_h_norm": float(grad.norm()), "grad_w_norm": float(head.grad.norm()) if trainable else 0.0}}))
"""

SIDES = {"qgen": "qgen", "trl_chunked": "TRL chunked", "trl_chunked_4096": "TRL ch. 4096",
         "trl_chunked_1024": "TRL ch. 1024", "trl_selective": "TRL selective"}  # fmt: skip


def measure(side: str, trainable: bool, device: str = "cpu", hidden: int = H, sequences: int = N,
            length: int = T) -> dict:  # fmt: skip
    """One side's peak (MB) and time over forward + backward, in a fresh process."""
    code = PROBE.format(root=ROOT, side=side, trainable=trainable, device=device, V=V, H=hidden, N=sequences, T=length)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side}: the probe failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: peak CUDA allocation, and TRL's kernel on its Triton path")  # fmt: skip
    parser.add_argument("--hidden", type=int, default=H, help="hidden size (Qwen3-14B: 5120)")
    args = parser.parse_args()
    ratios = {}
    print(f"per-token log-probs, forward + backward: {N} x {T} tokens, hidden {args.hidden}, vocabulary {V:,}, "
          f"fp32, {args.device}")  # fmt: skip
    for trainable in (False, True):
        runs: dict[str, list[dict]] = {s: [] for s in SIDES}
        for r in range(args.rounds):
            order = list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]  # alternate which side goes first
            for side in order:
                runs[side].append(measure(side, trainable, args.device, args.hidden))
        ref = runs["trl_chunked"][0]
        for side, rows in runs.items():  # every side computes the same numbers
            for row in rows:
                assert abs(row["logp_sum"] - ref["logp_sum"]) <= 1e-4 * abs(ref["logp_sum"]), (side, row, ref)
                assert abs(row["grad_h_norm"] - ref["grad_h_norm"]) <= 1e-3 * ref["grad_h_norm"], (side, row, ref)
                if trainable:
                    assert abs(row["grad_w_norm"] - ref["grad_w_norm"]) <= 1e-3 * ref["grad_w_norm"], (side, row, ref)
        head = "trainable output embedding (full fine-tuning)" if trainable else "frozen output embedding (LoRA)"
        print(f"\n{head}")
        print(f"{'side':<14} {'peak MB per round':<24} {'median':>8} {'vs TRL':>7} {'s per round':<20}")
        medians = {s: float(np.median([r["peak_mb"] for r in rows])) for s, rows in runs.items()}
        for side, rows in runs.items():
            peaks = ", ".join(f"{r['peak_mb']:.0f}" for r in rows)
            secs = ", ".join(f"{r['seconds']:.1f}" for r in rows)
            print(f"{SIDES[side]:<14} {peaks:<24} {medians[side]:>8.0f} {medians[side] / medians['trl_chunked']:>7.2f} "
                  f"{secs:<20}")  # fmt: skip
        best = min(m for s, m in medians.items() if s.startswith("trl_chunked"))
        ratios[trainable] = medians["qgen"] / best
        print(f"qgen vs TRL's chunked kernel at its leaner setting: {ratios[trainable]:.2f}")
    print(f"logprob_mem_vs_trl={ratios[False]:.2f} logprob_mem_vs_trl_trainable_head={ratios[True]:.2f}")


if __name__ == "__main__":
    main()
