"""predict (prompts file, resumable writer), test metrics, and the prompts-file errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import CONFIGS, run_qgen, scalars, write_jsonl

from callbacks.predictions import PredictionWriter, read_written
from qgen.cli import cli_main
from qgen.metrics import bleu4, distinct_n, rouge_l, self_bleu
from qgen.prompts import read_prompts
from qgen.records import DataError

ZH = "已知等差数列的首项为三，公差为二，求该数列的第十项。"
EN = "Find the number of positive divisors of seventy two."


def test_bleu_and_rouge_identical_disjoint_and_one_chinese_character_changed():
    assert bleu4([ZH], [[ZH]], "zh") == pytest.approx(1.0)
    assert rouge_l([ZH], [ZH], "zh") == pytest.approx(1.0)
    assert bleu4([EN], [[EN]], "en") == pytest.approx(1.0)
    assert rouge_l([EN], [EN], "en") == pytest.approx(1.0)
    assert bleu4(["甲乙丙丁戊己庚辛"], [[ZH]], "zh") == 0.0
    assert rouge_l(["甲乙丙丁戊己庚辛"], [ZH], "zh") == 0.0
    assert bleu4(["cats chase mice daily"], [[EN]], "en") == 0.0
    assert rouge_l(["cats chase mice daily"], [EN], "en") == 0.0
    changed = ZH.replace("三", "五")  # one character of len(ZH) = 26
    assert 0.0 < bleu4([changed], [[ZH]], "zh") < 1.0
    assert 0.0 < rouge_l([changed], [ZH], "zh") < 1.0
    # characters, not words: ROUGE-L F1 is 25/26 (the LCS misses one character of 26)
    assert rouge_l([changed], [ZH], "zh") == pytest.approx((len(ZH) - 1) / len(ZH), abs=1e-6)


def test_distinct_and_self_bleu():
    assert distinct_n(["a b a b"], "en", 1) == 0.5  # 2 unique of 4
    assert distinct_n(["a b a b"], "en", 2) == pytest.approx(2 / 3)  # (a b), (b a) of 3
    assert distinct_n(["甲乙甲"], "zh", 1) == pytest.approx(2 / 3)
    assert self_bleu([EN, EN, EN], "en") == pytest.approx(1.0)
    assert self_bleu([EN, "cats chase mice daily", "red green blue yellow"], "en") < 0.01


def test_prompts_file_errors_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"subject": "数学"}, '{"subject": "x"', {"subject": "y"}])
    with pytest.raises(DataError, match=r"p\.jsonl, line 2: malformed JSON"):
        read_prompts(bad)
    missing = write_jsonl(tmp_path / "m.jsonl", [{"subject": "数学"}, {"type": "mcq"}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 2: missing required field 'subject'"):
        read_prompts(missing)
    variant = write_jsonl(tmp_path / "v.jsonl", [{"subject": "Algebra", "task": "variant"}])
    with pytest.raises(DataError, match="needs the field 'question'"):
        read_prompts(variant)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_prompts(str(tmp_path / "empty.jsonl"))
    rows = read_prompts(write_jsonl(tmp_path / "ok.jsonl", [{"subject": "数学", "n": 3}, {"id": "q7", "subject": "x"}]))
    assert [(r["key_base"], r["n"]) for r in rows] == [("line1", 3), ("q7", 1)]


def test_a_torn_last_line_is_cut_and_a_foreign_line_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"key": "a#0"}\n{"key": "b#0"}\n{"key": "c#', encoding="utf-8")
    assert read_written(str(path)) == {"a#0", "b#0"}
    assert path.read_text() == '{"key": "a#0"}\n{"key": "b#0"}\n'
    path.write_text('{"key": "a#0"}\nnot json\n{"key": "b#0"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not a prediction row"):
        read_written(str(path))


def test_rank_files_are_merged_once_per_key(tmp_path):
    out = tmp_path / "pred.jsonl"
    row = lambda key: json.dumps({"key": key, "text": key}) + "\n"  # noqa: E731
    out.write_text(row("a") + row("b"))
    (tmp_path / "pred.jsonl.rank1").write_text(row("b") + row("c") + '{"key": "torn')
    (tmp_path / "pred.jsonl.rank2").write_text(row("d"))
    (tmp_path / "pred.jsonl.rankfoo").write_text("not a rank file")
    assert PredictionWriter(str(out)).merge_rank_files() == 2
    assert [json.loads(line)["key"] for line in out.read_text().splitlines()] == ["a", "b", "c", "d"]
    assert sorted(os.listdir(tmp_path)) == ["pred.jsonl", "pred.jsonl.rankfoo"]


def _predict_cmd(prompts, output):
    return [sys.executable, "-m", "qgen", "predict", "--config", os.path.join(CONFIGS, "sft.yaml"),
            "--data.predict_prompts", prompts, "--data.batch_size", "2", "--trainer.logger", "false",
            "--trainer.callbacks+=callbacks.PredictionWriter", f"--trainer.callbacks.output={output}",
            "--model.init_args.generation.max_new_tokens", "48"]  # fmt: skip


def _lines(path):
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as fh:
        return fh.read().count(b"\n")


def test_predict_killed_halfway_and_rerun_completes_the_file(tmp_path):
    """N prompts -> N lines; a SIGKILL mid-run and a rerun leave no duplicate and no lost line."""
    rows = [{"id": f"p{i}", "subject": "数学" if i % 2 else "Algebra", "level": "Level 2", "knowledge": ["数列"]}
            for i in range(18)] + [{"id": "multi", "subject": "Geometry", "n": 3}]  # fmt: skip
    prompts, output = write_jsonl(tmp_path / "prompts.jsonl", rows), str(tmp_path / "pred.jsonl")
    expected = {f"p{i}#0" for i in range(18)} | {"multi#0", "multi#1", "multi#2"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_predict_cmd(prompts, output), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 240
    while _lines(output) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = _lines(output)
    assert 4 <= at_kill < len(expected), f"the kill came at {at_kill} of {len(expected)} lines: the test proves nothing"
    first = read_written(output)
    done = subprocess.run(_predict_cmd(prompts, output), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(first)} predictions already written" in done.stdout
    with open(output, encoding="utf-8") as fh:
        written = [json.loads(line) for line in fh]
    keys = [r["key"] for r in written]
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected
    row = written[0]
    for field in ("text", "question", "answer", "analysis", "options", "valid", "generation", "subject", "task"):
        assert field in row
    assert set(row["scores"]) >= {"difficulty", "rigor", "novelty", "educational_value", "near_copy"}
    assert row["generation"]["max_new_tokens"] == 48
    # no logger, no run directory: nothing else is written into the working directory (no config.yaml)
    assert sorted(os.listdir(tmp_path)) == ["pred.jsonl", "prompts.jsonl"]


def test_test_subcommand_writes_metrics_json_and_tensorboard(tmp_path):
    cli_main(["test", "--config", os.path.join(CONFIGS, "sft.yaml"), "--trainer.logger.init_args.save_dir",
              str(tmp_path), "--trainer.limit_test_batches", "2", "--data.batch_size", "4",
              "--model.init_args.generation.max_new_tokens", "32", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    log_dir = tmp_path / "lightning_logs" / "version_0"
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["examples"] == 8
    for key in ("bleu4", "rougeL", "distinct1", "distinct2", "self_bleu", "parse_valid_rate",
                "novelty_max_similarity_mean", "novelty_share_above_0.85", "difficulty_mean", "difficulty_histogram"):
        assert key in metrics, key
    assert 0.0 <= metrics["bleu4"] <= 1.0 and 0.0 <= metrics["parse_valid_rate"] <= 1.0
    assert sum(metrics["difficulty_histogram"]) == 8
    assert scalars(log_dir, "test/rougeL")
    assert len((log_dir / "test_generations.jsonl").read_text().splitlines()) == 8


@pytest.mark.slow
def test_predict_under_ddp_writes_one_complete_file(tmp_path):
    """7 prompts on 2 CPU processes (the sampler repeats one to even the shards): 7 rows, once each, one file."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "subject": "Algebra"} for i in range(7)])
    output = str(tmp_path / "pred.jsonl")
    args = _predict_cmd(prompts, output)[3:] + ["--trainer.strategy=ddp", "--trainer.devices=2",
                                                "--trainer.accelerator=cpu", "--model.init_args.generation.max_new_tokens=16"]  # fmt: skip
    proc = run_qgen(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(output, encoding="utf-8") as fh:
        keys = [json.loads(line)["key"] for line in fh]
    assert sorted(keys) == [f"p{i}#0" for i in range(7)]
    assert sorted(os.listdir(tmp_path)) == ["pred.jsonl", "prompts.jsonl"]
