"""Difficulty model quality: Spearman correlation of predicted difficulty with the MATH level.

Fitted on ../shared/data/math/train.jsonl only, evaluated on ../shared/data/math/test.jsonl; printed beside
the seed's keyword/length heuristic on the same test set. Target: at least 0.70.

    python benchmarks/difficulty_spearman.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qgen.records import read_source  # noqa: E402
from qgen.scoring import DifficultyModel, heuristic_difficulty  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"),
    )
    args = parser.parse_args()
    train = read_source("math", os.path.join(args.shared, "math", "train.jsonl")).records
    test = [
        r
        for r in read_source("math", os.path.join(args.shared, "math", "test.jsonl")).records
        if r.difficulty is not None
    ]
    started = time.perf_counter()
    model = DifficultyModel().fit(train)
    fit_s = time.perf_counter() - started
    levels = np.array([r.difficulty for r in test])
    predicted = model.predict([r.question for r in test], [r.analysis for r in test], [r.subject for r in test])
    heuristic = np.array([heuristic_difficulty(r.question, r.analysis) for r in test])
    rho_model, rho_heur = spearmanr(predicted, levels)[0], spearmanr(heuristic, levels)[0]
    print(
        f"MATH level vs predicted difficulty, {len(test)} test problems, model fitted on {model.n_train} train problems ({fit_s:.1f} s)"
    )
    print(f"{'scorer':<34} {'spearman':>9}")
    print(f"{'seed heuristic (keywords/length)':<34} {rho_heur:>9.3f}")
    print(f"{'qgen DifficultyModel (ridge)':<34} {rho_model:>9.3f}")
    print(f"difficulty_spearman={rho_model:.3f}")


if __name__ == "__main__":
    main()
