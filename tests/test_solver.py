"""SolverDifficulty with a scripted solver: pass rate, validity, early stop, the two reward modes."""

import time

import pytest

from callbacks import SolverDifficulty
from qgen.scoring import combine_scores

QUESTION = "Question: Compute 3*4.\nAnswer: 12\nSolution: 3*4 = 12, so the answer is 12."


class ScriptedSolver:
    """Answers each call with the next scripted list of final answers (one per requested sample)."""

    def __init__(self, *rounds):
        self.rounds, self.calls = list(rounds), []

    def solve(self, questions, languages, samples):
        self.calls.append(samples)
        answers = self.rounds.pop(0)
        assert len(answers) == samples
        return [[f"Working... so the answer is {a}." for a in answers] for _ in questions]


def score(callback, solver):
    callback.solver = solver
    callback.prior.predict = lambda q, a=None, s=None: [0.5] * len(q)  # a fixed prior estimate d = 0.5
    total, out = combine_scores({"solver": callback}, [QUESTION], [None], [False])
    return float(out["solver"].values[0]), callback.stats


def test_all_agree_stops_early_and_shrinks_toward_the_prior():
    solver = ScriptedSolver(["12", "12.0", "12", "12"])
    value, stats = score(SolverDifficulty(samples=8, early_stop=4, prior_strength=2.0), solver)
    assert solver.calls == [4]  # all four agree: no more samples
    # p~ = (4 + 2 * (1 - 0.5)) / (4 + 2) = 5/6 -> reward 1/6
    assert value == pytest.approx(1 / 6)
    assert stats["solver_pass_rate"] == 1.0 and stats["valid_frac"] == 1.0 and stats["likely_wrong_answers"] == 0


def test_no_sample_reaches_the_stated_answer_is_invalid_and_flags_a_likely_wrong_answer():
    solver = ScriptedSolver(["13", "13", "13", "7"])
    value, stats = score(SolverDifficulty(samples=8, early_stop=4), solver)
    assert value == 0.0 and stats["valid_frac"] == 0.0
    assert stats["likely_wrong_answers"] == 1  # 13 holds 3 of 4 votes


def test_a_split_vote_draws_the_remaining_samples_and_band_mode_peaks_at_one_half():
    solver = ScriptedSolver(["12", "13", "12", "13"], ["12", "13", "12", "13"])
    value, stats = score(SolverDifficulty(samples=8, early_stop=4, mode="band"), solver)
    assert solver.calls == [4, 4]
    assert stats["solver_pass_rate"] == 0.5 and value == pytest.approx(1.0)  # 1 - 2 |0.5 - 0.5|
    with pytest.raises(ValueError):
        SolverDifficulty(samples=4, early_stop=5)


def test_the_reference_policy_solves_inside_a_grpo_step(tmp_path):
    """The default solver: the backbone with the adapter disabled, sampled in the main thread at prefetch time."""
    import lightning as L
    import torch

    from callbacks import RigorReward
    from qgen.data import QuestionDataModule
    from qgen.grpo import GRPOModule
    from qgen.models import LoraSpec

    L.seed_everything(0)
    module = GRPOModule(lora=LoraSpec(r=8, alpha=16, dropout=0.0), group_size=4, max_new_tokens=12)
    solver = SolverDifficulty(samples=2, early_stop=1, max_new_tokens=8)
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_steps=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        callbacks=[RigorReward(), solver])  # fmt: skip
    trainer.fit(module, QuestionDataModule(batch_size=2, max_length=256))
    for key in ("train/solver_pass_rate", "train/valid_frac", "train/reward_solver_difficulty_mean"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    # the policy solver itself: k samples per question from the reference, the adapter enabled again afterwards
    from callbacks.solver import PolicySolver
    from qgen.models import load_tokenizer

    module.tokenizer = load_tokenizer(None, padding_side="left")
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # an adapter that visibly changes the policy
    ids = torch.randint(5, 500, (1, 10))
    module.model.eval()
    with torch.no_grad():
        before = module.model(input_ids=ids).logits
    out = PolicySolver(module, max_new_tokens=6).solve(["What is 1+1?", "求 2+3。"], ["en", "zh"], 3)
    assert len(out) == 2 and all(len(x) == 3 and all(isinstance(t, str) for t in x) for x in out)
    with torch.no_grad():
        after = module.model(input_ids=ids).logits
        with module.model.disable_adapter():
            reference = module.model(input_ids=ids).logits
    torch.testing.assert_close(after, before)  # the adapter is back on after solving with the reference
    assert (reference - before).abs().max() > 1e-2


def test_the_in_process_solver_is_refused_on_a_merged_vllm_engine():
    """A merged engine holds no reference policy: refused in one line naming the setting, before any engine starts."""
    from types import SimpleNamespace

    from qgen.backends import BackendError
    from qgen.grpo import GRPOModule
    from qgen.models import LoraSpec

    module = GRPOModule(lora=LoraSpec(r=8), backend="vllm", vllm={"weight_sync": "merged"})
    trainer = SimpleNamespace(strategy=None, datamodule=None)
    with pytest.raises(BackendError, match="set model.vllm.weight_sync: adapter") as refused:
        SolverDifficulty().setup(trainer, module, "fit")
    assert "\n" not in str(refused.value)


def test_the_likely_wrong_count_is_summed_over_ranks_and_the_shares_averaged():
    """A count of questions is a sum over the ranks' questions; a share is their mean."""
    from types import SimpleNamespace

    logged = {}
    module = SimpleNamespace(log=lambda key, value, **kw: logged.update({key: kw}), last={}, hparams={})
    callback = SolverDifficulty()
    callback.stats = {"solver_pass_rate": 0.5, "valid_frac": 1.0, "likely_wrong_answers": 2.0}
    callback.on_train_batch_end(SimpleNamespace(accumulate_grad_batches=1, world_size=2), module, None, None, 0)
    assert logged["train/likely_wrong_answers"] == {"sync_dist": True, "reduce_fx": "sum"}
    assert logged["train/solver_pass_rate"]["reduce_fx"] == logged["train/valid_frac"]["reduce_fx"] == "mean"


# ---------------------------------------------------------------------------------------------- served solver
def _served(server, **kw):
    from callbacks import ServedSolverDifficulty

    callback = ServedSolverDifficulty(server.url, "solver-model", **{"timeout": 5.0, "max_retries": 0, **kw})
    callback.prior.predict = lambda q, a=None, s=None: [0.5] * len(q)
    return callback


def _score_served(callback, texts):
    callback.prefetch(texts)  # sent now, solved in the background
    total, out = combine_scores({"solver": callback}, texts, [None] * len(texts), [False] * len(texts))
    return out["solver"].values, callback.stats


def test_a_served_solver_asks_for_each_round_in_one_request_and_solves_a_question_once_per_step():
    from judge_server import JudgeServer

    with JudgeServer() as server:
        server.contents = ["Working... so the answer is 12.", "Working... so the answer is 13."]  # half agree
        callback = _served(server, samples=10, mode="learnability", round_size=2)
        callback.served.endpoint.connect(check=True)
        values, stats = _score_served(callback, [QUESTION, QUESTION])  # the same question twice: solved once
        callback.prefetch([QUESTION])  # and not again within the step
        bodies = [r["body"] for r in server.requests if r["path"].endswith("/chat/completions")]
        assert all(b["n"] == 2 and b["model"] == "solver-model" for b in bodies)
        assert 1 < len(bodies) <= 5 and stats["solver_samples"] == 2 * len(bodies)  # rounds until settled
        assert "Compute 3*4." in bodies[0]["messages"][0]["content"]
        assert values[0] == values[1] == pytest.approx(callback.rule.value(len(bodies), 2 * len(bodies)))
        assert stats["solver_pass_rate"] == 0.5 and stats["solver_failures"] == 0 and stats["solver_in_band"] == 1.0
        callback.teardown(None, None, "fit")


def test_a_slow_failing_or_absent_solver_never_holds_a_step_past_its_deadline(capsys):
    from judge_server import JudgeServer

    from callbacks.solver import SolverError

    with JudgeServer() as server:
        server.delay = 30.0  # never answers in time
        callback = _served(server, timeout=1.0, max_retries=0, max_consecutive_failures=2)
        started = time.monotonic()
        values, stats = _score_served(callback, [QUESTION])
        assert time.monotonic() - started < 1.0 + 2.0  # one attempt's deadline, not the server's 30 s
        assert values[0] == 0.0 and stats["valid_frac"] == 0.0 and stats["solver_failures"] == 1
        callback.teardown(None, None, "fit")
    with JudgeServer() as server:
        server.fail_first = 100  # HTTP 500 every time: retried, then the circuit breaker opens
        callback = _served(server, max_retries=1, max_consecutive_failures=2)
        callback.served.endpoint.backoff = 0.01
        for text in (QUESTION, QUESTION.replace("3*4", "5*6").replace("12", "30")):
            values, stats = _score_served(callback, [text])
        assert callback.served.endpoint.tripped and server.chat_requests() == 4  # 2 questions x 2 attempts
        values, stats = _score_served(callback, [QUESTION.replace("3*4", "2*2").replace("12", "4")])
        assert server.chat_requests() == 4 and values[0] == 0.0  # skipped: no more requests
        assert "circuit breaker opened after 2 failed requests in a row (last: HTTP 500)" in capsys.readouterr().err
        callback.teardown(None, None, "fit")
    closed = JudgeServer()  # never started: nothing listens
    with pytest.raises(SolverError, match=r"ServedSolver: cannot reach http://127\.0\.0\.1:\d+/v1"):
        _served(closed).served.endpoint.connect(check=True)
    closed.httpd.server_close()


def test_grpo_with_a_served_solver_logs_every_solver_tag(tmp_path):
    """2 GRPO steps whose completions are one fixed question (a scripted engine), a served solver answering half
    right: the question is solved once per step (the group repeats it), and every solver tag reaches TensorBoard:
    pass rate (and its histogram), share in the band, valid share, likely-wrong count, samples per question,
    failures and latency.
    """
    import lightning as L
    from conftest import scalars
    from helpers_ddp import _ScriptedBackend
    from judge_server import JudgeServer
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks import ServedSolverDifficulty
    from qgen.backends.rollout import Rollout
    from qgen.data import QuestionDataModule
    from qgen.grpo import GRPOModule
    from qgen.models import LoraSpec

    class FixedQuestion(_ScriptedBackend):
        def generate(self, model, tokenizer, prompts, group_size, max_new_tokens, *args, **kwargs):
            ids = tokenizer(QUESTION, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            return Rollout.from_completions(prompts, [ids] * (len(prompts) * group_size), group_size, tokenizer)

    class UseFixed(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            pl_module.use_backend(FixedQuestion())

    L.seed_everything(0)
    with JudgeServer() as server:
        server.contents = ["Working... so the answer is 12.", "Working... so the answer is 13."]
        solver = ServedSolverDifficulty(server.url, "solver-model", samples=10, timeout=5.0)
        module = GRPOModule(lora=LoraSpec(r=8, alpha=16, dropout=0.0), group_size=4, max_new_tokens=64)
        trainer = L.Trainer(default_root_dir=str(tmp_path), max_steps=2, accelerator="cpu", log_every_n_steps=1,
                            logger=TensorBoardLogger(str(tmp_path), name="", version=0), enable_checkpointing=False,
                            enable_progress_bar=False, limit_val_batches=0, callbacks=[UseFixed(), solver])  # fmt: skip
        trainer.fit(module, QuestionDataModule(batch_size=2, max_length=256))
        per_step = server.chat_requests() / 2
    run = tmp_path / "version_0"
    for tag in ("solver_pass_rate", "solver_in_band", "valid_frac", "likely_wrong_answers", "solver_samples",
                "solver_failures", "solver_latency_s"):  # fmt: skip
        assert sorted(scalars(run, f"train/{tag}")) == [0, 1], tag
    assert scalars(run, "train/solver_pass_rate") == {0: 0.5, 1: 0.5}
    assert set(scalars(run, "train/solver_samples").values()) == {2 * per_step}  # one question's rounds a step
    acc = EventAccumulator(str(run), size_guidance={"histograms": 0})
    acc.Reload()
    assert "train/solver_pass_rates" in acc.Tags()["histograms"]


# ---------------------------------------------------------------------------------------------- pseudo-labels
NO_ANSWER = "Question: Compute 3*4.\nSolution: 3*4 = 12, so the answer is 12."
CONTRADICTED = "Question: Compute 3*4.\nAnswer: 12\nSolution: 3*4 = 12, so the answer is 13."


def _score_text(callback, solver, text):
    callback.solver = solver
    callback.prior.predict = lambda q, a=None, s=None: [0.5] * len(q)
    total, out = combine_scores({"solver": callback}, [text], [None], [False])
    return float(out["solver"].values[0]), callback.stats, callback._solved[text]


def test_without_a_usable_stated_answer_the_solvers_majority_is_the_label():
    # no stated answer: 3 of 4 samples say 12 -> label 12, share 0.75, band 1 - 2 |0.75 - 0.5| = 0.5
    value, stats, solved = _score_text(SolverDifficulty(samples=4, early_stop=4, mode="band"),
                                       ScriptedSolver(["12", "12", "13", "12"]), NO_ANSWER)  # fmt: skip
    assert (solved.pseudo_label, solved.share, solved.agree, solved.n) == ("12", 0.75, 3, 4)
    assert value == pytest.approx(0.5) and stats["pseudo_labelled"] == 1 and stats["solver_pass_rate"] == 0.75
    # a stated 12 its own solution contradicts (it ends on 13): the majority 13 (2 of 4 with one blank) is the label
    value, stats, solved = _score_text(SolverDifficulty(samples=4, early_stop=4, mode="learnability"),
                                       ScriptedSolver(["13", "12", "13", ""]), CONTRADICTED)  # fmt: skip
    assert (solved.pseudo_label, solved.agree) == ("13", 2) and value == pytest.approx(4 * 0.5 * 0.5)
    assert not solved.likely_wrong  # measured against its own label, not the stated one
    # switched off: the question has nothing to be solved against, no solver call
    solver = ScriptedSolver()
    callback = SolverDifficulty(pseudo_labels=False)
    callback.solver = solver
    callback.prior.predict = lambda q, a=None, s=None: [0.5] * len(q)
    _, out = combine_scores({"solver": callback}, [NO_ANSWER], [None], [False])
    assert solver.calls == [] and float(out["solver"].values[0]) == 0.0 and callback.stats["pseudo_labelled"] == 0


def test_gated_scores_a_contradicted_stated_answer_zero():
    rounds = ["13", "13", "13", "12"]  # the majority (3 of 4) says 13 against the stated 12
    value, stats, solved = _score_text(SolverDifficulty(samples=4, early_stop=4, mode="band"),
                                       ScriptedSolver(rounds), QUESTION)  # fmt: skip
    assert solved.likely_wrong and solved.pseudo_label is None and value == pytest.approx(0.5)  # p = 1/4
    value, stats, _ = _score_text(SolverDifficulty(samples=4, early_stop=4, mode="band", gated=True),
                                  ScriptedSolver(rounds), QUESTION)  # fmt: skip
    assert value == 0.0 and stats["likely_wrong_answers"] == 1
