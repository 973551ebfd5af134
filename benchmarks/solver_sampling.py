"""Adaptive solver sampling against the fixed 10-sample decision (qgen.passrate.AdaptiveRule).

A simulation: for each true pass rate p in {0, 0.05, ..., 1} (weighted equally), 2,000 questions, each with a
stream of 10 Bernoulli(p) solver samples. The fixed decision is the reward of all 10; the adaptive rule reads a
prefix of the same stream in rounds and reports its value when it stops. Agreement: |adaptive - fixed| <= 0.1.
Saving: 1 - (samples read / 10). Printed per reward shape, round size and cost per sample; the last line is
the rule ``SolverDifficulty`` uses by default with ``adaptive: true`` (its default mode ``shrunk`` stops by the
``absolute_zero`` shape: rounds of 2, cost 0.05).

    python benchmarks/solver_sampling.py [--questions 2000] [--seed 0]

Against a served model: not in this version (the rule is exercised by the in-process solver's tests).
"""

from __future__ import annotations

import argparse
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
            fixed = pass_rate_reward(rule.shape, int(totals[q, -1]), K)
            hits += abs(rule.value(a, n) - fixed) <= 0.1 + 1e-9
            read += n
        agree.append(hits / questions)
        used.append(read / questions)
    return float(np.mean(agree)), 1 - float(np.mean(used)) / K, float(np.min(agree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=2000, help="questions per true pass rate")
    parser.add_argument("--seed", type=int, default=0)
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
    print(f"({len(GRID)} pass rates x {args.questions} questions, {time.perf_counter() - started:.0f} s; served "
          "model: not in this version)")
    print(f"solver_agreement={default[0]:.3f} solver_sample_saving={default[1]:.3f}")


if __name__ == "__main__":
    main()
