"""Adaptive solver sampling against the fixed 10-sample decision (qgen.passrate.AdaptiveRule).

A simulation: for each true pass rate p in {0, 0.05, ..., 1} (weighted equally), 2,000 questions, each with a
stream of 10 Bernoulli(p) solver samples. The fixed decision is the reward of all 10; the adaptive rule reads a
prefix of the same stream in rounds and reports its value when it stops. Agreement: |adaptive - fixed| <= 0.1.
Saving: 1 - (samples read / 10). Printed per reward shape, round size and cost per sample; the last line is
the rule ``SolverDifficulty`` uses by default with ``adaptive: true`` (its default mode ``shrunk`` stops by the
``absolute_zero`` shape: rounds of 2, cost 0.05).

    python benchmarks/solver_sampling.py [--questions 2000] [--seed 0] [--served 24]

Where vLLM is installed, the same rule then runs against a served model: vLLM's OpenAI-compatible server on the
embedded default (started and stopped here), ``--served`` bundled questions with stated answers, 10 solutions
each in one request (``callbacks.solver.ServedSolver``, temperature 1); the adaptive rule reads a prefix of
those 10 and is compared with the reward of all 10, as in the simulation. The embedded model is random-init,
so its pass rates sit near 0: that half checks the rule end to end on real samples, not the savings a trained
solver would give. Without vLLM that half is skipped with a note. The summary line is the simulation's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import time

import numpy as np

from qgen.passrate import SHAPES, AdaptiveRule, pass_rate_reward

K = 10
GRID = np.round(np.linspace(0, 1, 21), 2)


def simulate(rule: AdaptiveRule, questions: int, seed: int) -> tuple[float, float, float]:
    """``(agreement, saving, worst per-p agreement)`` over the grid."""
    rng = np.random.default_rng(seed)
    agree, used = [], []
    for p in GRID:
        draws = rng.random((questions, K)) < p
        totals = draws.cumsum(1)
        hits, read = 0, 0
        for q in range(questions):
            n = 0
            while True:
                a = int(totals[q, n - 1]) if n else 0
                more = rule.next_round(a, n)
                if more == 0:
                    break
                n += more
            # same work: the adaptive decision read a prefix of the very stream the fixed one reads whole
            assert 0 < n <= K and a == int(draws[q, :n].sum())
            fixed = pass_rate_reward(rule.shape, int(totals[q, -1]), K)
            hits += abs(rule.value(a, n) - fixed) <= 0.1 + 1e-9
            read += n
        agree.append(hits / questions)
        used.append(read / questions)
    return float(np.mean(agree)), 1 - float(np.mean(used)) / K, float(np.min(agree))


def served(questions: int, seed: int) -> str:
    """The rule against vLLM's server on the embedded default (module docstring): one result line."""
    import httpx2 as httpx

    from callbacks.solver import ServedSolver, SolverDifficulty
    from qgen.data import QuestionDataModule
    from qgen.formatting import ParsedQuestion
    from qgen.models import resolve

    data = QuestionDataModule(batch_size=1, seed=seed)
    data.setup("fit")
    records = [e.record for e in data.datasets["train"].examples if e.record.answer][:questions]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve(None),
                               "--served-model-name", "solver", "--port", str(port), "--host", "127.0.0.1",
                               "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager"],
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(240):
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        solver = ServedSolver(url, "solver", max_new_tokens=64, temperature=1.0, timeout=300, concurrency=8)
        started = time.perf_counter()
        texts = solver.solve([r.question for r in records], [r.language for r in records], K)
        seconds = time.perf_counter() - started
        solver.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    judge = SolverDifficulty(samples=K)
    rule = AdaptiveRule("absolute_zero", K, 2, 0.1, 0.05)
    agree, read, rates = 0, 0, []
    for record, sols in zip(records, texts):
        parsed = ParsedQuestion(record.question, record.answer, "", record.options, True)
        votes = judge._votes(parsed, sols)[0]
        totals = np.cumsum(votes)
        n = 0
        while (more := rule.next_round(int(totals[n - 1]) if n else 0, n)) > 0:
            n += more
        a = int(totals[n - 1]) if n else 0
        assert len(sols) == K and 0 < n <= K  # both decisions from the same 10 solutions
        agree += abs(rule.value(a, n) - pass_rate_reward(rule.shape, int(totals[-1]), K)) <= 0.1 + 1e-9
        read += n
        rates.append(float(totals[-1]) / K)
    return (f"served embedded default ({len(records)} bundled questions x {K} solutions, {seconds:.0f} s): "
            f"agreement {agree / len(records):.3f}, saving {1 - read / (K * len(records)):.3f}, mean pass rate "
            f"{np.mean(rates):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=2000, help="questions per true pass rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--served", type=int, default=24, help="questions for the served-model half (0: skip)")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"{'shape':<14}{'round':>6}{'cost':>7}{'agreement':>11}{'saving':>8}{'worst p':>9}")
    default = None
    for shape in SHAPES:
        for round_size in (1, 2):
            for cost in (0.03, 0.05, 0.06):
                rule = AdaptiveRule(shape, K, round_size, 0.1, cost)
                agreement, saving, worst = simulate(rule, args.questions, args.seed)
                print(f"{shape:<14}{round_size:>6}{cost:>7.2f}{agreement:>11.3f}{saving:>8.3f}{worst:>9.3f}")
                if (shape, round_size, cost) == ("absolute_zero", 2, 0.05):
                    default = (agreement, saving)
    print(f"({len(GRID)} pass rates x {args.questions} questions, {time.perf_counter() - started:.0f} s)")
    if args.served and importlib.util.find_spec("vllm") is not None:
        print(served(args.served, args.seed))
    elif args.served:
        print("served model: skipped (vLLM is not installed here; run this script in the vLLM environment)")
    print(f"solver_agreement={default[0]:.3f} solver_sample_saving={default[1]:.3f}")


if __name__ == "__main__":
    main()
