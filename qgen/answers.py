r"""Answer checking: does a question's stated answer equal the final answer its own solution reaches?

The check behind the verifiable rigor reward, ``qgen score``'s ``answer_consistent`` column and the
answer-check benchmark. Two answers are compared mathematically with HF's ``math-verify`` (sympy underneath),
behind qgen's own normaliser for what math-verify does not read:

- prefixes (``答案：``, ``Answer:``, ``the answer is``), ``$`` delimiters, ``\\boxed{}``, a final full stop;
- full-width punctuation and colons, Unicode ``√ ∞ ≤ ≥ ≠ − × ÷ π``, bare answers written without ``$``;
- several answers joined by 或 / 和 / or / and (also ``\\text{ and }``) compared as one whole by math-verify:
  ``name = value`` pairs matched by name, alternatives and solution sets as sets, tuples in order, intervals
  and unions as intervals, never split inside a ``{...}`` / ``(...)`` group; several blanks separated by
  ``;`` / ``；`` compared blank by blank, in order.

Multiple choice: at least four distinct options; the stated letters, read as a choice (:func:`stated_choice`),
must be the ones the solution picks (:func:`solution_choice`: "故选 B", "the answer is (B)", ``\\boxed{B}``),
or, when the solution computes a value instead, exactly the options equal to that value.

A verdict is consistent, inconsistent, or unverifiable (``None``: no stated answer, no solution, or a
solution with no final answer or choice to compare).

math-verify's own timeout uses ``signal.alarm``, which only works in a main thread and which a
pathological expression can outrun. So every comparison runs in a separate worker process (its main
thread), with an integer timeout per comparison, a memory cap, and a hard deadline after which the worker
is killed and restarted; a comparison that did not finish counts as *not* equal.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass

from qgen.formatting import ParsedQuestion

# ------------------------------------------------------------------------------------------ normaliser
_PREFIX = re.compile(
    r"^\s*(?:(?:最终|参考)?答案(?:为|是)?|故答案为|所以答案为|final answer|answer|the (?:final )?answer is)\s*[:：]?\s*",
    re.IGNORECASE,
)
_UNICODE = {
    "，": ",", "：": ":", "；": ";", "（": "(", "）": ")", "［": "[", "］": "]", "｛": "\\{", "｝": "\\}",
    "＝": "=", "＋": "+", "－": "-", "−": "-", "–": "-", "×": "\\times ", "÷": "\\div ", "≤": "\\le ",
    "≥": "\\ge ", "≠": "\\ne ", "∞": "\\infty ", "π": "\\pi ", "·": "\\cdot ", "．": ".", "∈": "\\in ",
    "∪": "\\cup ", "∩": "\\cap ", "°": "^\\circ", "　": " ",
}  # fmt: skip
_SQRT = re.compile(r"√\s*(\d+(?:\.\d+)?|[A-Za-z]|\([^()]*\)|\{[^{}]*\})")
_CONNECTIVE = re.compile(r"\s*(?:或|和|且|及|\bor\b|\band\b)\s*", re.IGNORECASE)
_TEXT_CONNECTIVE = re.compile(r"\\(?:text|textrm|mathrm|mbox)\s*\{\s*(或|和|且|及|or|and)\s*\}", re.IGNORECASE)
_SPACING = re.compile(r"\\(?:qquad|quad)\b|\\[,;: ]")
_CONCLUSION = re.compile(
    r"(?:答案(?:为|是)|故答案为|所以答案为|the (?:final )?answer is|final answer\s*[:：]?)\s*[:：]?\s*(.+?)\s*(?:[。]|\.\s|\.?$|\n)",
    re.IGNORECASE,
)

# ------------------------------------------------------------------------------------ option letters
_FULLWIDTH_LETTERS = str.maketrans("ＡＢＣＤＥＦＧＨ（）：，、．", "ABCDEFGH():,、.")
_WRAPPED = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|boxed|fbox|operatorname)\s*\{([^{}]*)\}")
_STATED_PREFIX = re.compile(
    r"^\s*(?:(?:正确)?(?:答案|选项)(?:为|是|应选|选)?|故选|应选|选|(?i:the )?(?i:correct )?(?i:answer|choice|option)"
    r"(?i:\s+is)?)\s*[:：]?\s*"
)
_LETTER = r"[\(（]?\s*[A-H]\s*[\)）]?"
_LETTER_LIST = re.compile(rf"{_LETTER}(?:\s*(?:[,，、/&]|和|与|及|\band\b)?\s*{_LETTER})*\s*[.。．]?")
_LETTER_LEAD = re.compile(r"[\(（]\s*([A-H])\s*[\)）]|([A-H])\s*[.．、:：]\s*\S")
# a choice in a solution: its letters, upper case, never followed by more of a word, a digit or "="
_LETTERS_AT = (r"[\(（]?\s*\$?\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?[\(（]?\s*"
               r"([A-H](?:\s*[、,，和与及]?\s*[A-H])*)(?![A-Za-z0-9_])(?!\s*[=<>])")  # fmt: skip
_DECISIVE = re.compile(
    r"(?:故选|所以选|因此选|从而选|应选|(?<!可)选择?|(?:正确)?答案(?:为|是|应选|选)?|"
    r"(?i:the (?:correct |right |final )?(?:answer|choice|option) is|answer\s*[:：]|answer is|we choose|choose))"
    r"\s*[:：]?\s*" + _LETTERS_AT
)
_NAMED = re.compile(r"(?:(?i:option|choice)s?|选项)\s*" + _LETTERS_AT + r"|[\(（]\s*([A-H])\s*[\)）]")


def _unwrap(text: str) -> str:
    r"""``text`` without ``$``, full-width letters and LaTeX wrappers (``\text{B}``, ``\textbf{(B)}``, ``\boxed{B}``)."""
    s = text.translate(_FULLWIDTH_LETTERS).replace("$", "")
    while True:
        t = _WRAPPED.sub(r"\1", s)
        if t == s:
            return s.strip()
        s = t


def letters_of(group: str) -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(r"[A-H]", group))))


def stated_choice(answer: str) -> tuple[str, ...] | None:
    r"""The option letters a stated answer names, sorted, or ``None`` when it is not written as a choice.

    Read as a choice, not as a bag of letters: ``B``, ``B.``, ``(B)``, ``B. <option text>``, ``\text{B}``,
    ``\textbf{(B)}``, ``\boxed{B}``, ``选B``, ``答案：B``; several letters for multi-select (``AB``, ``A, C``,
    ``ACD``, ``A和C``). Letters inside the option text (``B. $\frac{1}{2}$``) are not choices.
    """
    s = _STATED_PREFIX.sub("", _unwrap(answer), count=1).strip()
    if not s:
        return None
    if _LETTER_LIST.fullmatch(s):
        return letters_of(s)
    lead = _LETTER_LEAD.match(s)
    return (lead.group(1) or lead.group(2),) if lead else None


def boxed_contents(text: str) -> list[tuple[int, str]]:
    r"""``(position, content)`` of every ``\\boxed{...}`` / ``\\fbox{...}``, braces balanced, in order."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 0
        for i in range(m.end() - 1, len(text)):
            depth += text[i] == "{"
            depth -= text[i] == "}"
            if depth == 0:
                out.append((m.start(), text[m.end() : i]))
                break
    return out


def last_boxed_content(text: str) -> str | None:
    r"""The content of the last ``\\boxed{...}`` (or ``\\fbox``), braces balanced; ``None`` without one."""
    found = boxed_contents(text)
    return found[-1][1] if found else None


def normalize_answer(text: str) -> str:
    """One answer as math-verify can read it (see the module docstring); not split into alternatives."""
    s = text.strip()
    boxed = last_boxed_content(s)
    if boxed is not None:
        s = boxed
    s = _PREFIX.sub("", s)
    s = "".join(_UNICODE.get(ch, ch) for ch in s)
    s = _SQRT.sub(lambda m: "\\sqrt{" + m.group(1).strip("(){}") + "}", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("$", "").strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    return re.sub(r"\s+", " ", re.sub(r"[。.,，\s]+$", "", s))


def _top_level_split(text: str, pattern: re.Pattern) -> list[str]:
    """``text`` cut where ``pattern`` matches outside every ``{}``, ``()`` and ``[]`` group."""
    depth, last, parts = 0, 0, []
    depth_at = []
    for ch in text:
        depth_at.append(depth)
        depth += ch in "{(["
        depth -= ch in "})]" and depth > 0
    for m in pattern.finditer(text):
        if depth_at[m.start()] == 0:
            parts.append(text[last : m.start()])
            last = m.end()
    parts.append(text[last:])
    return [p for p in parts if p.strip()]


def split_answer(text: str) -> list[list[str]]:
    r"""The answer cut into blanks (``;`` / ``；``, in order), each blank into its parts (或 / 和 / or / and,
    ``\text{ and }``), never inside a ``{...}`` / ``(...)`` / ``[...]`` group. Each part is normalised.
    """
    s = text.strip()
    boxed = last_boxed_content(s)
    s = _PREFIX.sub("", boxed if boxed is not None else s)
    s = _SPACING.sub(" ", _TEXT_CONNECTIVE.sub(r" \1 ", s))
    blanks = _top_level_split(s, re.compile(r"\s*[;；]\s*"))
    return [[normalize_answer(a) for a in _top_level_split(b, _CONNECTIVE)] for b in blanks]


def solution_answer(analysis: str) -> str | None:
    r"""The final answer a solution reaches: its last ``\\boxed{}``, else its concluding statement."""
    boxed = last_boxed_content(analysis)
    if boxed is not None:
        return boxed
    found = _CONCLUSION.findall(analysis)
    return found[-1].strip() if found else None


def solution_choice(analysis: str) -> tuple[str, ...] | None:
    r"""The option letters a solution picks, sorted, or ``None`` when it names no choice.

    Letters are upper case and read in context, never from a variable (``a = 2``, ``e^0``, "c is the
    hypotenuse"): a *decisive* phrase (故选 / 选 / 答案为 / "the answer is" / "answer:" / ``\\boxed{B}``) or,
    failing any, a *named* option ("option B", "choice (B)", 选项B, a bare ``(B)``). When the solution names
    several, the **last decisive one wins** ("A is wrong ... so the answer is C. Option D fails" picks C);
    without a decisive phrase the last named option wins ("we get a = 2, i.e. option B" picks B).
    """
    text = analysis.translate(_FULLWIDTH_LETTERS)
    decisive = [(m.start(), letters_of(m.group(1))) for m in _DECISIVE.finditer(text)]
    for start, content in boxed_contents(text):
        letters = stated_choice(content)
        if letters:
            decisive.append((start, letters))
    if decisive:
        return max(decisive)[1]
    named = [(m.start(), letters_of(m.group(1) or m.group(2))) for m in _NAMED.finditer(text)]
    return max(named)[1] if named else None


# ------------------------------------------------------------------------------------- worker process
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verify_worker.py")


class Verifier:
    """Compares answer pairs in a worker process (``qgen/verify_worker.py``; see the module docstring).

    Args:
        timeout: seconds per parse or comparison, an integer (math-verify's ``signal.alarm`` takes whole seconds).
        memory_mb: address-space cap of the worker.
        grace: seconds added to each request's hard deadline (the worker's start-up: importing sympy).
    """

    def __init__(self, timeout: int = 3, memory_mb: int = 4096, grace: float = 20.0):
        self.timeout, self.memory_mb, self.grace = int(max(1, timeout)), memory_mb, grace
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.killed = 0  # workers killed at the hard deadline

    def _start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, _WORKER, str(self.memory_mb)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)  # fmt: skip

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def _ask(self, pairs: list[tuple[str, str]], deadline: float) -> list | None:
        """The worker's reply, or ``None`` when it died or missed ``deadline`` seconds (then it is killed)."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        try:
            self._proc.stdin.write(json.dumps({"pairs": pairs, "timeout": self.timeout}) + "\n")
            self._proc.stdin.flush()
            ready, _, _ = select.select([self._proc.stdout], [], [], deadline)
            line = self._proc.stdout.readline() if ready else ""
            reply = json.loads(line) if line else None
        except (OSError, ValueError):
            reply = None
        if reply is None or len(reply) != len(pairs):
            self.killed += 1
            self._kill()
            return None
        return reply

    def equal_many(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        """``[bool | None]`` per pair: equal, not equal, or ``None`` where math-verify reads a side as no maths.
        A pair that cannot be decided in time counts as not equal.
        """
        out: list[bool | None] = []
        with self._lock:
            for start in range(0, len(pairs), 64):
                chunk = [list(p) for p in pairs[start : start + 64]]
                # two parses and a verify per pair, each under the worker's own timeout, plus start-up
                reply = self._ask(chunk, self.grace + len(chunk) * 3 * (self.timeout + 1))
                if reply is None:  # one pathological pair: retry one by one, so it costs only itself
                    alone = self.grace + 3 * (self.timeout + 1)
                    reply = [(self._ask([p], alone) or [False])[0] for p in chunk]
                out.extend(reply)
        return out

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._kill()
            self._proc = None


_DEFAULT: dict[int, Verifier] = {}  # process id -> its verifier (a forked child starts its own worker)


def default_verifier() -> Verifier:
    pid = os.getpid()
    if pid not in _DEFAULT:
        _DEFAULT[pid] = Verifier()
        atexit.register(_DEFAULT[pid].close)
    return _DEFAULT[pid]


# -------------------------------------------------------------------------------------------- checks
@dataclass
class AnswerCheck:
    """The verdict on one question's stated answer.

    ``consistent``: ``True`` when the stated answer is verified to be the one the solution reaches, ``False``
    when verified not to be (or the question cannot carry a right answer: an option letter that is not an
    option, fewer than four options, two equal options), ``None`` when it cannot be verified (no stated
    answer, no solution, or a solution with no final answer or choice to compare).
    """

    consistent: bool | None
    reason: str  # why not ("" when consistent)

    @property
    def verified(self) -> bool:
        return self.consistent is not None


_INTERVAL = re.compile(r"^\s*(?:\\left)?([\(\[])[^\[\]\(\)]*,[^\[\]\(\)]*(?:\\right)?([\)\]])\s*$")


def _same(a: str, b: str, verdict: bool | None) -> bool:
    ia, ib = _INTERVAL.match(a), _INTERVAL.match(b)
    if ia and ib and ia.groups() != ib.groups():  # math-verify may equate (1, 2] with [1, 2]; the ends differ
        return False
    if verdict is None:  # neither side is maths to math-verify: compare the normalised text
        return _text_key(a) == _text_key(b) and bool(a.strip())
    return verdict


def _text_key(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def check_answers(questions: list[ParsedQuestion], verifier: Verifier | None = None) -> list[AnswerCheck]:
    """:class:`AnswerCheck` of each parsed question (batched: one round trip to the worker)."""
    verifier = verifier or default_verifier()
    plans, pairs = [], []

    def ask(a: str, b: str) -> int:
        pairs.append((a, b))
        return len(pairs) - 1

    for q in questions:
        if not q.answer.strip():
            plans.append(("unverifiable", "no stated answer"))
        elif not q.analysis.strip():
            plans.append(("unverifiable", "no solution"))
        elif q.options:
            plans.append(_plan_choice(q, ask))
        else:
            plans.append(_plan_free(q, ask))
    verdicts = verifier.equal_many(pairs)
    return [_decide(plan, verdicts, pairs) for plan in plans]


def _plan_free(q: ParsedQuestion, ask) -> tuple:
    """Blank by blank, in order; a blank of several parts (或 / and / ``\\text{ and }``) is compared as one
    whole with math-verify (parts joined by commas: a set of values, or of ``name = value`` equations matched by
    name), so ``x=2, y=1`` equals ``y=1 and x=2`` and never ``x=1, y=2``; tuples stay ordered, intervals and
    unions are intervals. Parts that are no maths to math-verify are compared as a set of texts.
    """
    final = solution_answer(q.analysis)
    if final is None:
        return ("unverifiable", "the solution states no final answer")
    stated, reached = split_answer(q.answer), split_answer(final)
    if not stated or not reached:
        return ("unverifiable", "empty answer")
    if len(stated) != len(reached):
        return ("fail", f"{len(stated)} blanks stated, {len(reached)} in the solution")
    blanks = []
    for s_parts, r_parts in zip(stated, reached):
        a, b = ", ".join(s_parts), ", ".join(r_parts)
        same_texts = len(s_parts) > 1 and sorted(map(_text_key, s_parts)) == sorted(map(_text_key, r_parts))
        blanks.append((a, b, ask(a, b), same_texts))
    return ("free", blanks)


def _plan_choice(q: ParsedQuestion, ask) -> tuple:
    options = {k: normalize_answer(v) for k, v in q.options.items()}
    if len(options) < 4:
        return ("fail", f"{len(options)} options (at least 4 expected)")
    if len(set(options.values())) < len(options):
        return ("fail", "two options are the same")
    letters = stated_choice(q.answer)
    if letters is None:  # the option's text written out instead of its letter
        value = _text_key(normalize_answer(q.answer))
        letters = tuple(k for k, v in options.items() if _text_key(v) == value) or None
    if letters is None or not set(letters) <= set(options):
        return ("fail", f"stated answer {q.answer.strip()!r} is not read as one of the options")
    picked = solution_choice(q.analysis)
    if picked is not None:
        return ("choice_letter", letters, picked)
    final = solution_answer(q.analysis)
    if final is None:
        return ("unverifiable", "the solution neither picks an option nor states a value")
    value = normalize_answer(final)
    return ("choice_value", letters, {k: (v, value, ask(v, value)) for k, v in options.items()})


def _decide(plan: tuple, verdicts: list, pairs: list) -> AnswerCheck:
    kind = plan[0]
    if kind == "unverifiable":
        return AnswerCheck(None, plan[1])
    if kind == "fail":
        return AnswerCheck(False, plan[1])
    if kind == "choice_letter":
        stated, picked = plan[1], plan[2]
        reason = "" if stated == picked else f"stated {''.join(stated)}, the solution picks {''.join(picked)}"
        return AnswerCheck(stated == picked, reason)
    if kind == "choice_value":
        stated, table = plan[1], plan[2]
        equal = tuple(k for k, (a, b, i) in sorted(table.items()) if _same(a, b, verdicts[i]))
        if equal == stated:
            return AnswerCheck(True, "")
        return AnswerCheck(False, f"options equal to the solution's value: {list(equal) or 'none'}; "
                                  f"stated {''.join(stated)}")  # fmt: skip
    for a, b, i, same_texts in plan[1]:  # free response: every blank, in order
        if not (same_texts or _same(a, b, verdicts[i])):
            return AnswerCheck(False, "the stated answer differs from the solution's final answer")
    return AnswerCheck(True, "")
