"""The SFT task mixture: how question records become chat examples.

Every example's target is a *real* record rendered in the section format of :mod:`qgen.formatting`;
no answer is ever invented. The three tasks differ only in what the prompt shows:

- ``historical`` (default 50%): subject, question type, level and knowledge points -> the record.
- ``variant`` (30%): another real question of the same subject and language whose TF-IDF similarity to
  the record lies in ``[variant_min_sim, variant_max_sim)`` (similar, not a duplicate), plus an instruction
  to change its conditions -> the record. Of the partners in range the most similar one is used. A record
  with no partner in range falls back to ``historical``; the count is reported as ``variant_fallback``.
- ``innovative`` (20%): subject and knowledge points plus an instruction to write a question unlike the
  known ones -> the record.

Tasks are assigned per record by a seeded RNG in the mixture's proportions, so a given seed always gives
the same examples. The same prompts are used by GRPO (``prompt_messages``) and by prediction.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from qgen.formatting import render_target
from qgen.records import Question

TASKS = ("historical", "variant", "innovative")

SYSTEM_PROMPT = {
    "zh": "你是一名资深命题专家，负责命制规范、严谨、有区分度的试题。",
    "en": "You are an expert writer of math competition and exam questions.",
}
_QTYPE_ZH = {
    "mcq": "选择题", "single_choice": "单项选择题", "fill_blank": "填空题", "open_ended": "解答题",
    "cloze": "完形填空题", "reading": "阅读理解题", "dictation": "默写题", "error_correction": "改错题",
    "problem": "解答题",
}  # fmt: skip
_QTYPE_EN = {"mcq": "multiple-choice", "single_choice": "multiple-choice", "fill_blank": "fill-in-the-blank",
             "open_ended": "free-response", "problem": "free-response"}  # fmt: skip


@dataclass
class Example:
    task: str
    record: Question
    messages: list[dict[str, str]]  # system, user, assistant
    partner_id: str | None = None


@dataclass
class MixtureStats:
    tasks: Counter = field(default_factory=Counter)
    variant_fallback: int = 0


def _describe(rec: Question) -> tuple[str, str]:
    """(question type phrase, conditions phrase) for a prompt in the record's language."""
    if rec.language == "zh":
        qtype = _QTYPE_ZH.get(rec.qtype, rec.qtype)
        cond = [
            f"难度：{rec.level}" if rec.level else "",
            f"考查知识点：{'、'.join(rec.knowledge)}" if rec.knowledge else "",
        ]
        if rec.context:
            cond.append(f"参考材料：{rec.context}")
    else:
        qtype = _QTYPE_EN.get(rec.qtype, rec.qtype)
        cond = [
            f"Difficulty: {rec.level}" if rec.level else "",
            f"Topics: {', '.join(rec.knowledge)}" if rec.knowledge else "",
        ]
        if rec.context:
            cond.append(f"Context: {rec.context}")
    return qtype, "\n".join(c for c in cond if c)


def user_prompt(task: str, rec: Question, partner: Question | None = None) -> str:
    """The user message of ``task`` for target record ``rec`` (``partner``: the question to vary)."""
    qtype, cond = _describe(rec)
    zh = rec.language == "zh"
    if task == "historical":
        head = f"请命制一道{rec.subject}{qtype}。" if zh else f"Write a {qtype} {rec.subject} problem."
    elif task == "variant":
        assert partner is not None, "a variant prompt needs the question to vary"
        head = (
            f"下面是一道{rec.subject}题：\n{partner.question}\n请改变这道题的条件（数据、设问或情境），命制一道相似但不重复的新{qtype}。"
            if zh
            else f"Here is a {rec.subject} problem:\n{partner.question}\n"
            f"Change its conditions (numbers, what is asked, or the setting) to write a similar but new {qtype} problem."
        )
    elif task == "innovative":
        head = (
            f"请围绕下列要求命制一道{rec.subject}{qtype}，要求立意新颖，不得与已有试题雷同。"
            if zh
            else f"Write an original {qtype} {rec.subject} problem that differs from known problems."
        )
    else:
        raise ValueError(f"unknown task '{task}'; tasks: {', '.join(TASKS)}")
    tail = "请按“题干 / 参考答案 / 解析”的格式给出。" if zh else "Give it as Question / Answer / Solution."
    return "\n".join(part for part in (head, cond, tail) if part)


def prompt_messages(task: str, rec: Question, partner: Question | None = None) -> list[dict[str, str]]:
    lang = "zh" if rec.language == "zh" else "en"
    return [
        {"role": "system", "content": SYSTEM_PROMPT[lang]},
        {"role": "user", "content": user_prompt(task, rec, partner)},
    ]


def target_text(rec: Question) -> str:
    return render_target(rec.question, rec.answer, rec.analysis, rec.options, rec.language)


def variant_partners(records: list[Question], wanted: list[int], min_sim: float, max_sim: float) -> dict[int, int]:
    """For each index in ``wanted``, the most similar other record of the same subject and language with
    TF-IDF (character 1-3 gram) cosine similarity in ``[min_sim, max_sim)``; indices without one are absent.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    groups: dict[tuple[str, str], list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault((rec.subject, rec.language), []).append(i)
    wanted_set, partners = set(wanted), {}
    for members in groups.values():
        rows = [i for i in members if i in wanted_set]
        if not rows or len(members) < 2:
            continue
        vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
        mat = vec.fit_transform([records[i].question for i in members])
        pos = {idx: k for k, idx in enumerate(members)}
        sims = (mat[[pos[i] for i in rows]] @ mat.T).toarray()  # [rows, members]
        for r, i in enumerate(rows):
            sim = sims[r]
            sim[pos[i]] = -1.0
            ok = np.where((sim >= min_sim) & (sim < max_sim))[0]
            if len(ok):
                partners[i] = members[int(ok[np.argmax(sim[ok])])]
    return partners


def build_examples(
    records: list[Question], mixture: dict[str, float], seed: int, min_sim: float = 0.3, max_sim: float = 0.85
) -> tuple[list[Example], MixtureStats]:
    """One example per record, its task drawn from ``mixture`` (normalised) by a seeded RNG."""
    unknown = set(mixture) - set(TASKS)
    if unknown or not mixture or any(w < 0 for w in mixture.values()) or sum(mixture.values()) <= 0:
        raise ValueError(
            f"task_mixture must map {list(TASKS)} to non-negative weights with a positive sum, got {mixture}"
        )
    names = [t for t in TASKS if mixture.get(t, 0) > 0]
    rng = random.Random(seed)
    assigned = rng.choices(names, weights=[mixture[t] for t in names], k=len(records))
    partners = variant_partners(records, [i for i, t in enumerate(assigned) if t == "variant"], min_sim, max_sim)
    stats, examples = MixtureStats(), []
    for i, (rec, task) in enumerate(zip(records, assigned)):
        partner = records[partners[i]] if i in partners else None
        if task == "variant" and partner is None:
            task, stats.variant_fallback = "historical", stats.variant_fallback + 1
        messages = prompt_messages(task, rec, partner) + [{"role": "assistant", "content": target_text(rec)}]
        examples.append(Example(task, rec, messages, partner.id if partner else None))
        stats.tasks[task] += 1
    return examples, stats
