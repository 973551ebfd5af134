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
    stated_choice,
)
from qgen.formatting import ParsedQuestion, parse_question

OPTIONS = {"A": "1", "B": "2", "C": "3", "D": "4"}
HALF = {"A": "1", "B": "\\frac{1}{2}", "C": "3", "D": "4"}
EIGHT = {"A": "1", "B": "2", "C": "3", "D": "4", "E": "5"}

# (stated answer, solution, options, consistent? -- None: unverifiable) -- a pinned table; every row is a behaviour
# we rely on
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
    ("12", "", None, None),  # no solution: unverifiable
    ("12", "We computed something.", None, None),  # the solution reaches no final answer: unverifiable
    ("", "\\boxed{12}", None, None),  # no stated answer: unverifiable
    # ---- the stated option letter, read as a choice (item: not every Latin letter of the field)
    ("B. $\\frac{1}{2}$", "故选B", HALF, True),  # F, A, C of \frac are not choices
    ("\\text{B}", "故选B", OPTIONS, True),  # nor E of \text
    ("\\textbf{(B)}", "the answer is (B).", OPTIONS, True),
    ("\\boxed{B}", "故选：B", OPTIONS, True),
    ("选B", "故选B", OPTIONS, True),
    ("答案：B", "故选B", OPTIONS, True),
    ("(B)", "so the answer is B.", OPTIONS, True),
    ("B.", "故选B", OPTIONS, True),
    ("$\\textbf{(B) }2$", "故选B", OPTIONS, True),
    ("AB", "故选AB", OPTIONS, True),  # multi-select
    ("A, C", "故选：A、C", OPTIONS, True),
    ("A和C", "the answer is AC", OPTIONS, True),
    ("ACD", "故选ACD", OPTIONS, True),
    ("B. $\\frac{1}{2}$", "故选C", HALF, False),  # near-misses: the letter is wrong
    ("\\text{C}", "故选B", OPTIONS, False),
    ("\\textbf{(A)}", "the answer is (B).", OPTIONS, False),
    ("\\boxed{D}", "故选：B", OPTIONS, False),
    ("AB", "故选B", OPTIONS, False),  # one letter more than the solution
    ("A, C", "故选：A、D", OPTIONS, False),
    ("A", "故选AC", OPTIONS, False),  # one letter fewer
    ("\\text{E}", "故选B", OPTIONS, False),  # a letter that is no option
    ("b", "故选B", OPTIONS, False),  # lower case is not an option letter
    # ---- the solution's choice, read in context
    ("B", "we get a = 2, i.e. option B", OPTIONS, True),
    ("B", "Check each: A fails, C fails, D fails, so the answer is B.", OPTIONS, True),
    ("B", "Since $x=2$, the correct choice is $\\textbf{(B)}$.", OPTIONS, True),
    ("B", "A is wrong since 1 < 2. So the answer is B. Option D fails as 4 > 2.", OPTIONS, True),  # last decisive
    ("B", "对于A, 错误; 对于C, 错误; 故选: B.", OPTIONS, True),
    ("B", "$x=2$, so $\\boxed{\\text{(B)}}$", OPTIONS, True),
    ("A", "we get a = 2, i.e. option B", OPTIONS, False),
    ("E", "the answer is e^0+1=2", EIGHT, False),  # "e" is a number, not option E; 2 is option B's value
    ("C", "Answer: c is the hypotenuse, so the answer is 2.", OPTIONS, False),  # c: a variable; 2: B
    ("C", "选项C错误，选项B正确", OPTIONS, False),  # the named options: the last one is B
    ("D", "A is wrong since 1 < 2. So the answer is B. Option D fails as 4 > 2.", OPTIONS, False),
    ("B", "Option B looks tempting, but the answer is C.", OPTIONS, False),
    # ---- compound answers, compared as wholes
    ("x=2, y=1", "\\boxed{x=2 \\text{ and } y=1}", None, True),
    ("y=1 and x=2", "\\boxed{x=2, y=1}", None, True),  # pairs matched by name
    ("$y=1$ 和 $x=2$", "解得 x=2 和 y=1，故答案为 x=2 和 y=1。", None, True),
    ("(2, 1)", "So the point is \\boxed{(2,1)}.", None, True),
    ("x=3 or x=-1", "\\boxed{x=-1 \\text{ or } x=3}", None, True),  # alternatives as a set
    ("\\{3, -1\\}", "\\boxed{\\{-1, 3\\}}", None, True),
    ("(2,+∞)∪(-∞,1)", "\\boxed{(-\\infty,1)\\cup(2,+\\infty)}", None, True),  # a union as intervals
    ("a=2, b=-1", "Hence \\boxed{b=-1, a=2}.", None, True),
    ("x=1 and y=2", "\\boxed{x=2 \\text{ and } y=1}", None, False),  # near-misses: values swapped
    ("x=1, y=2", "\\boxed{x=2, y=1}", None, False),
    ("(1, 2)", "So the point is \\boxed{(2,1)}.", None, False),  # a tuple is ordered
    ("x=2", "\\boxed{x=2 \\text{ and } y=1}", None, False),  # a pair missing
    ("x=2, y=1, z=0", "\\boxed{x=2, y=1}", None, False),  # a pair too many
    ("x=2, y=2", "\\boxed{x=2 \\text{ and } y=1}", None, False),  # one part changed
    ("x=3 or x=1", "\\boxed{x=-1 \\text{ or } x=3}", None, False),
    ("(-∞,1]∪(2,+∞)", "\\boxed{(-\\infty,1)\\cup(2,+\\infty)}", None, False),
    ("a=-1, b=2", "Hence \\boxed{b=-1, a=2}.", None, False),
    ("x=2 and y=1", "\\boxed{x=2}", None, False),  # the solution reaches one of the two
    ("x=2, y=1", "\\boxed{x=2 \\text{ or } y=1}", None, True),  # "or" of names: still the same set
    ("\\{1, 2\\}", "\\boxed{\\{1, 3\\}}", None, False),
    ("\\text{(C)}", "the answer is (B).", OPTIONS, False),
    ("选D", "故选B", OPTIONS, False),
    ("答案：A", "we get a = 2, i.e. option B", OPTIONS, False),
]


def test_pinned_table():
    questions = [ParsedQuestion("q", answer, solution, dict(options or {}), True)
                 for answer, solution, options, _ in TABLE]  # fmt: skip
    got = check_answers(questions)
    mismatches = [(row[0], row[1], c) for row, c in zip(TABLE, got) if c.consistent != row[3]]
    assert not mismatches
    assert all(c.reason for c, row in zip(got, TABLE) if row[3] is not True)  # every rejection says why


def test_normaliser_and_extractors():
    assert normalize_answer("答案：$\\dfrac{1}{2}$。") == "\\frac{1}{2}"
    assert normalize_answer("x ≤ √3") == "x \\le \\sqrt{3}"
    assert split_answer("x=1 或 x=2；y=3") == [["x=1", "x=2"], ["y=3"]]
    assert split_answer("\\boxed{x=2 \\text{ and } y=1}") == [["x=2", "y=1"]]  # never split inside a {} group
    assert split_answer("\\{1 \\text{ or } 2\\} or 3") == [["\\{1 or 2\\}", "3"]]
    assert solution_answer("first \\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert solution_answer("所以答案为 5。其余略") == "5"
    assert solution_choice("故选：C") == ("C",) and solution_choice("the correct answer is (D)") == ("D",)
    assert solution_choice("we get 5") is None
    assert solution_choice("the answer is e^0+1=2") is None and solution_choice("Answer: c is the hypotenuse") is None
    assert solution_choice("we get a = 2, i.e. option B") == ("B",)
    assert solution_choice("故选 A、C") == ("A", "C") and solution_choice("解得 AB=3，故选B") == ("B",)


@pytest.mark.parametrize("stated", ["B", "B.", "(B)", "B. $\\frac{1}{2}$", "\\text{B}", "\\textbf{(B)}", "\\boxed{B}",
                                    "选B", "答案：B", "（Ｂ）", "$\\textbf{(B) }12$"])
def test_a_stated_letter_is_read_as_a_choice(stated):
    assert stated_choice(stated) == ("B",)


def test_multi_select_and_what_is_no_choice():
    assert [stated_choice(s) for s in ("AB", "A, C", "ACD", "A和C")] == [("A", "B"), ("A", "C"), ("A", "C", "D"), ("A", "C")]
    assert [stated_choice(s) for s in ("b", "x=2", "", "12")] == [None] * 4


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
    assert out["rigor"].values[0] - out["rigor"].values[1] == pytest.approx(2 / 3)  # two tiers, same heuristics
    assert out["rigor"].factor is None
    gated = RigorReward(gated=True)
    total, out = combine_scores({"rigor": gated, "difficulty": DifficultyReward()}, texts, [None, None], [False, False])
    assert out["rigor"].values[1] == 0.0 and out["rigor"].factor.tolist() == [1.0, 0.0]
    assert total[0] > 0 and total[1] == 0.0  # no difficulty credit for a question whose answer is wrong
    with pytest.raises(ValueError, match="gated needs check_answers"):
        RigorReward(check_answers=False, gated=True)


def test_a_verified_wrong_answer_ranks_below_every_verified_right_one():
    """Heavy connective density must not lift a wrong stated letter above a right one (rigor, both callers)."""
    from callbacks import RigorReward
    from qgen.scoring import combine_scores, rigor_score

    options = "\nA. 1\nB. 2\nC. 3\nD. 4"
    reasoning = "因为 x=2，所以 y=2，故 z=2，即 w=2，由于 v=2，因此 u=2，从而 t=2，则 s=2，可得 r=2，于是 q=2，综上"
    wrong = f"题干：求 x。{options}\n参考答案：C\n解析：{reasoning}，故选B"  # stated C, the analysis picks B
    right = "题干：求 x。" + options + "\n参考答案：B\n解析：x 等于 2，选B"  # terse, hardly a connective
    unverifiable = "题干：求 x。" + options + "\n参考答案：B\n解析：" + reasoning + "。"  # no choice, no value
    texts = [wrong, right, unverifiable]
    _, out = combine_scores({"rigor": RigorReward()}, texts, [None] * 3, [False] * 3)
    reward = out["rigor"].values
    assert reward[0] < reward[2] < reward[1]
    parsed = [parse_question(t) for t in texts]
    checks = check_answers(parsed)
    assert [c.consistent for c in checks] == [False, True, None]
    score = [rigor_score(p, "zh", False, c.consistent) for p, c in zip(parsed, checks)]  # what `qgen score` runs
    assert score[0] < score[2] < score[1]
    assert max(rigor_score(p, "zh", False, False) for p in parsed) <= 1 / 3 < 2 / 3 <= min(
        rigor_score(p, "zh", True, True) for p in parsed)  # bounds hold whatever the heuristics
