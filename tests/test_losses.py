import math

import torch
from torch.testing import assert_close

from qgen.losses import IGNORE_INDEX, reference_token_nll, token_nll


def test_token_nll_hand_computed():
    """Vocabulary of 2, one target token. Hidden [1, 0] with head rows [[0, 0], [ln 3, 0]] gives logits
    [0, ln 3] -> p(token 1) = 3/4, so the NLL of target 1 is -ln(3/4) = 0.28768...
    """
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    head = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    out = token_nll(hidden, head, labels)
    assert_close(out.loss, torch.tensor(-math.log(0.75)))
    assert out.tokens.item() == 1


def test_token_nll_matches_full_logits_and_chunks():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 5, requires_grad=True)
    head = torch.randn(11, 5, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    ref = reference_token_nll(hidden @ head.T, labels)
    g_ref = torch.autograd.grad(ref, [hidden, head])
    for chunk in (1, 4, 1024):
        out = token_nll(hidden, head, labels, chunk_size=chunk)
        assert_close(out.loss, ref)
        for g, r in zip(torch.autograd.grad(out.loss, [hidden, head]), g_ref):
            assert_close(g, r)


def test_token_nll_recomputes_every_chunk_but_the_last(monkeypatch):
    """10 target tokens in chunks of 4: 3 chunk forwards, then 2 recomputes in backward (not the last chunk's)."""
    import qgen.losses as losses

    calls = []
    original = losses._chunk_nll_sum
    monkeypatch.setattr(losses, "_chunk_nll_sum", lambda h, w, y: calls.append(h.size(0)) or original(h, w, y))
    hidden, head = torch.randn(2, 6, 3, requires_grad=True), torch.randn(5, 3)
    labels = torch.randint(0, 5, (2, 6))  # 2 x 5 = 10 targets (position t predicts labels[t + 1])
    out = token_nll(hidden, head, labels, chunk_size=4)
    assert calls == [4, 4, 2]
    out.loss.backward()
    assert sorted(calls[3:]) == [4, 4]
    calls.clear()
    token_nll(hidden, head, labels, chunk_size=16).loss.backward()
    assert calls == [10]  # one chunk: no recompute at all


def test_token_nll_normalizer_and_all_masked():
    hidden, head = torch.randn(2, 4, 3), torch.randn(6, 3)
    labels = torch.randint(0, 6, (2, 4))
    out = token_nll(hidden, head, labels, normalizer=10.0)
    assert_close(out.loss, out.nll_sum / 10.0)
    masked = token_nll(hidden.requires_grad_(), head, torch.full((2, 4), IGNORE_INDEX))
    assert masked.loss.item() == 0.0 and not torch.isnan(masked.loss)
    masked.loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0
