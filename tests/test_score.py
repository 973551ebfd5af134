"""`python -m qgen score`: scoring a file without a model, and the contamination report."""

import json
import os
import random
import re

from conftest import SHARED, needs_shared, run_qgen, write_jsonl

from qgen.score import main as score_main


@needs_shared
def test_contamination_report_finds_exact_and_renumbered_benchmark_copies(tmp_path):
    """10 exact and 10 renumbered AIME 2024 problems planted among 200 MATH test problems: all 20 found,
    at most 2 others flagged.
    """
    rng = random.Random(0)
    aime = [
        json.loads(line) for line in open(os.path.join(SHARED, "qwen25_math_eval/aime24/test.jsonl"), encoding="utf-8")
    ]
    math_test = [json.loads(line) for line in open(os.path.join(SHARED, "math/test.jsonl"), encoding="utf-8")]
    picked = rng.sample([p for p in aime if re.search(r"\d", p["problem"])], 20)
    planted = [
        {"id": f"exact-{i}", "question": p["problem"], "answer": str(p["answer"])} for i, p in enumerate(picked[:10])
    ]
    planted += [{"id": f"renumbered-{i}", "answer": "0",
                 "question": re.sub(r"\d+", lambda m: str(int(m.group()) + 3), p["problem"])} for i, p in enumerate(picked[10:])]  # fmt: skip
    assert all(a["question"] != p["problem"] for a, p in zip(planted[10:], picked[10:]))
    others = [
        {"id": f"other-{i}", "question": r["problem"], "answer": "x"} for i, r in enumerate(rng.sample(math_test, 200))
    ]
    rows = planted + others
    rng.shuffle(rows)
    path = write_jsonl(tmp_path / "generated.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    code = score_main(["--input", f"jsonl:{path}", "--reference", f"math:{os.path.join(SHARED, 'qwen25_math_eval/aime24/test.jsonl')}",
                       "--output", str(out)])  # fmt: skip
    assert code == 0
    scored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    flagged = {r["id"] for r in scored if r["contaminated"]}
    assert {r["id"] for r in planted} <= flagged
    assert len(flagged - {r["id"] for r in planted}) <= 2


@needs_shared
def test_score_cli_reports_difficulty_spearman_on_math_and_runs_on_gaokao(tmp_path):
    """Fitted on every 3rd MATH train question (2,499), scored on every 3rd test question (1,500; the files are
    ordered by subject, so a head would be one subject): Spearman 0.70 here (0.73 on the whole files), the
    untrained heuristic 0.52.
    """

    def every_third(name):
        path = tmp_path / f"{name}-third.jsonl"
        with open(os.path.join(SHARED, f"math/{name}.jsonl"), encoding="utf-8") as fh:
            path.write_text("".join(line for i, line in enumerate(fh, 1) if i % 3 == 0), encoding="utf-8")
        return f"math:{path}"

    train = every_third("train")
    proc = run_qgen(["score", "--input", every_third("test"), "--difficulty-train", train])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"questions\s+1500", proc.stdout)
    rho = float(re.search(r"difficulty_spearman_vs_labels\s+([0-9.]+)", proc.stdout).group(1))
    assert rho >= 0.65
    # GAOKAO-Bench points follow the question type, not difficulty: one score per file, no Spearman to report
    gaokao = os.path.join(SHARED, "gaokao_bench/Objective_Questions/2010-2022_Math_I_MCQs.json")
    proc = run_qgen(["score", "--input", f"gaokao_bench:{gaokao}", "--difficulty-train", train])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"questions\s+186", proc.stdout) and re.search(r"labelled\s+186", proc.stdout)
    assert re.search(r"difficulty_spearman_vs_labels\s+n/a \(the labels are all equal\)", proc.stdout)
    assert "ConstantInputWarning" not in proc.stderr


def test_score_bad_input_is_a_clear_error(tmp_path, capsys):
    assert score_main(["--input", "nonsense"]) == 2
    assert "FORMAT:PATH" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}, "{broken"])
    assert score_main(["--input", f"jsonl:{bad}"]) == 2
    assert "bad.jsonl, line 2" in capsys.readouterr().err


def test_answer_consistent_is_true_false_or_null_and_rigor_follows_it(tmp_path):
    """The column stays a boolean, null where the answer cannot be verified; rigor ranks the verdicts."""
    rows = [
        {"id": "right", "question": "Compute 3*4.", "answer": "12", "analysis": "3*4 = 12, so the answer is 12."},
        {"id": "wrong", "question": "Compute 3*4.", "answer": "13",
         "analysis": "Since 3*4 = 12, therefore, hence, thus, so the answer is 12."},  # more connectives
        {"id": "open", "question": "Compute 3*4.", "answer": "12", "analysis": "Multiply the two numbers."},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert score_main(["--input", f"jsonl:{path}", "--output", str(out)]) == 0
    raw = out.read_text(encoding="utf-8").splitlines()
    scored = {r["id"]: r for r in map(json.loads, raw)}
    assert [scored[k]["answer_consistent"] for k in ("right", "wrong", "open")] == [True, False, None]
    assert '"answer_consistent": null' in raw[2]
    assert scored["wrong"]["rigor"] < scored["open"]["rigor"] < scored["right"]["rigor"]
