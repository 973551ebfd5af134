"""Novelty scoring at scale: milliseconds to score a group of 8 questions against a bank of 1,000,000.

The bank: every question text in ../shared/data (MATH, GAOKAO-Bench, TAL-SCQ5K, Qwen2.5-Math eval sets)
plus synthetic questions made by recombining their clauses with fresh numbers, up to ``--size``. The
group: 8 questions that are not in the bank (MATH test problems, renumbered and shuffled). Printed:
build time, index memory, median and p90 milliseconds per group of 8 for qgen's top-k inverted index,
and the same for exact TF-IDF cosine (``top_k=None``) on the same bank for reference.

    python benchmarks/novelty_bank.py [--size 1000000]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qgen.scoring import NoveltyIndex  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def shared_questions() -> list[str]:
    texts = []
    for path in glob.glob(os.path.join(SHARED, "**", "*.json*"), recursive=True):
        if "kag_eqg" in path:
            continue
        try:
            if path.endswith(".jsonl"):
                rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
            else:
                doc = json.load(open(path, encoding="utf-8"))
                rows = doc.get("example", []) if isinstance(doc, dict) else doc
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        for r in rows:
            if isinstance(r, dict):
                t = r.get("problem") or r.get("question")
                if isinstance(t, str) and len(t) > 20:
                    texts.append(t)
    return texts


def synthesize(seeds: list[str], size: int, rng: random.Random) -> list[str]:
    clauses = [c for s in seeds for c in re.split(r"(?<=[.?!。？；;，,])\s*", s) if len(c) > 8]
    out = list(seeds)
    while len(out) < size:
        parts = [rng.choice(clauses) for _ in range(rng.randint(2, 4))]
        out.append(re.sub(r"\d+", lambda m: str(rng.randint(1, 999)), " ".join(parts)))
    return out[:size]


def index_bytes(index: NoveltyIndex) -> int:
    return sum(b.data.nbytes + b.indices.nbytes + b.indptr.nbytes for b in index._blocks)


def time_groups(index: NoveltyIndex, groups: list[list[str]]) -> tuple[float, float]:
    index.max_similarity(groups[0])
    ms = []
    for g in groups:
        t = time.perf_counter()
        index.max_similarity(g)
        ms.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ms)), float(np.percentile(ms, 90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--groups", type=int, default=30)
    parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True, help="also time exact cosine")
    args = parser.parse_args()
    rng = random.Random(0)
    seeds = shared_questions()
    test = [json.loads(line)["problem"] for line in open(os.path.join(SHARED, "math", "test.jsonl"), encoding="utf-8")]
    bank = synthesize(seeds, args.size, rng)
    groups = [
        [re.sub(r"\d+", lambda m: str(rng.randint(1, 99)), q) for q in rng.sample(test, 8)] for _ in range(args.groups)
    ]
    print(f"bank: {len(bank):,} questions ({len(seeds):,} from ../shared/data, the rest recombined); groups of 8")
    print(f"{'index':<22} {'build s':>8} {'index MB':>9} {'RSS MB':>8} {'median ms':>10} {'p90 ms':>8}")
    rows = [("qgen top-64", 64)] + ([("exact cosine", None)] if args.exact else [])
    for name, k in rows:
        t = time.perf_counter()
        index = NoveltyIndex(bank, top_k=k)
        build = time.perf_counter() - t
        median, p90 = time_groups(index, groups)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{name:<22} {build:>8.1f} {index_bytes(index) / 2**20:>9.0f} {rss:>8.0f} {median:>10.1f} {p90:>8.1f}")
        if k == 64:
            best = median
        del index
    print(f"novelty_ms_per_group_of_8={best:.1f}")


if __name__ == "__main__":
    main()
