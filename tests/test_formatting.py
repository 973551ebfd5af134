from qgen.formatting import parse_question, render_target


def test_round_trip_chinese_with_options():
    text = render_target(
        "设 $x=1$，则 $x+1=$（　　）",
        "B",
        "因为 $x=1$，所以 $x+1=2$，故选 B。",
        {"A": "1", "B": "2", "C": "3", "D": "4"},
        "zh",
    )
    assert text.splitlines()[0] == "题干：设 $x=1$，则 $x+1=$（　　）"
    p = parse_question(text)
    assert p.valid and p.answer == "B" and p.options == {"A": "1", "B": "2", "C": "3", "D": "4"}
    assert p.analysis.startswith("因为")


def test_round_trip_english():
    p = parse_question(render_target("What is $2+3$?", "5", "Since 2+3=5, the answer is 5.", None, "en"))
    assert (p.question, p.answer, p.valid) == ("What is $2+3$?", "5", True)


def test_gaokao_markers_and_inline_options():
    p = parse_question(
        "已知集合 A={1,2}，则 A 的子集个数为（　　）\nA．2  B．3  C．4  D．5\n【答案】C\n【解析】因为……故选 C。"
    )
    assert p.valid and p.answer == "C" and p.options == {"A": "2", "B": "3", "C": "4", "D": "5"}
    assert p.question.startswith("已知集合") and p.analysis.startswith("因为")


def test_malformed_output_is_flagged_not_dropped():
    p = parse_question("题干：只有题干，没有答案")
    assert not p.valid and p.problems == ["missing answer"] and p.question == "只有题干，没有答案"
    q = parse_question("random words without sections")
    assert not q.valid and q.problems == ["missing question", "missing answer"]
