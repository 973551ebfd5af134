r"""Answer checking: does a question's stated answer equal the final answer its own solution reaches?

The check behind the verifiable rigor reward, ``qgen score``'s ``answer_consistent`` column and the
answer-check benchmark. Two answers are compared mathematically with HF's ``math-verify`` (sympy underneath),
behind qgen's own normaliser for what math-verify does not read:

- prefixes (``答案：``, ``Answer:``, ``the answer is``), ``$`` delimiters, ``\\boxed{}``, a final full stop;
- full-width punctuation and colons, Unicode ``√ ∞ ≤ ≥ ≠ − × ÷ π``, bare answers written without ``$``;
- several answers joined by 或 / 和 / or / and (compared as sets) and several blanks separated by ``;``
  / ``；`` (compared blank by blank, in order).

Multiple choice: at least four distinct options; the stated letter must be the one the solution picks
("故选 B", "the answer is (B)"), or, when the solution computes a value instead, the stated option must equal
that value and no other option may.

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
_ALTERNATIVES = re.compile(r"\s*(?:或|和|\bor\b|\band\b)\s*", re.IGNORECASE)
_BLANKS = re.compile(r"\s*[;；]\s*")
_CHOICE = re.compile(
    r"(?:故选|所以选|因此选|应选|答案(?:为|是|应选)?\s*[:：]?|the (?:correct )?(?:answer|choice|option) is|answer\s*[:：])"
    r"\s*[:：]?\s*[\(（]?\s*\$?\s*(?:\\(?:text|mathrm|textbf)\{)?([A-H])\b",
    re.IGNORECASE,
)
_CONCLUSION = re.compile(
    r"(?:答案(?:为|是)|故答案为|所以答案为|the (?:final )?answer is|final answer\s*[:：]?)\s*[:：]?\s*(.+?)\s*(?:[。]|\.\s|\.?$|\n)",
    re.IGNORECASE,
)


def last_boxed_content(text: str) -> str | None:
    r"""The content of the last ``\\boxed{...}`` (or ``\\fbox``), braces balanced; ``None`` without one."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += text[i] == "{"
        depth -= text[i] == "}"
        if depth == 0:
            return text[brace + 1 : i]
    return None


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


def split_answer(text: str) -> tuple[list[list[str]], bool]:
    """``(blanks, is_set)``: the answer cut into blanks (``;``), each blank into alternatives (或 / or / and)."""
    s = text.strip()
    boxed = last_boxed_content(s)
    s = _PREFIX.sub("", boxed if boxed is not None else s)
    blanks = [b for b in _BLANKS.split(s) if b.strip()]
    parts = [[normalize_answer(a) for a in _ALTERNATIVES.split(b) if a.strip()] for b in blanks]
    return parts, any(len(p) > 1 for p in parts)


def solution_answer(analysis: str) -> str | None:
    r"""The final answer a solution reaches: its last ``\\boxed{}``, else its concluding statement."""
    boxed = last_boxed_content(analysis)
    if boxed is not None:
        return boxed
    found = _CONCLUSION.findall(analysis)
    return found[-1].strip() if found else None


def solution_choice(analysis: str) -> str | None:
    r"""The option letter a solution picks ("故选 B", "the answer is (C)", ``\\boxed{D}``), if it names one."""
    boxed = last_boxed_content(analysis)
    if boxed is not None and re.fullmatch(r"\s*(?:\\text\{)?\(?([A-H])\)?\}?\s*", boxed):
        return re.search(r"[A-H]", boxed).group(0)
    found = _CHOICE.findall(analysis)
    return found[-1].upper() if found else None


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
    consistent: bool  # the stated answer is the one the solution reaches
    reason: str  # why not ("" when consistent)


_INTERVAL = re.compile(r"^\s*(?:\\left)?([\(\[])[^\[\]\(\)]*,[^\[\]\(\)]*(?:\\right)?([\)\]])\s*$")


def _same(a: str, b: str, verdict: bool | None) -> bool:
    ia, ib = _INTERVAL.match(a), _INTERVAL.match(b)
    if ia and ib and ia.groups() != ib.groups():  # math-verify may equate (1, 2] with [1, 2]; the ends differ
        return False
    if verdict is None:  # neither side is maths to math-verify: compare the normalised text
        return re.sub(r"\s+", "", a).lower() == re.sub(r"\s+", "", b).lower() and bool(a.strip())
    return verdict


def check_answers(questions: list[ParsedQuestion], verifier: Verifier | None = None) -> list[AnswerCheck]:
    """:class:`AnswerCheck` of each parsed question (batched: one round trip to the worker)."""
    verifier = verifier or default_verifier()
    plans, pairs = [], []

    def ask(a: str, b: str) -> int:
        pairs.append((a, b))
        return len(pairs) - 1

    for q in questions:
        if not q.answer.strip():
            plans.append(("fail", "no stated answer"))
        elif not q.analysis.strip():
            plans.append(("fail", "no solution"))
        elif q.options:
            plans.append(_plan_choice(q, ask))
        else:
            plans.append(_plan_free(q, ask))
    verdicts = verifier.equal_many(pairs)
    return [_decide(plan, verdicts, pairs) for plan in plans]


def _plan_free(q: ParsedQuestion, ask) -> tuple:
    final = solution_answer(q.analysis)
    if final is None:
        return ("fail", "the solution states no final answer")
    stated, stated_set = split_answer(q.answer)
    reached, reached_set = split_answer(final)
    if not stated or not reached:
        return ("fail", "empty answer")
    if len(stated) != len(reached):
        return ("fail", f"{len(stated)} blanks stated, {len(reached)} in the solution")
    blanks = []
    for s_alts, r_alts in zip(stated, reached):
        if len(s_alts) != len(r_alts):
            return ("fail", "a different number of alternatives")
        blanks.append([[ask(s, r) for r in r_alts] for s in s_alts])  # every stated alternative x every reached one
    return ("free", blanks)


def _plan_choice(q: ParsedQuestion, ask) -> tuple:
    letters = sorted(set(re.findall(r"[A-H]", q.answer.upper())))
    options = {k: normalize_answer(v) for k, v in q.options.items()}
    if len(options) < 4:
        return ("fail", f"{len(options)} options (at least 4 expected)")
    if len(set(options.values())) < len(options):
        return ("fail", "two options are the same")
    if len(letters) != 1 or letters[0] not in options:
        return ("fail", f"stated answer {q.answer.strip()!r} is not one of the options")
    picked = solution_choice(q.analysis)
    if picked is not None:
        return ("choice_letter", letters[0], picked)
    final = solution_answer(q.analysis)
    if final is None:
        return ("fail", "the solution neither picks an option nor states a value")
    value = normalize_answer(final)
    return ("choice_value", letters[0], {k: (v, value, ask(v, value)) for k, v in options.items()})


def _decide(plan: tuple, verdicts: list, pairs: list) -> AnswerCheck:
    kind = plan[0]
    if kind == "fail":
        return AnswerCheck(False, plan[1])
    if kind == "choice_letter":
        stated, picked = plan[1], plan[2]
        reason = "" if stated == picked else f"stated {stated}, the solution picks {picked}"
        return AnswerCheck(stated == picked, reason)
    if kind == "choice_value":
        stated, table = plan[1], plan[2]
        equal = [k for k, (a, b, i) in table.items() if _same(a, b, verdicts[i])]
        if equal == [stated]:
            return AnswerCheck(True, "")
        return AnswerCheck(False, f"options equal to the solution's value: {equal or 'none'}; stated {stated}")
    for blank in plan[1]:  # free response: a perfect matching of alternatives in every blank
        matrix = [[_same(*pairs[i], verdicts[i]) for i in row] for row in blank]
        if not _has_matching(matrix):
            return AnswerCheck(False, "the stated answer differs from the solution's final answer")
    return AnswerCheck(True, "")


def _has_matching(matrix: list[list[bool]]) -> bool:
    """Every stated alternative equals a distinct reached one (small sets: plain augmenting paths)."""
    match: dict[int, int] = {}

    def augment(row: int, seen: set) -> bool:
        for col, ok in enumerate(matrix[row]):
            if ok and col not in seen:
                seen.add(col)
                if col not in match or augment(match[col], seen):
                    match[col] = row
                    return True
        return False

    return all(augment(r, set()) for r in range(len(matrix)))
