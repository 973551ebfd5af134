"""The GRPO step's rollout buffer: one generation for all micro-batches, step-level normalisers, ranks."""

import os
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

from qgen.backends.rollout import Rollout, concat_rollouts
from qgen.losses import gathered_std, grpo_loss
from qgen.rollouts import StepRollouts
from qgen.scoring import RewardOutput


def fake_rollout(prompts, g, lengths, width=5):
    """``g`` completions per prompt; completion i has ``lengths[i]`` tokens (EOS included), pad 0, EOS 9."""
    n = len(prompts) * g
    p = max(len(x) for x in prompts)
    seq = torch.zeros(n, p + width, dtype=torch.long)
    mask = torch.zeros(n, p + width, dtype=torch.long)
    comp, cmask = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width, dtype=torch.long)
    for row in range(n):
        prompt = prompts[row // g]
        seq[row, p - len(prompt) : p] = torch.tensor(prompt)
        mask[row, p - len(prompt) : p] = 1
        k = lengths[row]
        comp[row, :k] = 5
        comp[row, k - 1] = 9
        cmask[row, :k] = 1
    seq[:, p:] = comp
    mask[:, p:] = cmask
    return Rollout(seq, mask, p, comp, cmask, torch.zeros(n, dtype=torch.bool), [f"q{i}" for i in range(n)], g)


def test_one_generation_per_step_and_step_level_token_normaliser():
    g, calls = 2, []
    lengths = [1, 2, 3, 4, 5, 1, 2, 3]  # 4 prompts x 2: micro-batch 0 holds 1+2+3+4 = 10 tokens, micro 1 holds 11

    def generate(prompts):
        calls.append(prompts)
        yield fake_rollout(prompts, g, lengths)

    scored = []

    def score(rollout, records):
        scored.append(records)
        table = {"a": [0.0, 1.0], "b": [2.0, 2.0], "c": [1.0, 3.0], "d": [0.5, 0.5]}
        rewards = torch.tensor([v for r in records[::g] for v in table[r]])
        first = 0 if records[0] == "a" else 4
        assert rollout.texts == [f"q{i}" for i in range(first, first + 4)]  # the micro-batch's own rows
        return rewards, {"r": RewardOutput(rewards.numpy())}

    prompts = [[[1, 2], [3]], [[4, 5, 6], [7]]]
    step = StepRollouts("k", prompts, [["a", "b"], ["c", "d"]], 0, g, score, "no_std", micro_batches=2)
    assert calls == [] and step.rollouts == []  # constructing it generates nothing
    step.generate_and_score(generate)
    assert len(calls) == 1 and len(calls[0]) == 4  # the whole step in one call
    step.micro(1)
    assert scored == [["a", "a", "b", "b"], ["c", "c", "d", "d"]]  # scored one micro-batch at a time, in order
    assert step.step_tokens == 21 and step.token_normalizer == 21 / 2
    m0, m1 = step.micro(0), step.micro(1)
    assert_close(m0.advantages, torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    assert_close(m1.advantages, torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert m1.components["r"].values.tolist() == [1.0, 3.0, 0.5, 0.5]
    # each micro-batch's rollout keeps only the padding it needs
    r0, r1 = step.rollout_of(0), step.rollout_of(1)
    assert r0.prompt_length == 2 and r1.prompt_length == 3
    assert r0.completion_ids.size(1) == 4 and r1.completion_ids.size(1) == 5
    assert r0.completion_mask.sum() == 10 and r1.completion_mask.sum() == 11
    # DAPO over the two micro-batches = the token mean over the whole step
    logp = [torch.randn(r.completion_ids.shape, generator=torch.Generator().manual_seed(i)) * 0.1
            for i, r in enumerate((r0, r1))]  # fmt: skip
    parts = [grpo_loss(lp, lp.detach() - 0.05, m.advantages, r.completion_mask, aggregation="dapo",
                       token_normalizer=step.token_normalizer).loss for lp, m, r in zip(logp, (m0, m1), (r0, r1))]  # fmt: skip
    width = 5
    whole_logp = torch.cat([torch.nn.functional.pad(lp, (0, width - lp.size(1))) for lp in logp])
    whole_mask = torch.cat([torch.nn.functional.pad(r.completion_mask, (0, width - r.completion_mask.size(1)))
                            for r in (r0, r1)])  # fmt: skip
    whole = grpo_loss(whole_logp, whole_logp - 0.05, torch.cat([m0.advantages, m1.advantages]), whole_mask,
                      aggregation="dapo").loss
    assert_close((parts[0] + parts[1]) / 2, whole)


def test_scoring_runs_in_the_background_and_errors_surface_at_the_join():
    def score(rollout, records):
        raise RuntimeError("judge down")

    step = StepRollouts("k", [[[1]]], [["a"]], 0, 2, score, "group_std", 1)
    step.generate_and_score(lambda p: [fake_rollout(p, 2, [1, 2])])
    step.rollout_of(0)  # available before the scores
    with pytest.raises(RuntimeError, match="judge down"):
        step.micro(0)


def test_concat_rollouts_repads_prompts_and_completions():
    a, b = fake_rollout([[1, 2, 3]], 2, [1, 2], width=2), fake_rollout([[4]], 2, [3, 1], width=3)
    both = concat_rollouts([a, b], pad_id=0)
    assert both.prompt_length == 3 and both.completion_ids.size(1) == 3
    assert both.sequences[2].tolist() == [0, 0, 4, 5, 5, 9] and both.attention_mask[2].tolist() == [0, 0, 1, 1, 1, 1]
    assert both.select(2, 4).sequences[0].tolist() == [4, 5, 5, 9]


def _two_ranks(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rewards = [torch.tensor([[0.0, 1.0], [2.0, 2.0]]), torch.tensor([[5.0, 7.0], [1.0, 1.0]])][rank]
        std = gathered_std(rewards)
        lengths = [[1, 2, 3, 4], [5, 5, 1, 1]][rank]
        step = StepRollouts("k", [[[1], [2]]], [["a", "b"]], 0, 2, lambda r, rec: (torch.zeros(4), {}), "group_std",
                            micro_batches=1, world_size=world)  # fmt: skip
        step.generate_and_score(lambda p: [fake_rollout(p, 2, lengths)])
        torch.save({"std": std, "tokens": step.step_tokens, "norm": step.token_normalizer}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batch_std_and_step_tokens_are_gathered_over_two_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    everything = torch.tensor([0.0, 1.0, 2.0, 2.0, 5.0, 7.0, 1.0, 1.0])
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=True)
        assert_close(got["std"], everything.std())  # not the rank's own std
        assert got["tokens"] == 22 and got["norm"] == 22 / 2


def test_chunks_are_scored_as_they_are_generated_and_joined_in_order():
    """Generation in chunks of one prompt: chunk k is scored before chunk k+1 is generated (scoring overlaps
    generation), and the joined rewards and components are in prompt order.
    """
    import threading

    events, scored = [], threading.Event()

    def generate(prompts):
        for i, p in enumerate(prompts):
            events.append(f"gen{i}")
            yield fake_rollout([p], 2, [1 + i, 2])
            assert scored.wait(5)  # the background thread scores chunk i meanwhile
            scored.clear()

    def score(rollout, records):
        events.append(f"score{records[0]}")
        scored.set()
        values = torch.tensor([float(ord(records[0])), 0.0])
        return values, {"r": RewardOutput(values.numpy(), np.array([1.0, 0.5], np.float32))}

    step = StepRollouts("k", [[[1], [2]], [[3]]], [["a", "b"], ["c"]], 0, 2, score, "no_std", 2)
    step.generate_and_score(generate)
    assert events == ["gen0", "scorea", "gen1", "scoreb", "gen2", "scorec"]
    assert step.micro(0).rewards.tolist() == [97.0, 0.0, 98.0, 0.0]
    assert step.micro(1).components["r"].factor.tolist() == [1.0, 0.5]
    assert step.step_tokens == (1 + 2) + (2 + 2) + (3 + 2)


def test_a_micro_batch_waits_for_its_own_scores_not_the_whole_steps():
    """The whole step generated in one call (the default), micro-batch 1's scoring held back (a judge's second
    wave of answers): micro-batch 0 gets its rewards without waiting for it.
    """
    import threading

    release = threading.Event()

    def score(rollout, records):
        if records[0] == "c":
            assert release.wait(10)
        values = torch.tensor([float(ord(r)) for r in records])
        return values, {"r": RewardOutput(values.numpy())}

    generate = lambda prompts: [fake_rollout(prompts, 2, [1, 2, 3, 4, 5, 2])]  # noqa: E731
    step = StepRollouts("k", [[[1], [2]], [[3]]], [["a", "b"], ["c"]], 0, 2, score, "no_std", 2)
    step.generate_and_score(generate)
    started = time.perf_counter()
    assert step.micro(0).rewards.tolist() == [97.0, 97.0, 98.0, 98.0]
    assert time.perf_counter() - started < 5 and not step.ready(1)
    release.set()
    assert step.micro(1).rewards.tolist() == [99.0, 99.0]
    assert step.micro(1).rollout.texts == ["q4", "q5"]


def test_normalize_then_sum_lets_a_narrow_component_count_by_its_weight():
    """Group of 4; component a spreads 0..3, component b 0..0.03 in the opposite order, equal weights.
    sum_then_normalize: the advantage follows a. normalize_then_sum: each is standardised first, so they cancel.
    """
    a = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    b = np.array([0.03, 0.02, 0.01, 0.0], np.float32)

    def score(rollout, records):
        return torch.as_tensor(0.5 * a + 0.5 * b), {"a": RewardOutput(a), "b": RewardOutput(b)}

    def make(aggregation):
        return StepRollouts("k", [[[1]]], [["r"]], 0, 4, score, "group_std", 1, reward_aggregation=aggregation,
                            weights={"a": 0.5, "b": 0.5}).generate_and_score(lambda p: [fake_rollout(p, 4, [1, 1, 1, 1])])  # fmt: skip

    plain = make("sum_then_normalize").micro(0).advantages
    assert plain[3] > plain[0] + 1.0
    # (not exactly 0: the eps of 1e-4 in the std weighs on the narrow component's 0.013 std by 0.8%)
    assert_close(make("normalize_then_sum").micro(0).advantages, torch.zeros(4), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="reward_aggregation"):
        make("mean")
