"""Reward callbacks outside a trainer: the novelty reward is stationary, the repetition bank grows per step."""

from types import SimpleNamespace

import numpy as np
import pytest

from callbacks import NoveltyReward, RepetitionReward
from qgen.scoring import NoveltyIndex, combine_scores

KNOWN = [
    "Find all real x such that x^2 - 5x + 6 = 0.",
    "How many positive divisors does 360 have?",
    "A circle has radius 3. Find its area.",
    "已知函数 f(x) = x^3 - 3x，求 f(x) 的单调区间。",
]
NEW = "A fair die is rolled twice. What is the probability that the sum is 7?"
OTHER = "Let ABC be a triangle with AB = AC. Prove that the angles at B and C are equal."


def _module(outputs):
    logged = {}
    return SimpleNamespace(last={"components": outputs}, hparams={"group_size": 1}, score_prefix="reward",
                           log=lambda name, value, **kw: logged.__setitem__(name, value), logged=logged)  # fmt: skip


def _trainer(accumulate=1):
    progress = SimpleNamespace(is_last_batch=False)
    return SimpleNamespace(accumulate_grad_batches=accumulate, world_size=1,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))  # fmt: skip


def _score(callback, texts):
    return combine_scores({callback.name: callback}, texts, [None] * len(texts), [False] * len(texts))


def _step(callback, texts, batch_idx=0, trainer=None):
    """One training micro-batch: score, then the callback's end-of-batch hook (where banks may grow)."""
    _, outputs = _score(callback, texts)
    callback.on_train_batch_end(trainer or _trainer(), _module(outputs), None, None, batch_idx)
    return outputs[callback.name]


def _built(cls, **kw):
    callback = cls(**kw)
    callback.known = list(KNOWN)
    callback._build()
    return callback


def test_novelty_is_stationary_and_penalises_known_near_copies():
    novelty = _built(NoveltyReward, penalty=0.5)
    first = _step(novelty, [NEW, KNOWN[1], OTHER])
    for i in range(3):  # the run writes the same questions again and again: novelty does not change
        _step(novelty, [NEW, OTHER], batch_idx=i)
    again = _step(novelty, [NEW, KNOWN[1], OTHER])
    np.testing.assert_array_equal(first.values, again.values)
    assert first.values[1] == pytest.approx(0.0, abs=1e-5)  # a known question: similarity 1
    assert first.values[0] > 0.6 and first.values[2] > 0.6
    np.testing.assert_array_equal(first.factor, [1.0, 0.5, 1.0])  # the penalty: only the known near-copy


def test_repetition_grows_once_per_optimizer_step_and_penalises_the_runs_own_questions():
    repetition = _built(RepetitionReward, penalty=0.5)
    fresh = _step(repetition, [NEW], batch_idx=0, trainer=_trainer(accumulate=2))
    assert fresh.values[0] == pytest.approx(1.0) and fresh.factor[0] == 1.0  # the bank starts empty
    assert repetition.accepted == []  # mid-step: every micro-batch of a step sees the same bank
    same_step = _step(repetition, [NEW], batch_idx=1, trainer=_trainer(accumulate=2))
    assert same_step.values[0] == pytest.approx(1.0)
    assert repetition.accepted == [NEW, NEW]  # the step is done: both micro-batches' questions join
    later = _step(repetition, [NEW, OTHER, KNOWN[0]])
    assert later.values[0] == pytest.approx(0.0, abs=1e-5) and later.factor[0] == 0.5
    assert later.values[1] > 0.6 and later.factor[1] == 1.0
    assert later.values[2] > 0.6 and later.factor[2] == 1.0  # a known question: novelty's job, not repetition's
    # near-copies of the bank are not added again; the others are
    assert repetition.accepted == [NEW, NEW, OTHER, KNOWN[0]]


def test_repetition_state_round_trips_and_rebuilds_the_bank():
    repetition = _built(RepetitionReward)
    _step(repetition, [NEW])
    restored = _built(RepetitionReward)
    restored.load_state_dict(repetition.state_dict())
    assert restored.accepted == [NEW]
    assert _score(restored, [NEW])[1]["repetition"].values[0] == pytest.approx(0.0, abs=1e-5)


def test_an_index_fitted_without_keeping_its_bank_starts_empty():
    index = NoveltyIndex(KNOWN, keep_bank=False)
    assert len(index) == 0
    assert index.max_similarity([KNOWN[0]])[0] == 0.0
    sims, near = index.near_copy_similarity([KNOWN[0]], 0.85)
    assert not near[0] and sims[0] == 0.0
    index.add([KNOWN[0]])
    sims, near = index.near_copy_similarity([KNOWN[0]], 0.85)
    assert near[0] and sims[0] == pytest.approx(1.0, abs=1e-5)
