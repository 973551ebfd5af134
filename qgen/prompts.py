"""Generation prompts: a prompts file (``data.predict_prompts``) or a split's records as tokenized chat prompts.

A prompts file is JSONL, one ``{id?, subject, type?, level?, difficulty?, language?, knowledge?, context?, task?,
question?, n?}`` per line, validated line by line (a bad line is named with its file and line number). Each
prompt becomes ``n`` items keyed ``<id or line<N>>#<k>``. The data module builds the ``predict`` / ``test``
datasets from here; :mod:`qgen.generation` samples from them.
"""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import Dataset

from qgen.backends.rollout import left_pad
from qgen.records import DataError, Question, detect_language, iter_jsonl
from qgen.tasks import TASKS, prompt_messages, target_text


def read_prompts(path: str, default_n: int = 1) -> list[dict[str, Any]]:
    """Prompt rows of a JSONL file, validated; each gets ``key_base`` (its ``id`` or ``line<N>``) and ``n``."""
    if not os.path.isfile(path):
        raise DataError(f"prompts file {path} does not exist")
    rows = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}, line {lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if not str(obj.get("subject") or "").strip():
            raise DataError(f"{where}: missing required field 'subject'")
        task = obj.get("task") or ("variant" if obj.get("question") else "historical")
        if task not in TASKS:
            raise DataError(f"{where}: unknown task '{task}'; tasks: {', '.join(TASKS)}")
        if task == "variant" and not str(obj.get("question") or "").strip():
            raise DataError(f"{where}: task 'variant' needs the field 'question' (the question to vary)")
        n = obj.get("n", default_n)
        if not isinstance(n, int) or n < 1:
            raise DataError(f"{where}: 'n' must be a positive integer, got {n!r}")
        rows.append({**obj, "task": task, "n": n, "key_base": str(obj.get("id", f"line{lineno}"))})
    if not rows:
        raise DataError(f"prompts file {path} is empty")
    return rows


def prompt_record(row: dict[str, Any]) -> tuple[Question, Question | None]:
    """A prompt row as the (answer-less) record the task prompts are built from, and the question to vary."""
    knowledge = row.get("knowledge") or []
    knowledge = [knowledge] if isinstance(knowledge, str) else list(knowledge)
    language = row.get("language") or detect_language(f"{row['subject']} {' '.join(knowledge)}")
    level = str(row.get("level") or (f"{row['difficulty']}" if row.get("difficulty") is not None else ""))
    rec = Question(id=row["key_base"], source="prompts", language=language, subject=row["subject"],
                   qtype=row.get("type") or ("mcq" if language == "zh" else "problem"), question="", answer="",
                   level=level, knowledge=knowledge, context=row.get("context") or "")  # fmt: skip
    partner = None
    if row["task"] == "variant":
        partner = Question(id=f"{row['key_base']}-given", source="prompts", language=language,
                           subject=row["subject"], qtype=rec.qtype, question=row["question"], answer="")  # fmt: skip
    return rec, partner


class PromptDataset(Dataset):
    """Tokenized generation prompts; item ``i`` is one sample (``key`` = ``<prompt key>#<k>``)."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def build_prompt_items(tokenizer, rows: list[tuple[str, Question, Question | None, str, dict, str | None]],
                       n: int | list[int], skip: set[str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """``rows`` of (key base, record, partner, task, fields, reference) -> one item per sample not in ``skip``."""
    skip = skip or set()
    items = []
    for j, (base, rec, partner, task, fields, reference) in enumerate(rows):
        count = n[j] if isinstance(n, list) else n
        keys = [f"{base}#{k}" for k in range(count) if f"{base}#{k}" not in skip]
        if not keys:
            continue
        text = tokenizer.apply_chat_template(prompt_messages(task, rec, partner), add_generation_prompt=True,
                                             tokenize=False, enable_thinking=False)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        meta = {"task": task, "language": rec.language, **fields}
        items.extend({"key": key, "prompt_ids": ids, "meta": meta, "reference": reference} for key in keys)
    return items


def collate_prompts(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    ids, mask = left_pad([it["prompt_ids"] for it in items], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "keys": [it["key"] for it in items],
            "meta": [it["meta"] for it in items], "references": [it["reference"] for it in items]}  # fmt: skip


def split_prompt_rows(records: list[Question]) -> list[tuple]:
    """Historical-task prompts for the records of a split, with the records as references."""
    rows = []
    for rec in records:
        fields = {"id": rec.id, "source": rec.source, "subject": rec.subject, "type": rec.qtype,
                  "level": rec.level, "knowledge": rec.knowledge}  # fmt: skip
        rows.append((f"{rec.source}:{rec.id}", rec, None, "historical", fields, target_text(rec)))
    return rows
