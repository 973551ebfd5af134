"""Difficulty model quality: Spearman correlation of predicted difficulty with a human difficulty label.

Two labelled sets from ../shared/data, each with its own train / test split:
- MATH (English): the problem's level 1-5 (``math/train.jsonl`` -> ``math/test.jsonl``);
- TAL-SCQ5K-CN (Chinese competition single-choice): its difficulty level 0-4 (``ch_..._train_3K`` ->
  ``ch_..._test_2K``). GAOKAO-Bench is not used: its points follow the question type, not difficulty.

Settings (the ridge alpha) are chosen by 5-fold cross-validation on the train split only; the test split
is scored once, with a bootstrap 95% interval (resampled test problems). Test problems whose text also
appears in the train split are dropped (checked here). The seed's keyword/length heuristic is printed
on the same test problems.

    python benchmarks/difficulty_spearman.py [--shared ../shared/data] [--bootstrap 1000]

Last line: ``spearman_math=… spearman_math_ci_low=… spearman_zh=… spearman_zh_ci_low=…``.
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

TAL_CN = os.path.join("tal_scq5k", "ch_single_choice_constructed_5K")
SETS = {
    "math": ("math", os.path.join("math", "train.jsonl"), os.path.join("math", "test.jsonl")),
    "zh": ("tal_scq", os.path.join(TAL_CN, "ch_single_choice_train_3K.jsonl"),
           os.path.join(TAL_CN, "ch_single_choice_test_2K.jsonl")),  # fmt: skip
}


def bootstrap_interval(predicted: np.ndarray, labels: np.ndarray, n: int, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        values.append(spearmanr(predicted[idx], labels[idx])[0])
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def evaluate(name: str, shared: str, n_boot: int) -> dict:
    fmt, train_path, test_path = SETS[name]
    train = [r for r in read_source(fmt, os.path.join(shared, train_path)).records if r.difficulty is not None]
    test = [r for r in read_source(fmt, os.path.join(shared, test_path)).records if r.difficulty is not None]
    seen = {" ".join(r.question.split()) for r in train}
    overlap = [r for r in test if " ".join(r.question.split()) in seen]
    test = [r for r in test if " ".join(r.question.split()) not in seen]
    assert not any(" ".join(r.question.split()) in seen for r in test)
    started = time.perf_counter()
    model = DifficultyModel()
    cv = model.cross_validate(train)
    model.fit(train)
    fit_s = time.perf_counter() - started
    labels = np.array([r.difficulty for r in test])
    predicted = model.predict([r.question for r in test], [r.analysis for r in test], [r.subject for r in test])
    heuristic = np.array([heuristic_difficulty(r.question, r.analysis) for r in test])
    rho, rho_heur = float(spearmanr(predicted, labels)[0]), float(spearmanr(heuristic, labels)[0])
    low, high = bootstrap_interval(predicted, labels, n_boot)
    return dict(name=name, n_train=len(train), n_test=len(test), overlap=len(overlap), cv=cv, alpha=model.alpha,
                rho=rho, low=low, high=high, rho_heur=rho_heur, fit_s=fit_s)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"),
    )
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    results = [evaluate(name, args.shared, args.bootstrap) for name in SETS]
    for r in results:
        cv = ", ".join(f"{a:g}: {v:.3f}" for a, v in r["cv"].items())
        print(f"\n{r['name']}: {r['n_train']} train, {r['n_test']} test problems ({r['overlap']} test problems "
              f"also in train dropped); 5-fold CV on train, mean Spearman per alpha: {cv}; chosen alpha {r['alpha']:g} "
              f"({r['fit_s']:.0f} s with the CV)")  # fmt: skip
        print(f"  {'scorer':<34} {'spearman':>9}  bootstrap 95%")
        print(f"  {'seed heuristic (keywords/length)':<34} {r['rho_heur']:>9.3f}")
        print(f"  {'qgen DifficultyModel (ridge)':<34} {r['rho']:>9.3f}  [{r['low']:.3f}, {r['high']:.3f}]")
    by = {r["name"]: r for r in results}
    print(f"spearman_math={by['math']['rho']:.3f} spearman_math_ci_low={by['math']['low']:.3f} "
          f"spearman_zh={by['zh']['rho']:.3f} spearman_zh_ci_low={by['zh']['low']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
