"""PredictionWriter: ``python -m qgen predict`` output as JSONL, scored, flushed batch by batch, resumable."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from qgen.formatting import ParsedQuestion
from qgen.scoring import QuestionScorer, ScoringBatch


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

    Under DDP every rank generates its share: rank ``r`` > 0 writes ``<output>.rank<r>``, every rank skips
    the keys of all these files, and at the end rank 0 moves the rank files' rows into ``output`` (once
    per key: the distributed sampler repeats a few prompts to even out the shards) and deletes them. A
    run killed before that leaves the rank files, and the next run (any number of processes) merges them.

    Args:
        output: the JSONL file.
        threshold: similarity above which a question is flagged as a near-copy of a training question.
        overwrite: start the file afresh instead of completing it.
    """

    def __init__(self, output: str = "predictions.jsonl", threshold: float = 0.85, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output, self.threshold, self.overwrite = output, threshold, overwrite
        self.path = output
        self.scorer: QuestionScorer | None = None  # the run's (qgen.scoring.QuestionScorer)
        self.written = 0
        self.seen: set[str] = set()  # keys written by this process in this run

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self.path = self.output if trainer.global_rank == 0 else f"{self.output}.rank{trainer.global_rank}"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.overwrite:  # each rank removes its own file; rank 0 also those of an earlier, larger world
            larger = [p for r, p in self._rank_files().items() if r >= trainer.world_size]
            for path in [self.path, *(larger if trainer.global_rank == 0 else [])]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            done: set[str] = set()
        else:
            done = set().union(*(read_written(path) for path in [self.output, *self._rank_files().values()]))
        self.seen = set()
        if trainer.datamodule is not None:
            trainer.datamodule.skip_prediction_keys = done
            self.scorer = QuestionScorer.for_datamodule(trainer.datamodule)
        if done:
            print(f"{self.path}: {len(done)} predictions already written; generating the rest")

    def score(self, rows: list[dict[str, Any]]) -> None:
        scorer = self.scorer or QuestionScorer()
        knowledge = [row.get("knowledge") or [] for row in rows]
        batch = ScoringBatch(
            texts=[r["text"] for r in rows],
            parsed=[ParsedQuestion(r["question"], r["answer"], r["analysis"], r["options"], r["valid"]) for r in rows],
            records=[None] * len(rows), languages=[r.get("language", "en") for r in rows],
            truncated=[bool(r["truncated"]) for r in rows], subjects=[r.get("subject", "") for r in rows],
            knowledge=[[k] if isinstance(k, str) else list(k) for k in knowledge],
        )  # fmt: skip
        scores = scorer.score(batch, self.threshold)
        for i, row in enumerate(rows):
            row["scores"] = {
                "difficulty": round(scores["difficulty"][i], 4),
                "rigor": round(scores["rigor"][i], 4),
                "answer_consistent": scores["answer_consistent"][i],
                "novelty": round(scores["novelty"][i], 4),
                "educational_value": round(scores["educational_value"][i], 4),
                "max_similarity": round(scores["max_similarity"][i], 4),
                "near_copy": scores["near_copy"][i],
            }  # fmt: skip

    def _rank_files(self) -> dict[int, str]:
        """``{rank: path}`` of the ``<output>.rank<r>`` files on disk."""
        found = {}
        for path in glob.glob(glob.escape(self.output) + ".rank*"):
            suffix = path[len(self.output) + len(".rank") :]
            if suffix.isdigit():
                found[int(suffix)] = path
        return dict(sorted(found.items()))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        rows = [row for row in prediction if row["key"] not in self.seen]
        self.seen.update(row["key"] for row in rows)
        self.score(rows)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            fh.flush()
        self.written += len(rows)

    def on_predict_end(self, trainer, pl_module) -> None:
        print(f"wrote {self.written} predictions to {self.path}")
        if trainer.world_size > 1:
            trainer.strategy.barrier("PredictionWriter.merge")  # every rank has flushed its file
        if trainer.global_rank == 0:
            self.merge_rank_files()

    def merge_rank_files(self) -> int:
        """Append the rows of ``<output>.rank*`` whose keys ``output`` lacks, then delete those files."""
        done, moved = read_written(self.output), 0
        for path in self._rank_files().values():
            read_written(path)  # cuts a torn last line
            with open(path, encoding="utf-8") as src, open(self.output, "a", encoding="utf-8") as out:
                for line in src:
                    key = json.loads(line)["key"]
                    if key not in done:
                        done.add(key)
                        out.write(line)
                        moved += 1
            os.remove(path)
        if moved:
            print(f"merged {moved} predictions of the other ranks into {self.output}")
        return moved
