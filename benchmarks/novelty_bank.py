"""Novelty at scale: accuracy of the near-copy decision against brute-force exact cosine, and latency.

The bank: the question texts of ../shared/data except the MATH test problems and the evaluation sets built
from them (MATH-500, the Qwen2.5-Math eval sets), plus synthetic questions made by recombining their
clauses with fresh numbers, up to ``--size``. Two query sets of ``--queries`` each:

- **held out**: MATH test problems; none is in the bank (checked on whitespace-normalised text);
- **perturbed copies**: bank questions renumbered and with 10-30% of their characters edited in one or two
  spans (deleted, replaced or inserted), so that a part of them stay near-copies; the script checks that
  at least 30% are at
  exact cosine >= 0.85 and prints the share.

For every query the *exact* cosine to its most similar bank question is computed by brute force (the
full TF-IDF vectors of every bank question times the query's, no index). Against it, per query set:

- the fast top-64 index's estimate (``max_similarity``, the reward's value below the threshold): mean and
  max absolute error, and how often its own ``> 0.85`` would flip the exact decision;
- qgen's decision (``near_copy_similarity``, what the reward, predict, test and score use): flips (must be 0)
  and the error of the similarity it reports.

Latency: milliseconds per group of 8 for ``near_copy_similarity`` against the whole bank (median and p90).

    python benchmarks/novelty_bank.py [--size 1000000] [--queries 500]

The last line is ``novelty_flips=N novelty_1m_ms=X.X novelty_pruned_flips=N``.
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
import scipy.sparse as sp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qgen.scoring import NoveltyIndex  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
HELD_OUT_SOURCES = ("math/test.jsonl", "math500", "qwen25_math_eval")  # MATH test and sets built from it
THRESHOLD = 0.85


def read_texts(path: str) -> list[str]:
    try:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        else:
            doc = json.load(open(path, encoding="utf-8"))
            rows = doc.get("example", []) if isinstance(doc, dict) else doc
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    out = []
    for r in rows:
        if isinstance(r, dict):
            t = r.get("problem") or r.get("question")
            if isinstance(t, str) and len(t) > 20:
                out.append(t)
    return out


def bank_seeds() -> list[str]:
    texts = []
    for path in sorted(glob.glob(os.path.join(SHARED, "**", "*.json*"), recursive=True)):
        rel = os.path.relpath(path, SHARED)
        if "kag_eqg" in rel or any(rel.startswith(h) for h in HELD_OUT_SOURCES):
            continue
        texts.extend(read_texts(path))
    return texts


def synthesize(seeds: list[str], size: int, rng: random.Random) -> list[str]:
    clauses = [c for s in seeds for c in re.split(r"(?<=[.?!。？；;，,])\s*", s) if len(c) > 8]
    out = list(seeds)
    while len(out) < size:
        parts = [rng.choice(clauses) for _ in range(rng.randint(2, 4))]
        out.append(re.sub(r"\d+", lambda m: str(rng.randint(1, 999)), " ".join(parts)))
    return out[:size]


def perturb(text: str, rng: random.Random) -> str:
    """Renumbered, then 10-30% of the characters edited in one or two spans (a phrase deleted, replaced by
    other text, or text inserted), as an edited copy of a question would be.
    """
    chars = list(re.sub(r"\d+", lambda m: str(rng.randint(1, 999)), text))
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.的是了一个"
    budget = max(1, int(len(chars) * rng.uniform(0.10, 0.30)))
    spans = [budget] if rng.random() < 0.5 or budget < 2 else [budget // 2, budget - budget // 2]
    for n in spans:
        i = rng.randrange(max(1, len(chars) - n))
        op = rng.random()
        other = [rng.choice(alphabet) for _ in range(n)]
        if op < 0.6 and len(chars) > n:  # most edits cut a phrase, the rest replace or insert one
            del chars[i : i + n]
        elif op < 0.8:
            chars[i : i + n] = other
        else:
            chars[i:i] = other
    return "".join(chars)


def squash(text: str) -> str:
    return " ".join(text.split())


def exact_max(index: NoveltyIndex, bank: sp.csr_matrix, queries: list[str]) -> np.ndarray:
    """Brute force: each query's full TF-IDF vector times every bank question's (``bank``, ``[n, F]``)."""
    q = index.tfidf.transform(index.hasher.transform(queries)).astype(np.float32).tocsr()  # [n, F]
    best = np.zeros(len(queries), dtype=np.float32)
    for start in range(0, bank.shape[0], 200_000):
        sims = (q @ bank[start : start + 200_000].T).tocsr()  # [n, block]
        if sims.nnz:
            best = np.maximum(best, sims.max(axis=1).toarray().ravel())
    return best


def report(name: str, exact: np.ndarray, pruned: np.ndarray, decided: np.ndarray, near: np.ndarray) -> tuple[int, int]:
    truth = exact > THRESHOLD
    pruned_flips = int(((pruned > THRESHOLD) != truth).sum())
    flips = int((near != truth).sum())
    above = truth | (exact >= THRESHOLD)
    err = np.abs(pruned - exact)
    derr = np.abs(decided - exact)
    print(f"{name:<18} {len(exact):>5} {above.mean():>8.2f} {err.mean():>9.3f} {err.max():>8.3f} {pruned_flips:>7} "
          f"{derr[above].max() if above.any() else 0.0:>11.4f} {flips:>6}")  # fmt: skip
    return flips, pruned_flips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500, help="queries per set")
    parser.add_argument("--groups", type=int, default=30, help="groups of 8 timed")
    args = parser.parse_args()
    rng = random.Random(0)
    seeds = bank_seeds()
    held = read_texts(os.path.join(SHARED, "math", "test.jsonl"))
    bank = synthesize(seeds, args.size, rng)
    in_bank = {squash(t) for t in bank}
    held = [q for q in dict.fromkeys(held) if squash(q) not in in_bank]
    assert held, "no held-out question left"
    held_q = rng.sample(held, min(args.queries, len(held)))
    assert not {squash(q) for q in held_q} & in_bank, "a held-out query is in the bank"
    perturbed_q = [perturb(t, rng) for t in rng.sample(seeds, args.queries)]

    started = time.perf_counter()
    index = NoveltyIndex(bank, top_k=64)
    build = time.perf_counter() - started
    started = time.perf_counter()
    index.near_copy_similarity(perturbed_q[:8], THRESHOLD)  # builds the prefix-filter index once
    prefix_build = time.perf_counter() - started
    print(f"bank: {len(bank):,} questions ({len(seeds):,} from ../shared/data without the MATH test problems, "
          f"the rest recombined); index built in {build:.0f} s, prefix filter in {prefix_build:.0f} s, "
          f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")  # fmt: skip
    print(f"\n{'queries':<18} {'n':>5} {'>=0.85':>8} {'fast err':>9} {'max err':>8} {'flips':>7} "
          f"{'qgen err>=t':>11} {'flips':>6}")  # fmt: skip
    print(f"{'':<18} {'':>5} {'(exact)':>8} {'(top-64 index alone)':>25} {'(qgen decision)':>19}")
    flips = pruned_flips = 0
    full = sp.vstack(index._full, format="csr") if len(index._full) > 1 else index._full[0]  # every bank vector
    for name, queries in (("held out", held_q), ("perturbed copies", perturbed_q)):
        exact = exact_max(index, full, queries)
        pruned = index.max_similarity(queries)
        decided, near = index.near_copy_similarity(queries, THRESHOLD)
        f, p = report(name, exact, pruned, decided, near)
        flips, pruned_flips = flips + f, pruned_flips + p
        if name == "perturbed copies":
            share = float((exact >= THRESHOLD).mean())
            assert share >= 0.30, f"only {share:.0%} of the perturbed copies are at exact cosine >= 0.85"
    groups = [rng.sample(held_q + perturbed_q, 8) for _ in range(args.groups)]
    index.near_copy_similarity(groups[0], THRESHOLD)
    ms = []
    for g in groups:
        t = time.perf_counter()
        index.near_copy_similarity(g, THRESHOLD)
        ms.append((time.perf_counter() - t) * 1e3)
    median, p90 = float(np.median(ms)), float(np.percentile(ms, 90))
    print(f"\nnear_copy_similarity per group of 8 against {len(bank):,}: median {median:.1f} ms, p90 {p90:.1f} ms "
          f"({args.groups} groups)")  # fmt: skip
    print(f"novelty_flips={flips} novelty_1m_ms={median:.1f} novelty_pruned_flips={pruned_flips}")


if __name__ == "__main__":
    main()
