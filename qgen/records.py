"""Question records: one schema for every source, and the readers that produce it.

Every reader turns a file (or a hub dataset) into a list of :class:`Question`. Bad input never passes
silently: malformed JSON names the file and line, a missing field names the field, file and record, an
empty source is an error. Only ``skip_invalid=True`` skips bad records, and the count is returned so the
data summary can report it.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

FORMATS = ("math", "gaokao_bench", "tal_scq", "jsonl", "hf")


class DataError(ValueError):
    """Bad input data: the message names the file, line or record and the field."""


@dataclass
class Question:
    """One exam question, normalised from any source.

    ``difficulty`` is on a 0-1 scale (MATH level 1..5 -> 0..1, TAL-SCQ 0..4 -> 0..1, GAOKAO-Bench points / 20,
    capped at 1), ``None`` when the source has no label; ``level`` keeps the source's own label for prompts ("Level 3", "2", "12分").
    """

    id: str
    source: str
    language: str  # "zh" | "en"
    subject: str
    qtype: str  # "mcq" | "fill_blank" | "open_ended" | "single_choice" | "problem" | ...
    question: str  # 题干
    answer: str  # 参考答案
    analysis: str = ""  # 解析 / solution
    options: dict[str, str] = field(default_factory=dict)
    level: str = ""
    difficulty: float | None = None
    knowledge: list[str] = field(default_factory=list)
    context: str = ""  # 课本内容 / 课外内容, when the source has it
    year: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReadResult:
    records: list[Question]
    skipped: int = 0


_HAN = re.compile(r"[\u4e00-\u9fff]")


def detect_language(text: str) -> str:
    """``zh`` when at least 5% of the non-space characters are Han characters, else ``en``."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return "en"
    return "zh" if sum(bool(_HAN.match(c)) for c in chars) / len(chars) >= 0.05 else "en"


def last_boxed(text: str) -> str:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces balanced; ``""`` if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return ""
    i = text.find("{", start)
    if i < 0:
        return ""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return ""


def _require(rec: dict, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in keys:
        value = rec.get(key)
        if value is None or (isinstance(value, str | list) and len(value) == 0):
            raise DataError(f"{where}: missing required field '{key}'")


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)``; a malformed line raises :class:`DataError` naming file and line. A line
    that is not UTF-8 is yielded as a :class:`DataError` (naming file, line and byte), for the reader to raise,
    or to count as skipped under ``skip_invalid``.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, DataError(f"{path}, line {lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                                        f"column {err.start + 1}); re-save the file as UTF-8")  # fmt: skip
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: malformed JSON ({err.msg} at column {err.colno})") from None


def load_json(path: str) -> Any:
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                        "re-save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None


def expand_paths(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a directory (searched recursively for ``suffixes``) or a glob, sorted; error if nothing matches."""
    if os.path.isdir(path):
        found = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffixes)]
    elif any(ch in path for ch in "*?["):
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(path):
        found = [path]
    else:
        raise DataError(f"{path}: no such file or directory")
    if not found:
        raise DataError(f"{path}: no {'/'.join(suffixes)} files found")
    return sorted(found)


# ---------------------------------------------------------------------------------------------- readers
# Each format has a raw iterator (parsing: malformed JSON always fails) and a converter (validation: a
# missing field fails, or is skipped under ``skip_invalid``).


def _convert_math(rec: dict, where: str, ctx: str) -> dict:
    _require(rec, ("problem", "solution"), where)
    level = str(rec.get("level", ""))
    match = re.search(r"(\d)", level)
    return dict(
        id=str(rec.get("unique_id") or where),
        language="en",
        subject=str(rec.get("type") or rec.get("subject") or "math"),
        qtype="problem",
        question=rec["problem"],
        answer=str(rec.get("answer") or last_boxed(rec["solution"])),
        analysis=rec["solution"],
        level=level,
        difficulty=(int(match.group(1)) - 1) / 4 if match else None,
    )


_GAOKAO_SUBJECTS = {
    "Math": "数学", "Physics": "物理", "Chemistry": "化学", "Biology": "生物", "History": "历史",
    "Geography": "地理", "Political": "政治", "Chinese": "语文", "English": "英语",
}  # fmt: skip
_GAOKAO_TYPES = (
    ("MCQs", "mcq"), ("Fill-in-the-Blank", "fill_blank"), ("Fill_in_Blanks", "fill_blank"),
    ("Cloze", "cloze"), ("Open-ended", "open_ended"), ("Reading", "reading"), ("Dictation", "dictation"),
    ("Error_Correction", "error_correction"), ("Modern_Lit", "reading"),
)  # fmt: skip


def gaokao_subject_and_type(stem: str) -> tuple[str, str]:
    """Subject and question type from a GAOKAO-Bench file stem such as ``2010-2022_Math_I_MCQs``."""
    subject = next((zh for key, zh in _GAOKAO_SUBJECTS.items() if f"_{key}" in stem), "综合")
    qtype = next((t for key, t in _GAOKAO_TYPES if key in stem), "open_ended")
    return subject, qtype


def _convert_gaokao(rec: dict, where: str, stem: str) -> dict:
    _require(rec, ("question", "answer"), where)
    subject, qtype = gaokao_subject_and_type(stem)
    answer = rec["answer"]
    answer = "".join(map(str, answer)) if isinstance(answer, list) else str(answer)
    score = rec.get("score")
    return dict(
        id=f"{stem}:{rec.get('year', '')}:{rec.get('index', where)}",
        language="zh",
        subject=subject,
        qtype=qtype,
        question=str(rec["question"]).strip(),
        answer=answer.strip(),
        analysis=str(rec.get("analysis") or "").strip(),
        level=f"{score}分" if score is not None else "",
        # points as a (coarse) difficulty label: 5-point items -> 0.25, 12-point items -> 0.6, 20+ -> 1
        difficulty=min(float(score), 20.0) / 20.0 if isinstance(score, int | float) and score > 0 else None,
        year=str(rec.get("year", "")),
    )


def _convert_tal(rec: dict, where: str, ctx: str) -> dict:
    _require(rec, ("problem", "answer_option_list", "answer_value"), where)
    options = {}
    for group in rec["answer_option_list"]:
        for opt in group if isinstance(group, list) else [group]:
            options[str(opt.get("aoVal", "")).strip()] = str(opt.get("content", "")).strip()
    knowledge = [route.split("->")[-1] for route in rec.get("knowledge_point_routes") or [] if route]
    difficulty = str(rec.get("difficulty", ""))
    return dict(
        id=str(rec.get("queId") or rec.get("qid") or where),
        language=detect_language(rec["problem"]),
        subject="math",
        qtype="single_choice",
        question=rec["problem"].strip(),
        answer=str(rec["answer_value"]).strip(),
        analysis="\n".join(str(a).strip() for a in rec.get("answer_analysis") or []),
        options=options,
        level=difficulty,
        difficulty=min(int(difficulty), 4) / 4 if difficulty.isdigit() else None,
        knowledge=knowledge,
    )


def convert_mapped(rec: dict, where: str, mapping: dict[str, str], defaults: dict[str, Any] | None = None) -> dict:
    """Map a generic JSON object onto the schema: ``mapping`` is ``{schema_field: source_field}``; ``defaults``
    fill the fields the object lacks, before the built-in fallbacks (language detected, math, problem).
    """
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    get = {name: rec.get(mapping.get(name, name)) for name in Question.__dataclass_fields__}
    for key in ("question", "answer"):
        if get[key] in (None, "", []):
            raise DataError(f"{where}: missing required field '{mapping.get(key, key)}'")
    out = {k: v for k, v in get.items() if v is not None and k != "source"}
    for key in ("id", "question", "answer", "analysis", "subject", "qtype", "level", "context", "year", "language"):
        if key in out and not isinstance(out[key], str):
            out[key] = "".join(map(str, out[key])) if isinstance(out[key], list) else str(out[key])
    if isinstance(out.get("knowledge"), str):
        out["knowledge"] = [out["knowledge"]]
    if "difficulty" in out:
        try:
            out["difficulty"] = float(out["difficulty"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: field '{mapping.get('difficulty', 'difficulty')}' must be a number in [0, 1], "
                            f"got {out['difficulty']!r}") from None  # fmt: skip
        if not 0.0 <= out["difficulty"] <= 1.0:
            raise DataError(f"{where}: field '{mapping.get('difficulty', 'difficulty')}' must be in [0, 1], "
                            f"got {out['difficulty']}")  # fmt: skip
    if not isinstance(out.get("knowledge", []), list):
        field_name = mapping.get("knowledge", "knowledge")
        raise DataError(f"{where}: field '{field_name}' must be a string or a list of strings")
    for key, value in (defaults or {}).items():
        out.setdefault(key, value)
    out.setdefault("id", where)
    out.setdefault("language", detect_language(out["question"]))
    out.setdefault("subject", "math")
    out.setdefault("qtype", "problem")
    return out


def _raw_jsonl(files: list[str]) -> Iterator[tuple[str, Any, str]]:
    for path in files:
        for lineno, rec in iter_jsonl(path):
            yield f"{path}, line {lineno}", rec, path


def _raw_gaokao(files: list[str]) -> Iterator[tuple[str, Any, str]]:
    for path in files:
        doc = load_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("example"), list):
            raise DataError(f"{path}: expected a GAOKAO-Bench object {{'keywords': ..., 'example': [...]}}")
        stem = str(doc.get("keywords") or os.path.splitext(os.path.basename(path))[0])
        for i, rec in enumerate(doc["example"]):
            yield f"{path}, record {i}", rec, stem


def _raw_hf(path: str, split: str) -> Iterator[tuple[str, Any, str]]:
    import datasets  # imported lazily: only this format needs it

    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(path, split=split)
    for i, rec in enumerate(ds):
        yield f"{path} [{split}], record {i}", rec, path


_SUFFIXES = {"math": (".jsonl",), "gaokao_bench": (".json",), "tal_scq": (".jsonl",), "jsonl": (".jsonl",)}


def read_source(
    format: str,
    path: str,
    name: str | None = None,
    mapping: dict[str, str] | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    **defaults: Any,
) -> ReadResult:
    """Read one source into records.

    Args:
        format: one of ``FORMATS``.
        path: a file, directory or glob (``hf``: a hub id or a ``save_to_disk`` folder).
        name: the source name written into each record (default: the format).
        mapping: for ``jsonl``/``hf``, ``{schema_field: source_field}``.
        split: for ``hf``, the split to read.
        skip_invalid: skip records with a missing field instead of failing; malformed JSON always fails.
        **defaults: schema fields applied to every record that lacks them (e.g. ``subject``, ``language``).
    """
    if format not in FORMATS:
        raise DataError(f"unknown source format '{format}' for {path}; supported formats: {', '.join(FORMATS)}")
    unknown = set(defaults) - set(Question.__dataclass_fields__)
    if unknown:
        import difflib

        options = ["format", "path", "name", "mapping", "split", "skip_invalid"]
        hints = [f"'{u}' -> did you mean '{m[0]}'?" for u in sorted(unknown)
                 if (m := difflib.get_close_matches(u, options + list(Question.__dataclass_fields__), n=1))]  # fmt: skip
        raise DataError(
            f"source {path}: unknown option(s) {sorted(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
            + f"; source options are: {', '.join(options)}; any other key must be a record field given as a "
            f"default for every record: {', '.join(f for f in Question.__dataclass_fields__ if f != 'source')}"
        )
    if format == "hf":
        raw = _raw_hf(path, split)
    elif format == "gaokao_bench":
        raw = _raw_gaokao(expand_paths(path, _SUFFIXES[format]))
    else:
        raw = _raw_jsonl(expand_paths(path, _SUFFIXES[format]))
    convert = {"math": _convert_math, "gaokao_bench": _convert_gaokao, "tal_scq": _convert_tal}.get(format)
    records, skipped = [], 0
    for where, rec, ctx in raw:
        try:
            if isinstance(rec, DataError):  # a line that could not even be decoded
                raise rec
            if convert is None:
                fields = convert_mapped(rec, where, mapping or {}, defaults)
            else:
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                fields = convert(rec, where, ctx)
            fields = {**{k: v for k, v in defaults.items() if k not in fields}, **fields}
            question = Question(source=name or format, **fields)
        except (TypeError, ValueError) as err:  # DataError included; anything else is named here
            if not skip_invalid:
                raise err if isinstance(err, DataError) else DataError(f"{where}: invalid record ({err})") from None
            skipped += 1
            continue
        records.append(question)
    if not records:
        suffix = f" ({skipped} invalid records skipped)" if skipped else ""
        raise DataError(f"source {path} ({format}) holds no records{suffix}")
    return ReadResult(records, skipped)
