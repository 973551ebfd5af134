import json
import os

import pytest
from conftest import SHARED, needs_shared, write_jsonl

from qgen.records import FORMATS, DataError, detect_language, last_boxed, read_source

MATH_ROWS = [
    {"problem": "Compute $1+1$.", "level": "Level 1", "type": "Prealgebra", "solution": "It is $\\boxed{2}$."},
    {
        "problem": "Find $x$ if $2x=6$.",
        "level": "Level 2",
        "type": "Algebra",
        "solution": "So $x=\\boxed{\\frac{6}{2}}$.",
    },
    {"problem": "Odd one.", "level": "Level ?", "type": "Algebra", "solution": "No box here."},
]


def test_math_reader_normalises_fields(tmp_path):
    recs = read_source("math", write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)).records
    assert [r.answer for r in recs] == ["2", "\\frac{6}{2}", ""]
    assert [r.difficulty for r in recs] == [0.0, 0.25, None]
    assert recs[1].subject == "Algebra" and recs[1].language == "en" and recs[1].qtype == "problem"


def test_gaokao_bench_reader(tmp_path):
    doc = {
        "keywords": "2010-2022_Math_I_MCQs",
        "example": [
            {
                "year": "2015",
                "category": "全国卷",
                "question": "1. 设集合……（　　）\nA. 1\nB. 2",
                "answer": ["B"],
                "analysis": "因为……故选 B。",
                "index": 0,
                "score": 5,
            },
            {
                "year": "2016",
                "category": "全国卷",
                "question": "2. 求值",
                "answer": ["A", "C"],
                "analysis": "",
                "index": 1,
                "score": 6,
            },
        ],
    }
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    recs = read_source("gaokao_bench", str(tmp_path)).records
    assert [(r.subject, r.qtype, r.answer, r.level, r.year) for r in recs] == [
        ("数学", "mcq", "B", "5分", "2015"),
        ("数学", "mcq", "AC", "6分", "2016"),
    ]
    assert recs[0].language == "zh"
    assert [r.difficulty for r in recs] == [0.25, 0.3]  # points / 20 as a coarse label


def test_tal_scq_reader(tmp_path):
    row = {
        "qid": "7",
        "queId": "abc",
        "difficulty": "2",
        "qtype": "single_choice",
        "problem": "1+2=?",
        "answer_option_list": [[{"aoVal": "A", "content": "3"}], [{"aoVal": "B", "content": "4"}]],
        "knowledge_point_routes": ["A->B->加法"],
        "answer_analysis": ["因为 1+2=3"],
        "answer_value": "A",
    }
    rec = read_source("tal_scq", write_jsonl(tmp_path / "t.jsonl", [row])).records[0]
    assert (rec.id, rec.answer, rec.options, rec.knowledge, rec.difficulty) == (
        "abc",
        "A",
        {"A": "3", "B": "4"},
        ["加法"],
        0.5,
    )


def test_jsonl_mapping_and_defaults(tmp_path):
    rows = [{"q": "What is 2+2?", "a": "4", "topic": "Arithmetic"}]
    rec = read_source(
        "jsonl",
        write_jsonl(tmp_path / "x.jsonl", rows),
        mapping={"question": "q", "answer": "a", "subject": "topic"},
        qtype="fill_blank",
    ).records[0]
    assert (rec.question, rec.answer, rec.subject, rec.qtype, rec.language) == (
        "What is 2+2?",
        "4",
        "Arithmetic",
        "fill_blank",
        "en",
    )


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}, '{"question": "c",'],
    )
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: malformed JSON"):
        read_source("jsonl", path)
    with pytest.raises(DataError, match="line 3"):  # skip_invalid never hides broken JSON
        read_source("jsonl", path, skip_invalid=True)


def test_missing_field_names_field_file_and_record(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [MATH_ROWS[0], {"problem": "no solution"}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 2: missing required field 'solution'"):
        read_source("math", path)
    result = read_source("math", path, skip_invalid=True)
    assert (len(result.records), result.skipped) == (1, 1)


def test_empty_and_unknown_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        read_source("jsonl", str(empty))
    with pytest.raises(DataError, match="no such file"):
        read_source("jsonl", str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="supported formats: " + ", ".join(FORMATS)):
        read_source("csv", str(empty))


def test_helpers():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert detect_language("已知函数 f(x)=x^2") == "zh" and detect_language("Let f(x)=x^2") == "en"


@needs_shared
def test_shared_record_counts():
    """The counts of PROVENANCE.md, read by our readers."""
    assert len(read_source("math", os.path.join(SHARED, "math/train.jsonl")).records) == 7498
    assert len(read_source("math", os.path.join(SHARED, "math/test.jsonl")).records) == 4500
    assert len(read_source("gaokao_bench", os.path.join(SHARED, "gaokao_bench")).records) == 2707
    tal = read_source("tal_scq", os.path.join(SHARED, "tal_scq5k/*/*_train_3K.jsonl")).records
    assert len(tal) == 6000 and {r.language for r in tal} == {"zh", "en"}


def test_non_utf8_bytes_and_a_bad_difficulty_are_data_errors_that_skip_invalid_counts(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"question": "What is 1+1?", "answer": "2"}).encode()
    latin1 = json.dumps({"question": "Café?", "answer": "1"}, ensure_ascii=False).encode("latin-1")
    hard = json.dumps({"question": "Why?", "answer": "1", "difficulty": "hard"}).encode()
    path.write_bytes(b"\n".join([good, latin1, hard, good]) + b"\n")
    with pytest.raises(DataError, match=r"mixed.jsonl, line 2: not UTF-8 text \(byte 0xe9"):
        read_source("jsonl", str(path))
    path.write_bytes(b"\n".join([good, hard, good]) + b"\n")
    with pytest.raises(DataError, match=r"mixed.jsonl, line 2: field 'difficulty' must be a number in \[0, 1\], got 'hard'"):
        read_source("jsonl", str(path))
    path.write_bytes(b"\n".join([good, latin1, hard, good]) + b"\n")
    result = read_source("jsonl", str(path), skip_invalid=True)
    assert len(result.records) == 2 and result.skipped == 2
    gaokao = tmp_path / "g.json"
    gaokao.write_bytes(b'{"keywords": "x",\n "example": ["\xff"]}')
    with pytest.raises(DataError, match=r"g.json, line 2: not UTF-8"):
        read_source("gaokao_bench", str(gaokao))


def test_a_typo_in_a_source_option_lists_the_source_options(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        read_source("jsonl", path, skip_invlaid=True)
    message = str(err.value)
    assert "'skip_invlaid' -> did you mean 'skip_invalid'?" in message
    assert "source options are: format, path, name, mapping, split, skip_invalid" in message
