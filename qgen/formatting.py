"""The assistant target format, and its parser.

A generated question is plain text with fixed section headers at line starts, so every later stage
(rewards, prediction, evaluation) can read it back:

- Chinese: ``题干：`` / ``选项：`` (optional, lines ``A. ...``) / ``参考答案：`` / ``解析：``
- English: ``Question:`` / ``Options:`` (optional) / ``Answer:`` / ``Solution:``

The parser also accepts the common gaokao markers ``【答案】``/``【解析】``/``【详解】``, English
``Explanation:``, full- or half-width colons, and options written inline in the stem. Unparseable text
is returned with ``valid=False``, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

HEADERS = {
    "zh": {"question": "题干", "options": "选项", "answer": "参考答案", "analysis": "解析"},
    "en": {"question": "Question", "options": "Options", "answer": "Answer", "analysis": "Solution"},
}

_ALIASES = {
    "question": ["题干", "题目", "问题", "Question", "Problem"],
    "options": ["选项", "Options", "Choices"],
    "answer": ["参考答案", "答案", "Answer", "Final Answer"],
    "analysis": ["解析", "详解", "分析", "解答", "Solution", "Explanation", "Analysis"],
}
_ALIAS_TO_KEY = {alias.lower(): key for key, aliases in _ALIASES.items() for alias in aliases}
_HEADER_RE = re.compile(
    r"^[ \t]*(?:【(?P<b>" + "|".join(sum(_ALIASES.values(), [])) + r")】[:：]?"
    r"|(?P<h>" + "|".join(sorted(sum(_ALIASES.values(), []), key=len, reverse=True)) + r")[ \t]*[:：])",
    re.MULTILINE | re.IGNORECASE,
)
_OPTION_RE = re.compile(r"(?:^|\s)([A-H])[\.．、:：)）]\s*(.+?)(?=\s+[A-H][\.．、:：)）]|\n|$)", re.MULTILINE)


@dataclass
class ParsedQuestion:
    question: str = ""
    answer: str = ""
    analysis: str = ""
    options: dict[str, str] = field(default_factory=dict)
    valid: bool = False
    problems: list[str] = field(default_factory=list)


def render_target(
    question: str, answer: str, analysis: str = "", options: dict[str, str] | None = None, language: str = "en"
) -> str:
    """The assistant text for one question, in the section format of ``language``."""
    h = HEADERS["zh" if language == "zh" else "en"]
    colon = "：" if language == "zh" else ":"
    parts = [f"{h['question']}{colon}{'' if language == 'zh' else ' '}{question.strip()}"]
    if options:
        lines = "\n".join(f"{k}. {v}" for k, v in options.items())
        parts.append(f"{h['options']}{colon}\n{lines}")
    sep = "" if language == "zh" else " "
    parts.append(f"{h['answer']}{colon}{sep}{answer.strip()}")
    if analysis.strip():
        parts.append(f"{h['analysis']}{colon}{sep}{analysis.strip()}")
    return "\n".join(parts)


def parse_options(text: str) -> dict[str, str]:
    """Options ``A. ...`` (also ``A、``/``A．``/``A)``), one per line or several on a line."""
    return {m.group(1): m.group(2).strip() for m in _OPTION_RE.finditer(text)}


def parse_question(text: str) -> ParsedQuestion:
    """Split model text into question / options / answer / analysis.

    ``valid`` holds when a question and an answer were found; ``problems`` lists what is missing.
    """
    out = ParsedQuestion()
    matches = list(_HEADER_RE.finditer(text))
    sections: dict[str, str] = {}
    for i, m in enumerate(matches):
        key = _ALIAS_TO_KEY[(m.group("b") or m.group("h")).lower()]
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections.setdefault(key, text[m.end() : end].strip())
    if matches and "question" not in sections and text[: matches[0].start()].strip():
        sections["question"] = text[: matches[0].start()].strip()  # gaokao style: stem, then 【答案】
    out.question = sections.get("question", "")
    out.answer = sections.get("answer", "")
    out.analysis = sections.get("analysis", "")
    out.options = parse_options(sections["options"]) if "options" in sections else {}
    if not out.options and out.question:
        inline = parse_options(out.question)
        if len(inline) >= 2 and list(inline)[:2] == ["A", "B"]:
            out.options = inline
    for key in ("question", "answer"):
        if not getattr(out, key):
            out.problems.append(f"missing {key}")
    out.valid = not out.problems
    return out
