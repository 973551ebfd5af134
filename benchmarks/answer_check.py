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

Two more sets are reported apart:

- **mcq**: GAOKAO-Bench maths multiple choice (four options, one letter, a named choice in the solution),
  the true and a wrong letter each written in every form of :data:`LETTER_FORMS` (``B``, ``(B)``,
  ``\\textbf{(B)}``, ``B. <option text>``, ``选B`` ...), the solution's closing "故选 X" rewritten in one of the
  :data:`CLOSINGS` phrasings (rotating: "the answer is (X)", ``\\boxed{X}``, "i.e. option X" ...);
- **compound**: MATH and GAOKAO-Bench fill-in answers of two or more parts (tuples, ``name = value`` pairs,
  lists, "or" alternatives), the true answer restated (pairs and unordered parts in another order, other
  spacing) vs the parts **swapped** (tuples and pairs only: for a set a swap is no error) and **one part
  changed** (a digit of one part).

Acceptance of true answers and detection of wrong ones per set, and the ROC AUC of ``qgen score``'s rigor
between the two (same question, same solution; only the stated answer differs) for MATH and for GAOKAO
multiple choice.

    python benchmarks/answer_check.py [--limit N] [--seed 0]

Summary line: ``answer_check_accept=… answer_check_detect=… rigor_auc=… mcq_accept=… mcq_detect=…
compound_accept=… compound_detect=… rigor_auc_math=… rigor_auc_gaokao_mcq=…``.
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
from qgen.answers import check_answers, last_boxed_content, solution_answer, solution_choice, split_answer  # noqa: E402
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


# ------------------------------------------------------------------------------------ multiple choice
LETTER_FORMS = ("{L}", "{L}.", "({L})", "\\text{{{L}}}", "\\textbf{{({L})}}", "\\boxed{{{L}}}", "选{L}", "答案：{L}",
                "{L}. {text}")  # fmt: skip
CLOSINGS = ("故选：{L}.", "所以答案为 {L}。", "Hence the answer is ({L}).", "Therefore $\\boxed{{{L}}}$.",
            "即选项 {L} 正确。", "So we choose {L}.")  # fmt: skip
_LAST_CHOICE = re.compile(r"(故选|所以选|因此选|答案为|答案是)\s*[:：]?\s*[A-H]\s*[.。．]?\s*$")


def mcq_items(rng: random.Random):
    """The multiple-choice set: every letter form x (true, wrong), the closing in a rotating phrasing."""
    items, dropped, n = [], Counter(), 0
    for path in sorted(glob.glob(os.path.join(SHARED, "gaokao_bench", "*", "*Math*MCQs.json"))):
        for r in read_source("gaokao_bench", path).records:
            options = parse_options(r.question)
            letters = sorted(set(re.findall(r"[A-H]", r.answer.upper())))
            tail = _LAST_CHOICE.search(r.analysis.rstrip())
            if len(options) < 4 or len(letters) != 1 or letters[0] not in options or not tail:
                dropped["mcq without 4 options, one letter and a closing choice"] += 1
                continue
            stated = letters[0]
            closing = CLOSINGS[n % len(CLOSINGS)].format(L=stated)
            analysis = r.analysis.rstrip()[: tail.start()] + closing
            if solution_choice(analysis) != (stated,):  # an earlier decisive phrase would win: not this set's case
                dropped["mcq whose body names a later decisive choice"] += 1
                continue
            wrong = rng.choice([k for k in options if k != stated])
            for form in LETTER_FORMS:
                for kind, letter in (("true", stated), ("option_letter", wrong)):
                    answer = form.format(L=letter, text=options[letter])
                    items.append(("mcq", kind, ParsedQuestion(r.question, answer, analysis, options, True)))
            n += 1
    return items, dropped, n


# ---------------------------------------------------------------------------------- compound answers
_PAIR = re.compile(r"^\s*([A-Za-z](?:_\{?\w+\}?)?)\s*=\s*(.+?)\s*$")
_TOP_COMMA = re.compile(r"\s*,\s*")
_THOUSANDS = re.compile(r"^\s*(?:\\?\$)?\s*\d{1,3}(?:,\d{3})+(?:\.\d+)?\s*$")  # \$115,000: one number


def _top_parts(text: str) -> list[str]:
    """``text`` cut at top-level commas (outside every bracket)."""
    depth, parts, last = 0, [], 0
    for i, ch in enumerate(text):
        depth += ch in "{(["
        depth -= ch in "})]" and depth > 0
        if ch == "," and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    return [p.strip() for p in parts + [text[last:]]]


def compound_forms(answer: str, rng: random.Random) -> tuple[str, list[tuple[str, str]]] | None:
    """``(true restated, [(kind, wrong)])`` for an answer of two or more parts, else ``None``."""
    a = answer.strip().strip("$").strip()
    a = re.sub(r"\\left|\\right", "", a)
    if _THOUSANDS.match(a) or ",\\!" in a or "\\cup" in a or "\\text" in a:  # 1,\!386: one number
        return None
    connective = re.split(r"\s*(?:\\text\{\s*or\s*\}|\\text\{\s*and\s*\}|或|和|\bor\b|\band\b)\s*", a)
    if len(connective) > 1:
        parts, joiner, kind = connective, " or " if ("or" in a or "或" in a) else " and ", "alternatives"
    elif re.match(r"^\((.*)\)$", a) and len(_top_parts(a[1:-1])) >= 2 and "\\infty" not in a:
        parts, joiner, kind = _top_parts(a[1:-1]), ", ", "tuple"
    elif len(_top_parts(a)) >= 2 and not a.startswith(("(", "[")):
        parts, joiner, kind = _top_parts(a), ", ", "list"
    else:
        return None
    if any(not p for p in parts):
        return None
    pairs = [_PAIR.match(p) for p in parts]
    named = all(pairs) and len({m.group(1) for m in pairs}) == len(pairs)
    if kind == "tuple":
        true = "(" + ", ".join(parts) + ")"  # another spacing
        swapped = [parts[1], parts[0], *parts[2:]]
        wrongs = [("swapped", "(" + ", ".join(swapped) + ")")] if swapped != parts else []
    else:
        true = joiner.join(reversed(parts))  # pairs by name, alternatives and lists as sets: any order
        wrongs = []
        if named and pairs[0].group(2) != pairs[1].group(2):
            values = [m.group(2) for m in pairs]
            values[0], values[1] = values[1], values[0]
            wrongs.append(("swapped", joiner.join(f"{m.group(1)}={v}" for m, v in zip(pairs, values))))
    digits = [(i, j) for i, p in enumerate(parts) for j, ch in enumerate(p) if ch.isdigit()]
    if digits:
        i, j = rng.choice(digits)
        changed = list(parts)
        changed[i] = parts[i][:j] + str((int(parts[i][j]) + rng.randint(1, 9)) % 10) + parts[i][j + 1 :]
        wrongs.append(("one_part_changed", "(" + ", ".join(changed) + ")" if kind == "tuple" else joiner.join(changed)))
    return true, wrongs


def compound_items(rng: random.Random):
    """The compound set: MATH test answers and GAOKAO-Bench fill-in answers of two or more parts."""
    items, dropped, kinds = [], Counter(), Counter()
    sources = [("math", r, last_boxed_content(r.analysis))
               for r in read_source("math", os.path.join(SHARED, "math", "test.jsonl")).records]
    for path in sorted(glob.glob(os.path.join(SHARED, "gaokao_bench", "*", "*Math*Fill-in*.json"))):
        sources += [("gaokao", r, solution_answer(r.analysis)) for r in read_source("gaokao_bench", path).records]
    for source, r, final in sources:
        if not final or ";" in final or "；" in final:
            continue
        forms = compound_forms(final, rng)
        if forms is None:
            continue
        true, wrongs = forms
        items.append(("compound", "true", ParsedQuestion(r.question, true, r.analysis, {}, True)))
        for kind, wrong in wrongs:
            if split_answer(wrong) == split_answer(final) or numerically_equal(wrong, final) is True:
                dropped[f"compound {kind} still equal"] += 1
                continue
            kinds[f"{source} {kind}"] += 1
            items.append(("compound", kind, ParsedQuestion(r.question, wrong, r.analysis, {}, True)))
    return items, dropped, kinds


def roc_auc(pos: list[float], neg: list[float]) -> float:
    """P(a random true-answer question's rigor > a random perturbed one's), ties counted half."""
    from scipy.stats import rankdata

    ranks = rankdata(pos + neg)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def rates(items: list, checks: list, where) -> tuple[float, float, int, int]:
    """``(accept, detect, n_true, n_wrong)`` over the items ``where(source, kind)`` selects: accept = true answers
    judged consistent, detect = wrong ones judged inconsistent (an unverifiable verdict is not a detection).
    """
    true = [c.consistent is True for (s, k, _), c in zip(items, checks) if where(s, k) and k == "true"]
    wrong = [c.consistent is False for (s, k, _), c in zip(items, checks) if where(s, k) and k != "true"]
    return sum(true) / max(1, len(true)), sum(wrong) / max(1, len(wrong)), len(true), len(wrong)


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
    q_items, q_dropped, n_mcq = mcq_items(rng)
    c_items, c_dropped, c_kinds = compound_items(rng)
    items = m_items + g_items + q_items + c_items
    # fairness: a wrong answer is judged against a true one's question and solution (only the stated answer
    # differs), and never equals the true answer's text
    true_pairs = {(s, q.question, q.analysis): q.answer for s, k, q in items if k == "true"}
    for s, k, q in items:
        if k != "true":
            assert true_pairs.get((s, q.question, q.analysis), q.answer) != q.answer, (s, k, q.answer)
            assert (s, q.question, q.analysis) in true_pairs, (s, k)
    started = time.perf_counter()
    checks = check_answers([q for _, _, q in items])
    seconds = time.perf_counter() - started
    rigor = [rigor_score(q, "en" if s == "math" else "zh", False, c.consistent) for (s, _, q), c in zip(items, checks)]

    print(f"MATH: {sum(k == 'true' for s, k, _ in m_items if s == 'math')} questions ({restated} true answers "
          f"restated in another form); GAOKAO-Bench maths: {sum(k == 'true' for s, k, _ in g_items)}; "
          f"mcq: {n_mcq} questions x {len(LETTER_FORMS)} letter forms x (true, wrong), {len(CLOSINGS)} closings; "
          f"compound: {sum(k == 'true' for _, k, _ in c_items)} answers {dict(c_kinds)}")  # fmt: skip
    print("dropped:", dict(m_dropped + g_dropped + q_dropped + c_dropped))
    print(f"\n{'set':<9} {'kind':<22} {'N':>6} {'consistent':>11} {'inconsistent':>13} {'unverifiable':>13}")
    rows, verdicts = Counter(), Counter()
    for (source, kind, _), c in zip(items, checks):
        rows[(source, kind)] += 1
        verdicts[(source, kind, c.consistent)] += 1
    for key in sorted(rows):
        share = [verdicts[(*key, v)] / rows[key] for v in (True, False, None)]
        print(f"{key[0]:<9} {key[1]:<22} {rows[key]:>6} {share[0]:>11.3f} {share[1]:>13.3f} {share[2]:>13.3f}")
    for (source, kind, q), c in zip(items, checks):  # a few misses, to read
        if (kind == "true") != (c.consistent is True) and source in ("mcq", "compound") and rng.random() < 0.2:
            print(f"  miss {source}/{kind}: stated {q.answer[:60]!r} -> {c.consistent} ({c.reason[:80]})")

    accept, detect, n_true, n_wrong = rates(items, checks, lambda s, k: s in ("math", "gaokao"))
    mcq_accept, mcq_detect, mcq_true, mcq_wrong = rates(items, checks, lambda s, k: s == "mcq")
    c_accept, c_detect, c_true, c_wrong = rates(items, checks, lambda s, k: s == "compound")

    def auc_of(source: str) -> float:
        return roc_auc([r for (s, k, _), r in zip(items, rigor) if s == source and k == "true"],
                       [r for (s, k, _), r in zip(items, rigor) if s == source and k != "true"])  # fmt: skip

    auc = roc_auc([r for (s, k, _), r in zip(items, rigor) if s in ("math", "gaokao") and k == "true"],
                  [r for (s, k, _), r in zip(items, rigor) if s in ("math", "gaokao") and k != "true"])  # fmt: skip
    auc_math, auc_mcq = auc_of("math"), auc_of("mcq")
    print(f"\n{len(items)} checks in {seconds:.1f} s ({1000 * seconds / len(items):.1f} ms each, one worker process)")
    print(f"MATH + GAOKAO: accept {accept:.4f} of {n_true} true answers; detect {detect:.4f} of {n_wrong} perturbed; "
          f"rigor ROC AUC {auc:.4f} (MATH {auc_math:.4f})")  # fmt: skip
    print(f"mcq: accept {mcq_accept:.4f} of {mcq_true}; detect {mcq_detect:.4f} of {mcq_wrong}; rigor ROC AUC {auc_mcq:.4f}")
    print(f"compound: accept {c_accept:.4f} of {c_true}; detect {c_detect:.4f} of {c_wrong}")
    print(f"answer_check_accept={accept:.4f} answer_check_detect={detect:.4f} rigor_auc={auc:.4f} "
          f"mcq_accept={mcq_accept:.4f} mcq_detect={mcq_detect:.4f} compound_accept={c_accept:.4f} "
          f"compound_detect={c_detect:.4f} rigor_auc_math={auc_math:.4f} rigor_auc_gaokao_mcq={auc_mcq:.4f}")


if __name__ == "__main__":
    main()
