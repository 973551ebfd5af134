"""OpenAIJudge against a local HTTP server (real sockets): success, cache, timeout, retries, HTTP 500, startup errors."""

import socket

import pytest
from judge_server import JudgeServer

from callbacks import EducationalValueJudge, OpenAIJudge
from callbacks.judges import JudgeError, parse_rating
from qgen.formatting import parse_question
from qgen.records import Question
from qgen.scoring import ScoringBatch, educational_value

QUESTIONS = [
    "Question: Find the remainder when 7^20 is divided by 5.\nAnswer: 1\nSolution: Since 7^4 = 2401 ends in 1, ...",
    "题干：已知等差数列的首项为2，公差为3，求第5项。\n参考答案：14\n解析：由通项公式得 a5 = 2 + 4×3 = 14。",
    "Question: How many positive divisors does 36 have?\nAnswer: 9\nSolution: 36 = 2^2 3^2, so (2+1)(2+1) = 9.",
]


def batch(texts):
    parsed = [parse_question(t) for t in texts]
    return ScoringBatch(texts, parsed, [None] * len(texts), ["en"] * len(texts), [False] * len(texts), 1)


def judge(server, tmp_path, **kw):
    kw = {"timeout": 2.0, "max_retries": 2, "backoff": 0.01, "concurrency": 2, "cache_dir": str(tmp_path / "cache"), **kw}
    j = OpenAIJudge(base_url=server.url, model="judge-model", api_key_env="QGEN_TEST_JUDGE_KEY", **kw)
    j.connect(check=True)
    return j


def test_parse_rating():
    assert parse_rating("Score: 8") == 8
    assert parse_rating("<think>maybe 2</think> I give it **Score: 10**") == 10
    assert parse_rating("评分：6 分") == 6
    assert parse_rating("Rating: 3/10") == 3 and parse_rating("8/10") == 8 and parse_rating("7") == 7
    assert parse_rating("no number here") is None
    # only an explicit rating outside the reasoning counts; anything else is a failed rating
    assert parse_rating("Score: -3") is None and parse_rating("Score: 12") is None
    assert parse_rating("<think>this deserves a 9 because") is None  # cut off inside <think>
    assert parse_rating("2 of 4 parts missing") is None and parse_rating("overall 4/10") is None
    assert parse_rating("Answer: 12+12+12+12+1") is None  # a real server's reply with no rating at all
    assert parse_rating("Score: 9\nOn reflection, Score: 4") == 4


def test_ratings_cache_hits_and_auth_header(tmp_path, monkeypatch):
    monkeypatch.setenv("QGEN_TEST_JUDGE_KEY", "sk-test-123")
    with JudgeServer() as server:
        server.rating = 7
        j = judge(server, tmp_path)
        out = j.score(batch(QUESTIONS))
        assert out.values.tolist() == pytest.approx([(7 - 1) / 9] * 3)
        assert server.chat_requests() == 3
        assert all(r["authorization"] == "Bearer sk-test-123" for r in server.requests)
        assert server.requests[-1]["body"]["model"] == "judge-model"
        # the same questions again: served from the cache, no request
        j.score(batch(QUESTIONS[:2]))
        assert server.chat_requests() == 3 and j.cache_hits == 2
        # a new judge (a rerun) reads the on-disk cache: still no request
        fresh = judge(server, tmp_path)
        server.rating = 2
        assert fresh.score(batch(QUESTIONS)).values.tolist() == pytest.approx([6 / 9] * 3)
        assert server.chat_requests() == 3
        # another question is asked
        assert fresh.score(batch(["Question: What is 1 + 1?\nAnswer: 2"])).values.tolist() == pytest.approx([1 / 9])
        assert server.chat_requests() == 4


def test_http_500_is_retried_then_succeeds(tmp_path):
    with JudgeServer() as server:
        server.fail_first = 2
        j = judge(server, tmp_path, max_retries=2, cache_dir=None)
        assert j.rate(QUESTIONS[0]) == 7
        assert server.chat_requests() == 3  # two 500s, then the answer


def test_persistent_500_raises_or_scores_neutral(tmp_path):
    with JudgeServer() as server:
        server.fail_first = 10**6
        with pytest.raises(JudgeError, match=r"after 2 attempts \(last: HTTP 500\)"):
            judge(server, tmp_path, max_retries=1, cache_dir=None).rate(QUESTIONS[0])
        assert server.chat_requests() == 2
        neutral = judge(server, tmp_path, max_retries=1, cache_dir=None, on_error="neutral")
        assert neutral.score(batch(QUESTIONS[:1])).values.tolist() == [0.5]
        assert neutral.failures == 1


def test_timeout_is_bounded_and_retried(tmp_path):
    import time

    with JudgeServer() as server:
        server.delay = 1.5
        j = judge(server, tmp_path, timeout=0.3, max_retries=1, cache_dir=None)
        started = time.perf_counter()
        with pytest.raises(JudgeError, match="ReadTimeout|TimeoutError"):
            j.rate(QUESTIONS[0])
        assert time.perf_counter() - started < 1.4  # two 0.3 s attempts, not two 1.5 s waits
        assert server.chat_requests() == 2


def test_unreachable_endpoint_and_rejected_key_fail_at_start(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match=f"cannot reach http://127.0.0.1:{port}/v1"):
        OpenAIJudge(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout=1.0).connect(check=True)
    with JudgeServer() as server:
        server.models_status = 401
        with pytest.raises(JudgeError, match="rejected the API key"):
            judge(server, tmp_path)


def test_educational_value_rewards_worked_solutions_and_knowledge_points():
    good = parse_question("题干：已知等差数列{an}的首项为2，公差为3，求该数列的第5项与前5项和。\n参考答案：14；40\n"
                          "解析：由等差数列通项公式得 a5 = 2 + 4×3 = 14。由求和公式得 S5 = 5×(2+14)/2 = 40。故答案为14与40。")  # fmt: skip
    bare = parse_question("题干：求第5项。\n参考答案：14")
    assert educational_value(good, "zh", ["等差数列"]) == pytest.approx(1.0)
    assert educational_value(bare, "zh", ["等差数列"]) < 0.5
    rec = Question("1", "t", "zh", "数学", "fill_blank", "q", "a", knowledge=["等差数列"])
    scores = EducationalValueJudge().score(ScoringBatch(["x", "y"], [good, bare], [rec, rec], ["zh", "zh"], [False, False], 1))
    assert scores.values[0] > scores.values[1]


def test_the_api_key_reaches_the_server_but_no_file_or_log(tmp_path, monkeypatch, capsys):
    """A distillation run with OpenAIJudge: the key is sent as a Bearer token and appears nowhere on disk."""
    import os

    from conftest import CONFIGS, scalars

    from qgen.cli import cli_main

    secret = "sk-qgen-SECRET-0123456789"
    monkeypatch.setenv("QGEN_TEST_JUDGE_KEY", secret)
    with JudgeServer() as server:
        cli_main(["fit", "--config", os.path.join(CONFIGS, "distill.yaml"), "--model.init_args.teacher=embedded:default",
                  "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
                  "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--data.batch_size=2",
                  "--model.init_args.lmbda=1.0", "--model.init_args.on_policy_start=0", "--model.init_args.generation.max_new_tokens=12",
                  "--trainer.callbacks+=callbacks.OpenAIJudge", f"--trainer.callbacks.base_url={server.url}",
                  "--trainer.callbacks.model=judge-model", "--trainer.callbacks.api_key_env=QGEN_TEST_JUDGE_KEY",
                  f"--trainer.callbacks.cache_dir={tmp_path / 'judge-cache'}"])  # fmt: skip
        assert server.chat_requests() >= 4  # 2 steps x 2 on-policy samples
        assert all(r["authorization"] == f"Bearer {secret}" for r in server.requests)
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert scalars(log_dir, "train/judge_llm_mean")
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert any(f.endswith(".ckpt") for f in files) and any(f.endswith("hparams.yaml") for f in files)
    assert any("judge-cache" in f for f in files) and any("tfevents" in f for f in files)
    for path in files:
        with open(path, "rb") as fh:
            assert secret.encode() not in fh.read(), path
    out = capsys.readouterr()
    assert secret not in out.out and secret not in out.err


def test_a_dripping_server_is_cut_off_at_the_total_deadline(tmp_path):
    """One byte every 0.2 s never trips a 1 s read timeout; the 1 s total deadline per attempt ends it."""
    import time

    with JudgeServer() as server:
        server.drip = 0.2
        j = judge(server, tmp_path, timeout=1.0, max_retries=1, backoff=0.0, cache_dir=None)
        started = time.perf_counter()
        with pytest.raises(JudgeError, match="within 1 s"):
            j.rate(QUESTIONS[0])
        assert time.perf_counter() - started < 3.5  # two 1 s attempts (the reply alone would take ~25 s)


def test_circuit_breaker_stops_or_skips_loudly(tmp_path, capsys):
    with JudgeServer() as server:
        server.fail_first = 10**6
        stop = judge(server, tmp_path, max_retries=0, cache_dir=None, concurrency=1, max_consecutive_failures=2,
                     on_error="raise")  # fmt: skip
        with pytest.raises(JudgeError):
            stop.score(batch(QUESTIONS))
        neutral = judge(server, tmp_path, max_retries=0, cache_dir=None, concurrency=1, max_consecutive_failures=2,
                        on_error="neutral")  # fmt: skip
        sent = server.chat_requests()
        assert neutral.score(batch(QUESTIONS)).values.tolist() == [0.5, 0.5, 0.5]
        assert server.chat_requests() - sent == 2  # the third question is not sent once the breaker is open
        assert "2 of 3 ratings failed this step" in capsys.readouterr().err
        assert neutral.score(batch(["Question: new?\nAnswer: 1"])).values.tolist() == [0.5]
        assert server.chat_requests() - sent == 2
        assert "circuit breaker opened after 2 failed ratings" in capsys.readouterr().err


def test_retry_after_is_honoured_and_a_401_says_one_attempt(tmp_path):
    import time

    with JudgeServer() as server:
        server.script = [(429, {"Retry-After": "1"})]
        j = judge(server, tmp_path, max_retries=2, backoff=0.0, cache_dir=None)
        started = time.perf_counter()
        assert j.rate(QUESTIONS[0]) == 7
        assert time.perf_counter() - started >= 0.95
        server.script = [(401, {})]
        with pytest.raises(JudgeError, match=r"after 1 attempt \(last: HTTP 401\)"):
            j.rate(QUESTIONS[1])


def test_replies_without_a_rating_are_failed_ratings_not_ones(tmp_path):
    with JudgeServer() as server:
        server.content = "Answer: 12+12+12+12+1"
        j = judge(server, tmp_path, max_retries=0, cache_dir=None, on_error="neutral", max_consecutive_failures=100)
        assert j.score(batch(QUESTIONS)).values.tolist() == [0.5, 0.5, 0.5]
        assert j.failures == 3
