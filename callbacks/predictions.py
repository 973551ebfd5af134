"""PredictionWriter: ``python -m qgen predict`` output as JSONL, scored, flushed batch by batch, resumable."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from qgen.formatting import ParsedQuestion
from qgen.scoring import DifficultyModel, NoveltyIndex, educational_value, rigor_score


def read_written(path: str) -> set[str]:
    """Keys already in ``path``. A torn last line (the run was killed mid-write) is cut off the file."""
    if not os.path.exists(path):
        return set()
    keys: set[str] = set()
    good_end = 0
    with open(path, "rb") as fh:
        data = fh.read()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            keys.add(json.loads(line)["key"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            if good_end + len(line) < len(data):  # a bad line in the middle is someone else's edit: refuse
                lineno = data[:good_end].count(b"\n") + 1
                raise ValueError(f"{path}: line {lineno} is not a prediction row; move the file away or fix it") from None
            break
        good_end += len(line)
    if good_end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return keys


class PredictionWriter(BasePredictionWriter):
    """Write each predicted question as one JSON line, with its reward-component scores.

    Rows are written and flushed after every batch, so a killed run keeps everything it finished; a rerun
    with the same ``output`` reads the keys already there (``<prompt id>#<sample>``) and generates only
    the missing ones, so the file ends complete, with no duplicate. Scores (no model needed): predicted
    ``difficulty`` (ridge fitted on the training records' labels, else the heuristic), ``rigor``,
    ``novelty`` (1 - max TF-IDF similarity to the training questions; ``near_copy`` above ``threshold``)
    and ``educational_value``.

    Args:
        output: the JSONL file; under DDP, rank ``r`` > 0 writes ``<output>.rank<r>``.
        threshold: similarity above which a question is flagged as a near-copy of a training question.
        overwrite: start the file afresh instead of completing it.
    """

    def __init__(self, output: str = "predictions.jsonl", threshold: float = 0.85, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output, self.threshold, self.overwrite = output, threshold, overwrite
        self.path = output
        self.difficulty: DifficultyModel | None = None
        self.bank: NoveltyIndex | None = None
        self.written = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self.path = self.output if trainer.global_rank == 0 else f"{self.output}.rank{trainer.global_rank}"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.overwrite and os.path.exists(self.path):
            os.remove(self.path)
        done = read_written(self.path)
        if trainer.datamodule is not None:
            trainer.datamodule.skip_prediction_keys = done
            train = trainer.datamodule.load_records()["train"]
            self.difficulty = DifficultyModel().fit(train)
            self.bank = NoveltyIndex([r.question for r in train])
        if done:
            print(f"{self.path}: {len(done)} predictions already written; generating the rest")

    def score(self, rows: list[dict[str, Any]]) -> None:
        questions = [r["question"] or r["text"] for r in rows]
        difficulty = (self.difficulty or DifficultyModel()).predict(
            questions, [r["analysis"] for r in rows], [r.get("subject", "") for r in rows]
        )
        sims = self.bank.max_similarity(questions) if self.bank is not None else np.zeros(len(rows))
        for row, d, s in zip(rows, difficulty, sims):
            parsed = ParsedQuestion(row["question"], row["answer"], row["analysis"], row["options"], row["valid"])
            knowledge = row.get("knowledge") or []
            knowledge = [knowledge] if isinstance(knowledge, str) else knowledge
            row["scores"] = {
                "difficulty": round(float(d), 4),
                "rigor": round(rigor_score(parsed, row.get("language", "en"), row["truncated"]), 4),
                "novelty": round(float(1.0 - s), 4),
                "educational_value": round(educational_value(parsed, row.get("language", "en"), knowledge), 4),
                "max_similarity": round(float(s), 4),
                "near_copy": bool(s > self.threshold),
            }  # fmt: skip

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.score(prediction)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction)
            fh.flush()
        self.written += len(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        print(f"wrote {self.written} predictions to {self.path}")
