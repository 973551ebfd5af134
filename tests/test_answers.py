"""The answer-consistency check: normaliser, math-verify behind it, multiple choice, the worker process."""

import threading

import pytest

from qgen.answers import (
    AnswerCheck,
    Verifier,
    check_answers,
    normalize_answer,
    solution_answer,
    solution_choice,
    split_answer,
)
from qgen.formatting import ParsedQuestion, parse_question

OPTIONS = {"A": "1", "B": "2", "C": "3", "D": "4"}

# (stated answer, solution, options, consistent?) -- a pinned table; every row is a behaviour we rely on
TABLE = [
    ("7/25", "so the probability is \\boxed{\\frac{7}{25}}.", None, True),
    ("0.28", "so \\boxed{\\dfrac{7}{25}}.", None, True),
    ("$\\frac{8}{25}$", "so \\boxed{\\frac{7}{25}}.", None, False),  # a digit changed
    ("12.0", "Thus the answer is 12.", None, True),
    ("13", "Thus the answer is 12.", None, False),
    ("-12", "Thus the answer is $12$.", None, False),  # sign
    ("$x=1$ 或 $x=2$", "解得 x=2 或 x=1，故答案为 x=1 或 x=2。", None, True),  # 或: a set, any order
    ("x=1 or x=3", "Hence the answer is $x = 1$ or $x = 2$.", None, False),
    ("2√2", "所以 \\boxed{\\sqrt{8}}", None, True),  # Unicode root, bare answer
    ("(1, 2]", "Hence \\boxed{(1,2]}", None, True),  # interval with a space
    ("[1, 2]", "Hence \\boxed{(1,2]}", None, False),  # bracket changed
    ("3；5", "第一空为3，第二空为5，故答案为 3；5", None, True),  # two blanks, blank by blank
    ("5；3", "故答案为 3；5", None, False),  # blanks are ordered
    ("∞", "\\boxed{\\infty}", None, True),
    ("答案：−3", "所以答案为 -3。", None, True),  # prefix, full-width colon, Unicode minus
    ("1-1/e", "\\boxed{1+1/e}", None, False),  # a known math-verify false positive in some versions
    ("1/2", "\\boxed{2}", None, False),  # reciprocal
    ("B", "计算得 x=2，故选B", OPTIONS, True),
    ("C", "计算得 x=2，故选B", OPTIONS, False),  # letter swapped
    ("B", "We get $x=2$, so \\boxed{2}.", OPTIONS, True),  # the solution's value is option B's
    ("A", "We get $x=2$, so \\boxed{2}.", OPTIONS, False),
    ("B", "The answer is (B).", OPTIONS, True),
    ("B", "故选B", {"A": "1", "B": "2", "C": "2", "D": "4"}, False),  # two options the same
    ("B", "故选B", {"A": "1", "B": "2"}, False),  # fewer than four options
    ("12", "", None, False),  # no solution
    ("12", "We computed something.", None, False),  # the solution reaches no stated final answer
]


def test_pinned_table():
    questions = [ParsedQuestion("q", answer, solution, dict(options or {}), True)
                 for answer, solution, options, _ in TABLE]  # fmt: skip
    got = check_answers(questions)
    mismatches = [(row[0], row[1], c) for row, c in zip(TABLE, got) if c.consistent != row[3]]
    assert not mismatches
    assert all(c.reason for c, row in zip(got, TABLE) if not row[3])  # every rejection says why


def test_normaliser_and_extractors():
    assert normalize_answer("答案：$\\dfrac{1}{2}$。") == "\\frac{1}{2}"
    assert normalize_answer("x ≤ √3") == "x \\le \\sqrt{3}"
    assert split_answer("x=1 或 x=2；y=3") == ([["x=1", "x=2"], ["y=3"]], True)
    assert solution_answer("first \\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert solution_answer("所以答案为 5。其余略") == "5"
    assert solution_choice("故选：C") == "C" and solution_choice("the correct answer is (D)") == "D"
    assert solution_choice("we get 5") is None


def test_a_parsed_generated_question_is_checked_end_to_end():
    good = parse_question("题干：求 1+1。\n参考答案：2\n解析：1+1=2，故答案为 2。")
    bad = parse_question("Question: Compute 3*4.\nAnswer: 13\nSolution: 3*4 = 12, so the answer is 12.")
    assert [c.consistent for c in check_answers([good, bad])] == [True, False]


def test_runs_from_a_non_main_thread():
    """math-verify's signal.alarm fails outside the main thread; the worker process makes that irrelevant."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=check_answers([ParsedQuestion("q", "0.5", "\\boxed{1/2}")])))
    thread.start()
    thread.join(60)
    assert out["r"] == [AnswerCheck(True, "")]


def test_a_worker_past_its_deadline_is_killed_and_replaced():
    verifier = Verifier(timeout=1)
    try:
        assert verifier._ask([["1/2", "0.5"]], deadline=0.0) is None  # no reply in time: killed
        assert verifier.killed == 1 and verifier._proc is None
        assert verifier.equal_many([("1/2", "0.5"), ("1", "2")]) == [True, False]  # a fresh worker answers
    finally:
        verifier.close()


@pytest.mark.parametrize("expr", ["9^{9^{9^{9}}}", "2^{2^{2^{2^{5}}}}"])
def test_pathological_expressions_finish_as_not_equal(expr):
    verifier = Verifier(timeout=1)
    try:
        assert verifier.equal_many([(expr, "1"), ("1/2", "0.5")]) == [False, True]
    finally:
        verifier.close()


def test_rigor_reward_verifies_answers_and_gates_the_total():
    from callbacks import DifficultyReward, RigorReward
    from qgen.scoring import combine_scores

    texts = [
        "Question: Compute 3*4.\nAnswer: 12\nSolution: Since 3*4 = 12, the answer is 12.",
        "Question: Compute 3*4.\nAnswer: 13\nSolution: Since 3*4 = 12, the answer is 12.",  # wrong stated answer
    ]
    soft = RigorReward()
    total, out = combine_scores({"rigor": soft}, texts, [None, None], [False, False])
    assert out["rigor"].extra["answer_consistent"].tolist() == [1.0, 0.0]
    assert out["rigor"].values[0] - out["rigor"].values[1] == pytest.approx(0.2)  # the verified answer part
    assert out["rigor"].factor is None
    gated = RigorReward(gated=True)
    total, out = combine_scores({"rigor": gated, "difficulty": DifficultyReward()}, texts, [None, None], [False, False])
    assert out["rigor"].values[1] == 0.0 and out["rigor"].factor.tolist() == [1.0, 0.0]
    assert total[0] > 0 and total[1] == 0.0  # no difficulty credit for a question whose answer is wrong
    with pytest.raises(ValueError, match="gated needs check_answers"):
        RigorReward(check_answers=False, gated=True)
