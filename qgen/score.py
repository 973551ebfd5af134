"""``python -m qgen score``: score a file of questions with the reward scorers, no model needed.

    python -m qgen score --input math:../shared/data/math/test.jsonl \
        --difficulty-train math:../shared/data/math/train.jsonl \
        --reference math:../shared/data/qwen25_math_eval/aime24/test.jsonl \
        --reference gaokao_bench:../shared/data/gaokao_bench_updates --output scored.jsonl

Sources are ``FORMAT:PATH`` (formats of ``qgen.records``; ``jsonl`` also reads qgen's own files). For each
question: predicted difficulty, rigor, novelty against ``--bank`` (default: the difficulty training
questions) and a **contamination** check: the most similar ``--reference`` question, flagged at
``--threshold`` or above (numbers are normalised, so a renumbered copy is still a copy). A summary table
is printed: counts, means, the Spearman correlation of predicted difficulty with the input's own labels
where it has them, and the contaminated questions.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from qgen.formatting import ParsedQuestion
from qgen.records import DataError, Question, read_source
from qgen.scoring import NoveltyIndex, QuestionScorer, ScoringBatch


def read_spec(spec: str) -> list[Question]:
    """Records of a ``FORMAT:PATH`` source."""
    fmt, sep, path = spec.partition(":")
    if not sep:
        raise DataError(f"source '{spec}' must be FORMAT:PATH, e.g. math:../shared/data/math/test.jsonl")
    return read_source(fmt, path, name=path).records


def score_records(records: list[Question], scorer: QuestionScorer, reference: NoveltyIndex | None,
                  reference_records: list[Question], threshold: float) -> list[dict]:  # fmt: skip
    """One result row per record (see the module docstring): the scorer's components (the same
    :class:`~qgen.scoring.QuestionScorer` as the reward callbacks and ``predict``), and the contamination check.
    """
    batch = ScoringBatch(
        texts=[r.question for r in records],
        parsed=[ParsedQuestion(r.question, r.answer, r.analysis, r.options, valid=bool(r.question and r.answer))
                for r in records],
        records=list(records), languages=[r.language for r in records], truncated=[False] * len(records),
    )  # fmt: skip
    scores = scorer.score(batch, threshold)
    sims, where = (
        reference.nearest(batch.texts) if reference is not None else (np.zeros(len(records)), -np.ones(len(records), int))
    )
    rows = []
    for i, r in enumerate(records):
        match = reference_records[where[i]] if where[i] >= 0 else None
        rows.append({
            "id": r.id, "source": r.source, "language": r.language, "subject": r.subject, "question": r.question,
            "label_difficulty": r.difficulty, "difficulty": scores["difficulty"][i], "rigor": scores["rigor"][i],
            "answer_consistent": scores["answer_consistent"][i], "answer_check": scores["answer_check"][i],
            "novelty": scores["novelty"][i] if scorer.bank is not None else float("nan"),
            "reference_similarity": float(sims[i]), "contaminated": bool(sims[i] >= threshold),
            "reference_match": {"id": match.id, "source": match.source} if match is not None and sims[i] >= threshold else None,
        })  # fmt: skip
    return rows


def summarize(rows: list[dict]) -> dict:
    from scipy.stats import spearmanr

    labelled = [(r["difficulty"], r["label_difficulty"]) for r in rows if r["label_difficulty"] is not None]
    varied = len({label for _, label in labelled}) > 1  # one label everywhere: no correlation is defined
    rho = float(spearmanr(*zip(*labelled))[0]) if len(labelled) >= 3 and varied else None
    return {
        "questions": len(rows),
        "mean_difficulty": float(np.mean([r["difficulty"] for r in rows])),
        "mean_rigor": float(np.mean([r["rigor"] for r in rows])),
        # shares of all rows: verified consistent, verified inconsistent (the rest could not be verified)
        "answer_consistent": float(np.mean([r["answer_consistent"] is True for r in rows])),
        "answer_inconsistent": float(np.mean([r["answer_consistent"] is False for r in rows])),
        "mean_novelty": float(np.nanmean([r["novelty"] for r in rows])) if any(r["novelty"] == r["novelty"] for r in rows) else None,
        "difficulty_spearman_vs_labels": rho,
        "labelled": len(labelled),
        "contaminated": sum(r["contaminated"] for r in rows),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgen score", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="FORMAT:PATH of the questions to score")
    parser.add_argument("--output", help="JSONL with one scored row per question")
    parser.add_argument("--difficulty-train", action="append", default=[], help="FORMAT:PATH of labelled questions")
    parser.add_argument("--bank", action="append", default=[], help="FORMAT:PATH of known questions for novelty")
    parser.add_argument("--reference", action="append", default=[], help="FORMAT:PATH of a benchmark to check against")
    parser.add_argument("--threshold", type=float, default=0.85, help="similarity that counts as contamination")
    args = parser.parse_args(argv)
    try:
        records = read_spec(args.input)
        train = [r for spec in args.difficulty_train for r in read_spec(spec)]
        known = [r for spec in args.bank for r in read_spec(spec)] or train
        refs = [r for spec in args.reference for r in read_spec(spec)]
    except (DataError, FileNotFoundError) as err:
        print(f"qgen score: {err}", file=sys.stderr)
        return 2
    scorer = QuestionScorer.fit(train, [r.question for r in known], args.threshold)
    rows = score_records(records, scorer, NoveltyIndex([r.question for r in refs], top_k=None) if refs else None, refs,
                         args.threshold)  # fmt: skip
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    summary = summarize(rows)
    print(f"{'metric':<32} value")
    for key, value in summary.items():
        if key == "difficulty_spearman_vs_labels" and value is None and summary["labelled"]:
            value = "n/a (the labels are all equal)" if summary["labelled"] >= 3 else "n/a (fewer than 3 labels)"
        print(f"{key:<32} {value if not isinstance(value, float) else f'{value:.3f}'}")
    for r in [r for r in rows if r["contaminated"]][:50]:
        print(f"contaminated: {r['id']} ~ {r['reference_match']['id']} (similarity {r['reference_similarity']:.3f})")
    return 0
