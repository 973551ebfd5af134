"""The distillation loss against hand-computed values: beta = 0 / 1 / 0.5, temperature, masking, weights, vocab slicing."""

import math

import pytest
import torch

from qgen.losses import distill_loss, generalized_jsd

# teacher logits [0, 0] -> p = (1/2, 1/2); student logits [0, ln 2] -> q = (1/3, 2/3)
P, Q = (0.5, 0.5), (1 / 3, 2 / 3)
TEACHER, STUDENT = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def test_beta_zero_is_forward_kl():
    # KL(p || q) = 1/2 ln(3/2) + 1/2 ln(3/4) = 0.0588915...
    assert kl(P, Q) == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    assert generalized_jsd(STUDENT, TEACHER, beta=0.0).item() == pytest.approx(0.0588915, abs=1e-6)


def test_beta_one_is_reverse_kl():
    # KL(q || p) = 1/3 ln(2/3) + 2/3 ln(4/3) = 0.0566330...
    assert generalized_jsd(STUDENT, TEACHER, beta=1.0).item() == pytest.approx(0.0566330, abs=1e-6)
    assert generalized_jsd(STUDENT, TEACHER, beta=1.0).item() == pytest.approx(kl(Q, P), abs=1e-6)


def test_beta_half_is_the_jensen_shannon_divergence():
    m = tuple(0.5 * a + 0.5 * b for a, b in zip(P, Q))  # (5/12, 7/12)
    expected = 0.5 * kl(P, m) + 0.5 * kl(Q, m)  # 0.0143626...
    assert expected == pytest.approx(0.0143626, abs=1e-6)
    assert generalized_jsd(STUDENT, TEACHER, beta=0.5).item() == pytest.approx(expected, abs=1e-6)
    # beta weights the mixture towards the teacher: m = 0.9 p + 0.1 q
    m9 = tuple(0.9 * a + 0.1 * b for a, b in zip(P, Q))
    assert generalized_jsd(STUDENT, TEACHER, beta=0.9).item() == pytest.approx(0.9 * kl(P, m9) + 0.1 * kl(Q, m9), abs=1e-7)


def test_temperature_divides_both_sides():
    # student [0, 2 ln 2] / 2 = [0, ln 2] -> q as above; teacher [0, 2 ln 3] / 2 = [0, ln 3] -> p = (1/4, 3/4)
    student, teacher = torch.tensor([[0.0, 2 * math.log(2.0)]]), torch.tensor([[0.0, 2 * math.log(3.0)]])
    p = (0.25, 0.75)
    assert generalized_jsd(student, teacher, beta=0.0, temperature=2.0).item() == pytest.approx(kl(p, Q), abs=1e-6)
    assert generalized_jsd(student, teacher, beta=1.0, temperature=2.0).item() == pytest.approx(kl(Q, p), abs=1e-6)
    # at temperature 1 the same logits give other values, so the temperature is really applied
    assert abs(generalized_jsd(student, teacher, beta=0.0).item() - kl(p, Q)) > 1e-3


def test_identical_distributions_give_zero_and_bad_arguments_fail():
    logits = torch.randn(4, 7)
    for beta in (0.0, 0.3, 1.0):
        assert generalized_jsd(logits, logits, beta).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logits, logits, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(logits, logits, temperature=0.0)


def _setup(seed=0, b=3, t=6, h=8, v=11, vt=None):
    g = torch.Generator().manual_seed(seed)
    sh, th = torch.randn(b, t, h, generator=g), torch.randn(b, t, h + 2, generator=g)
    sw, tw = torch.randn(v, h, generator=g), torch.randn(vt or v, h + 2, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.4).long()
    mask[0, 0] = 1
    return sh, sw, th, tw, mask


def test_distill_loss_is_the_weighted_sum_over_the_token_count_on_masked_positions_only():
    sh, sw, th, tw, mask = _setup()
    weights = torch.tensor([1.0, 0.5, 0.0])
    out = distill_loss(sh, sw, th, tw, mask, weights, beta=0.3, temperature=1.5, chunk_size=4)
    per_token = generalized_jsd(sh @ sw.T, th @ tw.T, 0.3, 1.5)  # [B, T]
    w = weights[:, None] * mask
    # the weights scale the sum; the divisor is the (unweighted) number of target tokens
    assert out.loss.item() == pytest.approx((per_token * w).sum().item() / mask.sum().item(), rel=1e-5)
    assert out.tokens.item() == mask.sum().item()
    assert out.divergence_sum.item() == pytest.approx((per_token * mask).sum().item(), rel=1e-5)
    # masked positions do not matter at all
    sh2, th2 = sh.clone(), th.clone()
    sh2[mask == 0], th2[mask == 0] = 100.0, -100.0
    again = distill_loss(sh2, sw, th2, tw, mask, weights, beta=0.3, temperature=1.5, chunk_size=4)
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    # every weight 0: loss 0, no NaN
    zero = distill_loss(sh, sw, th, tw, mask, torch.zeros(3), beta=0.3)
    assert zero.loss.item() == 0.0


def test_a_larger_teacher_vocabulary_is_sliced_and_a_smaller_one_rejected():
    sh, sw, th, tw, mask = _setup(v=11)
    padded = torch.cat([tw, 50.0 * torch.ones(5, tw.size(1))])  # 5 extra rows that would dominate the softmax
    exact = distill_loss(sh, sw, th, tw, mask, beta=0.0)
    sliced = distill_loss(sh, sw, th, padded, mask, beta=0.0)
    assert sliced.loss.item() == pytest.approx(exact.loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="smaller than the student"):
        distill_loss(sh, sw, th, tw[:8], mask)


def test_chunked_gradient_equals_the_plain_computation():
    sh, sw, th, tw, mask = _setup(seed=3)
    grads = []
    for chunk in (3, 10_000):
        s = sh.clone().requires_grad_(True)
        distill_loss(s, sw, th, tw, mask, beta=0.5, chunk_size=chunk).loss.backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0][mask == 0].abs().max() == 0


def test_judge_weight_of_a_lone_sequence_does_not_cancel_out():
    """One sequence per micro-batch (configs/qwen3-distill.yaml): a sequence judged 0.05 must train 20x less
    than the same sequence judged 1.0, in loss and gradient (dividing by the sum of the weights made them equal).
    """
    sh, sw, th, tw, mask = _setup(seed=5, b=1)
    grads = {}
    for w in (1.0, 0.05):
        s = sh.clone().requires_grad_(True)
        out = distill_loss(s, sw, th, tw, mask, torch.tensor([w]), beta=0.5)
        out.loss.backward()
        grads[w] = (out.loss.item(), s.grad.norm().item())
    assert grads[0.05][0] == pytest.approx(0.05 * grads[1.0][0], rel=1e-5)
    assert grads[0.05][1] == pytest.approx(0.05 * grads[1.0][1], rel=1e-5)
    # a given normaliser (e.g. the step's token count) replaces the micro-batch token count
    n = mask.sum().item()
    assert distill_loss(sh, sw, th, tw, mask, normalizer=2 * n).loss.item() == pytest.approx(
        distill_loss(sh, sw, th, tw, mask).loss.item() / 2, rel=1e-6
    )
