"""GRPO maths as readable arithmetic, and against a naive per-sample loop."""

import math

import pytest
import torch
from torch.testing import assert_close

from qgen.losses import group_advantages, grpo_loss, token_logprobs, truncated_importance_weights


def test_group_advantages_hand_computed():
    """Group [1, 2, 3]: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + eps). Group [5, 5, 5]: std 0 -> 0."""
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    assert_close(group_advantages(rewards, "group_std", eps=0.0), torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert_close(group_advantages(rewards, "no_std"), torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert_close(group_advantages(torch.tensor([[0.0, 0.0, 3.0]]), "median"), torch.tensor([[0.0, 0.0, 3.0]]))
    # an even group: the median is the mean of the two middle values, so half the group gets negative signal
    even = group_advantages(torch.tensor([[0.0, 0, 0, 0, 1, 1, 1, 1]]), "median")
    assert_close(even, torch.tensor([[-0.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.5]]))
    assert_close(group_advantages(torch.tensor([[1.0, 4.0, 2.0, 10.0]]), "median"), torch.tensor([[-2.0, 1.0, -1.0, 7.0]]))
    # batch std of [1, 2, 3, 5, 5, 5] (unbiased) = sqrt(3.1) = 1.76068
    assert_close(
        group_advantages(rewards, "batch_std", eps=0.0),
        torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) / math.sqrt(3.1),
    )
    with pytest.raises(ValueError, match="advantage mode"):
        group_advantages(rewards, "zscore")


def test_grpo_loss_hand_computed_with_clipping():
    """Two sequences of two tokens, eps 0.2.

    Row 0, A = +1: ratios e^0.5 = 1.6487 (clipped to 1.2: -1.2) and e^0 = 1 (-1.0) -> mean -1.1.
    Row 1, A = -1, one token (second masked): ratio e^-0.5 = 0.6065 (< 0.8 and A < 0: the clipped term
    0.8 * -1 is the min, so the loss is +0.8) -> 0.8.
    grpo: (-1.1 + 0.8) / 2 = -0.15. dapo: (-1.2 - 1.0 + 0.8) / 3 = -0.46667. dr_grpo: -1.4 / (2 * 4) = -0.175.
    Clipped tokens: row 0 token 0 and row 1 token 0 -> 2 of 3.
    """
    logp = torch.tensor([[0.5, 0.0], [-0.5, 0.3]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = grpo_loss(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, aggregation="grpo")
    assert_close(out.loss, torch.tensor(-0.15))
    assert_close(out.clipfrac, torch.tensor(2 / 3))
    assert_close(grpo_loss(logp, old, adv, mask, aggregation="dapo").loss, torch.tensor(-1.4 / 3))
    assert_close(
        grpo_loss(logp, old, adv, mask, aggregation="dr_grpo", max_completion_length=4).loss, torch.tensor(-0.175)
    )


def test_k3_kl_hand_computed():
    """Logp = 0, ref = ln 2: delta = ln 2, KL3 = e^{ln 2} - ln 2 - 1 = 1 - ln 2 = 0.30685; with A = 0 and
    beta = 0.5 the loss is 0.5 * 0.30685.
    """
    logp, ref = torch.zeros(1, 1), torch.full((1, 1), math.log(2))
    out = grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), ref_logp=ref, beta=0.5)
    assert_close(out.kl, torch.tensor(1 - math.log(2)))
    assert_close(out.loss, torch.tensor(0.5 * (1 - math.log(2))))


def test_truncated_importance_weights_hand_computed():
    """Trainer vs engine log-probs of 4 tokens (the last masked), cap C = 2:

    deltas 0.1, -0.5, ln 3 -> ratios e^0.1 = 1.10517, e^-0.5 = 0.60653, 3 (capped to 2); masked -> 0.
    absdiff mean (0.1 + 0.5 + 1.09861) / 3 = 0.56620, max ln 3 = 1.09861; ratio mean before the cap
    (1.10517 + 0.60653 + 3) / 3 = 1.57057; clipped 1 of 3.
    """
    trainer = torch.tensor([[0.1, -1.0], [math.log(3) - 2.0, 5.0]])
    engine = torch.tensor([[0.0, -0.5], [-2.0, -7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    weights, stats = truncated_importance_weights(trainer, engine, mask, cap=2.0)
    assert_close(weights, torch.tensor([[math.exp(0.1), math.exp(-0.5)], [2.0, 0.0]]))
    assert_close(stats["engine_logprob_absdiff_mean"], torch.tensor((0.1 + 0.5 + math.log(3)) / 3))
    assert_close(stats["engine_logprob_absdiff_max"], torch.tensor(math.log(3)))
    assert_close(stats["is_ratio_mean"], torch.tensor((math.exp(0.1) + math.exp(-0.5) + 3) / 3))
    assert_close(stats["is_clipped_frac"], torch.tensor(1 / 3))


def test_importance_weights_scale_the_policy_gradient_not_the_kl():
    """One sequence of two tokens, A = 1, ratio 1 (old = logp), IS weights (0.5, 2), beta 0.1 with ref = logp
    (KL 0, gradient of KL 0): the grpo loss is -(0.5 + 2) / 2 = -1.25 and d loss / d logp = (-0.25, -1.0).
    With ref = logp + ln 2 the KL term (1 - ln 2 per token, gradient -beta (e^{ln 2} - 1) / 2 = -0.05) is not
    weighted.
    """
    logp = torch.zeros(1, 2, requires_grad=True)
    w = torch.tensor([[0.5, 2.0]])
    out = grpo_loss(logp, logp.detach(), torch.ones(1), torch.ones(1, 2), logp.detach(), 0.1, is_weights=w)
    out.loss.backward()
    assert_close(out.loss, torch.tensor(-1.25))
    assert_close(logp.grad, torch.tensor([[-0.25, -1.0]]))
    logp.grad = None
    ref = torch.full((1, 2), math.log(2))
    out = grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), ref, 0.1, is_weights=w)
    out.loss.backward()
    assert_close(out.loss, torch.tensor(0.1 * (1 - math.log(2))))
    assert_close(logp.grad, torch.tensor([[-0.05, -0.05]]))


def naive_grpo(logp, old, adv, mask, ref, beta, el, eh):
    per_seq = []
    for i in range(logp.size(0)):
        terms = []
        for t in range(logp.size(1)):
            if mask[i, t]:
                r = math.exp(logp[i, t] - old[i, t])
                a = float(adv[i])
                pg = -min(r * a, min(max(r, 1 - el), 1 + eh) * a)
                d = float(ref[i, t] - logp[i, t])
                terms.append(pg + beta * (math.exp(d) - d - 1))
        per_seq.append(sum(terms) / len(terms) if terms else 0.0)
    return sum(per_seq) / len(per_seq)


def test_grpo_loss_matches_naive_loop_and_gradients_flow():
    torch.manual_seed(0)
    logp = (torch.randn(6, 5) * 0.3).requires_grad_()
    old, ref = logp.detach() + torch.randn(6, 5) * 0.3, logp.detach() + torch.randn(6, 5) * 0.1
    adv, mask = torch.randn(6), (torch.rand(6, 5) > 0.3).long()
    out = grpo_loss(logp, old, adv, mask, ref, beta=0.04, epsilon_low=0.2, epsilon_high=0.28)
    assert out.loss.item() == pytest.approx(naive_grpo(logp.detach(), old, adv, mask, ref, 0.04, 0.2, 0.28), abs=1e-5)
    out.loss.backward()
    assert torch.count_nonzero(logp.grad[mask == 0]) == 0 and torch.count_nonzero(logp.grad) > 0


def test_all_masked_and_zero_advantage():
    logp = torch.randn(3, 4, requires_grad=True)
    for agg in ("grpo", "dapo", "dr_grpo"):
        out = grpo_loss(logp, logp.detach(), torch.randn(3), torch.zeros(3, 4), aggregation=agg)
        assert out.loss.item() == 0.0 and not torch.isnan(out.loss)
    out = grpo_loss(logp, logp.detach(), torch.zeros(3), torch.ones(3, 4))  # one update per rollout, A = 0
    assert out.loss.item() == 0.0 and out.clipfrac.item() == 0.0


def test_token_logprobs_match_log_softmax():
    torch.manual_seed(1)
    hidden, head = torch.randn(2, 5, 4), torch.randn(9, 4)
    targets = torch.randint(0, 9, (2, 5))
    ref = torch.log_softmax(hidden @ head.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    for chunk in (1, 3, 100):
        assert_close(token_logprobs(hidden, head, targets, chunk), ref)


def test_token_logprobs_score_the_tempered_distribution():
    """At temperature T the sampled token's log-prob is log_softmax(logits / T), not of the plain logits."""
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(2, 3, 4, generator=g), torch.randn(7, 4, generator=g)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    logits = hidden @ head.T
    for t in (0.7, 1.0, 1.5):
        want = torch.log_softmax(logits / t, -1).gather(-1, targets[..., None]).squeeze(-1)
        assert_close(token_logprobs(hidden, head, targets, chunk_size=4, temperature=t), want)
    plain = token_logprobs(hidden, head, targets)
    assert (token_logprobs(hidden, head, targets, temperature=0.7) - plain).abs().max() > 1e-2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_gradients_equal_full_log_softmax(temperature):
    """The block-wise forward and the in-place backward give the gradients of the plain log-softmax,
    for the hidden states and the output embedding, over several blocks (chunk 3 of 10 rows).
    """
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)
    want = torch.log_softmax(hidden @ head.T / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
    got = token_logprobs(hidden, head, targets, chunk_size=3, temperature=temperature)
    assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    grads_want = torch.autograd.grad((want * weights).sum(), (hidden, head))
    grads_got = torch.autograd.grad((got.double() * weights).sum(), (hidden, head))
    for a, b in zip(grads_got, grads_want):
        assert_close(a.double(), b, atol=1e-6, rtol=1e-6)
    # a frozen output embedding (LoRA): only the hidden states get a gradient
    frozen = head.detach()
    got = token_logprobs(hidden, frozen, targets, chunk_size=4, temperature=temperature)
    (grad_h,) = torch.autograd.grad((got.double() * weights).sum(), (hidden,))
    assert_close(grad_h, grads_want[0], atol=1e-6, rtol=1e-6)


def test_token_logprobs_blocks_stay_under_the_byte_budget(monkeypatch):
    import qgen.losses as losses

    assert losses._block_rows(1024, 151_936) == losses.LOGIT_BLOCK_BYTES // (4 * 151_936) == 110
    assert losses._block_rows(1024, 4096) == 1024
    monkeypatch.setattr(losses, "LOGIT_BLOCK_BYTES", 4 * 9 * 2)  # two rows of a 9-token vocabulary
    torch.manual_seed(1)
    hidden, head = torch.randn(2, 5, 4), torch.randn(9, 4)
    targets = torch.randint(0, 9, (2, 5))
    ref = torch.log_softmax(hidden @ head.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert_close(token_logprobs(hidden, head, targets, chunk_size=100), ref)


def test_dapo_token_mean_over_two_micro_batches_equals_one_big_batch():
    """Micro-batches of 5 and 2 tokens: DAPO's step token mean is sum / 7 over both, not the mean of the two
    per-micro-batch means. With token_normalizer = 7 / 2 (two micro-batches) and the trainer's division by
    the accumulation count, the accumulated loss equals the one-batch loss.
    """
    g = torch.Generator().manual_seed(1)
    logp, adv = torch.randn(4, 3, generator=g) * 0.1, torch.tensor([1.0, -0.5, 2.0, -1.0])
    old = logp + 0.05 * torch.randn(4, 3, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 0]])
    whole = grpo_loss(logp, old, adv, mask, aggregation="dapo").loss
    halves = [grpo_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], aggregation="dapo",
                        token_normalizer=7 / 2).loss for i in (0, 2)]  # fmt: skip
    assert_close((halves[0] + halves[1]) / 2, whole)
    per_micro = [grpo_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], aggregation="dapo").loss
                 for i in (0, 2)]  # fmt: skip
    assert abs(((per_micro[0] + per_micro[1]) / 2 - whole).item()) > 1e-3  # the old per-micro-batch mean differs
