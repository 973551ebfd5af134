"""SolverDifficulty with a scripted solver: pass rate, validity, early stop, the two reward modes."""

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
