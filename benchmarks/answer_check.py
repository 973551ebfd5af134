r"""Does the answer check tell a right stated answer from a wrong one? MATH test and GAOKAO-Bench maths.

For every question with a final answer in its solution (MATH: the last ``\\boxed{}``; GAOKAO-Bench: the
options and the solution's "故选 X", or its concluding value for fill-in-the-blank items), two stated answers
are checked against the *solution* (``qgen.answers.check_answers``, exactly what the rigor reward does):

- **true**, restated in an equivalent but different form wherever one exists, so string equality with the
  ``\\boxed{}`` is not enough: ``\\frac{a}{b}`` as ``a/b`` (or its decimal when it terminates), an integer
  ``12`` as ``12.0``, ``\\frac`` as ``\\dfrac``, interval and tuple commas with spaces; a multiple-choice
  letter stays a letter;
- **perturbed**: a digit changed, +-1, the sign flipped, the reciprocal, an interval bracket flipped, or
  another option letter. A perturbation that is still mathematically equal to the original (checked
  numerically with sympy, independently of math-verify) is dropped; the counts per type are printed.

Acceptance of true answers and detection of perturbed ones, and the ROC AUC of ``qgen score``'s rigor
between the two (same question, same solution; only the stated answer differs).

    python benchmarks/answer_check.py [--limit N] [--seed 0]

Summary line: ``answer_check_accept=… answer_check_detect=… rigor_auc=…``.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qgen.answers import check_answers, last_boxed_content, solution_answer, solution_choice  # noqa: E402
from qgen.formatting import ParsedQuestion, parse_options  # noqa: E402
from qgen.records import read_source  # noqa: E402
from qgen.scoring import rigor_score  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
_FRAC = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")
_INT = re.compile(r"^-?\d+$")


def restate(answer: str) -> str:
    """An equivalent, differently written form of a MATH answer (the answer itself when none is known)."""
    a = answer.strip()
    m = _FRAC.match(a)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        d = den
        for p in (2, 5):
            while d % p == 0:
                d //= p
        return f"{num / den:g}" if d == 1 and len(f"{num / den:g}") < 10 else f"{num}/{den}"
    if _INT.match(a):
        return f"{a}.0"
    if "\\frac" in a and "\\dfrac" not in a:
        return a.replace("\\frac", "\\dfrac")
    if re.match(r"^[\(\[].*,.*[\)\]]$", a):
        return re.sub(r"\s*,\s*", ", ", a)
    return a


def perturbations(answer: str, rng: random.Random) -> list[tuple[str, str]]:
    """``(kind, perturbed)`` forms of an answer that should no longer be equal to it."""
    a, out = answer.strip(), []
    digits = [i for i, ch in enumerate(a) if ch.isdigit()]
    if digits:
        i = rng.choice(digits)
        out.append(("digit", a[:i] + str((int(a[i]) + rng.randint(1, 9)) % 10) + a[i + 1 :]))
    if _INT.match(a):
        out.append(("plus_minus_1", str(int(a) + rng.choice((-1, 1)))))
    if a and a not in ("0",) and not a.startswith("-") and re.match(r"^[\d\\{}a-z/.^ ]+$", a):
        out.append(("sign", f"-{a}"))
    m = _FRAC.match(a)
    if m and m.group(1) not in ("0", "-0"):
        num, den = int(m.group(1)), int(m.group(2))
        out.append(("reciprocal", f"\\frac{{{den}}}{{{num}}}" if num > 0 else f"-\\frac{{{den}}}{{{-num}}}"))
    if re.match(r"^[\(\[].*,.*[\)\]]$", a):
        # flip a bracket at a finite end: an infinite end is open whatever bracket is written, so
        # [-\infty, 2) is the same set as (-\infty, 2) and would not be a wrong answer
        flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
        if not re.match(r"^[\(\[]\s*-\s*\\infty", a):
            out.append(("interval_bracket", flip[a[0]] + a[1:]))
        elif not re.search(r"\\infty\s*[\)\]]$", a):
            out.append(("interval_bracket", a[:-1] + flip[a[-1]]))
    return out


def numerically_equal(a: str, b: str) -> bool | None:
    """Independent of math-verify: sympy's value of both LaTeX strings (None when either does not parse)."""
    try:
        from latex2sympy2_extended import latex2sympy

        x, y = latex2sympy(a), latex2sympy(b)
        if getattr(x, "free_symbols", None) or getattr(y, "free_symbols", None):
            return bool(x.equals(y)) if hasattr(x, "equals") else None
        return abs(complex(x.evalf()) - complex(y.evalf())) < 1e-9
    except Exception:  # noqa: BLE001
        return None


def math_items(limit: int | None, rng: random.Random):
    records = read_source("math", os.path.join(SHARED, "math", "test.jsonl")).records
    rng.shuffle(records)
    items, dropped, kinds, restated = [], Counter(), Counter(), 0
    for r in records[: limit or len(records)]:
        boxed = last_boxed_content(r.analysis)
        if not boxed or not boxed.strip():
            dropped["no final answer"] += 1
            continue
        true = restate(boxed)
        restated += true != boxed.strip()
        items.append(("math", "true", ParsedQuestion(r.question, true, r.analysis, {}, True)))
        items += perturbed_items("math", r, boxed, rng, kinds, dropped)
    return items, dropped, kinds, restated


def perturbed_items(source: str, record, answer: str, rng: random.Random, kinds: Counter, dropped: Counter) -> list:
    """The perturbed-answer items of one question; perturbations still equal to ``answer`` are dropped."""
    out = []
    for kind, wrong in perturbations(answer, rng):
        if numerically_equal(wrong, answer) is True:
            dropped[f"{kind} still equal"] += 1
            continue
        kinds[f"{source} {kind}"] += 1
        out.append((source, kind, ParsedQuestion(record.question, wrong, record.analysis, {}, True)))
    return out


def gaokao_items(rng: random.Random):
    items, dropped, kinds = [], Counter(), Counter()
    files = sorted(glob.glob(os.path.join(SHARED, "gaokao_bench", "*", "*Math*.json")))
    for path in files:
        for r in read_source("gaokao_bench", path).records:
            letters = re.findall(r"[A-H]", r.answer.upper())
            if r.qtype == "mcq":
                options = parse_options(r.question)
                if len(options) < 4 or len(set(letters)) != 1 or solution_choice(r.analysis) is None:
                    dropped["mcq without 4 options, one letter and a named choice"] += 1
                    continue
                stated = letters[0]
                items.append(("gaokao", "true", ParsedQuestion(r.question, stated, r.analysis, options, True)))
                other = rng.choice([k for k in options if k != stated])
                kinds["gaokao option_letter"] += 1
                items.append(("gaokao", "option_letter", ParsedQuestion(r.question, other, r.analysis, options, True)))
            elif r.qtype == "fill_blank":
                final = solution_answer(r.analysis)
                if not final or ";" in final or "；" in final:
                    dropped["fill-in without one concluding value"] += 1
                    continue
                stated = final.strip().strip("$")
                items.append(("gaokao", "true", ParsedQuestion(r.question, restate(stated), r.analysis, {}, True)))
                items += perturbed_items("gaokao", r, stated, rng, kinds, dropped)
    return items, dropped, kinds


def roc_auc(pos: list[float], neg: list[float]) -> float:
    """P(a random true-answer question's rigor > a random perturbed one's), ties counted half."""
    from scipy.stats import rankdata

    ranks = rankdata(pos + neg)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="MATH questions to use (default: all 4,500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not os.path.isdir(SHARED):
        sys.exit(f"needs ../shared/data beside the repository ({SHARED})")
    rng = random.Random(args.seed)
    m_items, m_dropped, m_kinds, restated = math_items(args.limit, rng)
    g_items, g_dropped, g_kinds = gaokao_items(rng)
    items = m_items + g_items
    started = time.perf_counter()
    checks = check_answers([q for _, _, q in items])
    seconds = time.perf_counter() - started
    rigor = [rigor_score(q, "en", False, c.consistent) for (_, _, q), c in zip(items, checks)]

    print(f"MATH: {sum(k == 'true' for s, k, _ in m_items if s == 'math')} questions ({restated} true answers "
          f"restated in another form); GAOKAO-Bench maths: {sum(k == 'true' for s, k, _ in g_items)}")  # fmt: skip
    print("dropped:", dict(m_dropped + g_dropped))
    print(f"\n{'set':<8} {'kind':<22} {'N':>6} {'judged consistent':>18}")
    rows = Counter()
    ok = Counter()
    for (source, kind, _), c in zip(items, checks):
        rows[(source, kind)] += 1
        ok[(source, kind)] += c.consistent
    for key in sorted(rows):
        print(f"{key[0]:<8} {key[1]:<22} {rows[key]:>6} {ok[key] / rows[key]:>18.3f}")
    true = [c.consistent for (_, k, _), c in zip(items, checks) if k == "true"]
    wrong = [c.consistent for (_, k, _), c in zip(items, checks) if k != "true"]
    accept, detect = sum(true) / len(true), 1 - sum(wrong) / len(wrong)
    auc = roc_auc([r for (_, k, _), r in zip(items, rigor) if k == "true"],
                  [r for (_, k, _), r in zip(items, rigor) if k != "true"])  # fmt: skip
    print(f"\n{len(items)} checks in {seconds:.1f} s ({1000 * seconds / len(items):.1f} ms each, one worker process)")
    print(f"accept {accept:.4f} of {len(true)} true answers; detect {detect:.4f} of {len(wrong)} perturbed; "
          f"rigor ROC AUC {auc:.4f}")  # fmt: skip
    print(f"answer_check_accept={accept:.4f} answer_check_detect={detect:.4f} rigor_auc={auc:.4f}")


if __name__ == "__main__":
    main()
