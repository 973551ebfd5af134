"""qgen.lora: Bernoulli drop positions, FastDropout, and FastLoraLinear against peft's own LoRA maths."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.testing import assert_close

from qgen.lora import FastDropout, FastLoraLinear, PeftLoraLinear, dropped_positions, speed_up_lora
from qgen.models import LoraSpec, load_causal_lm


def test_dropped_positions_are_iid_bernoulli():
    n, p = 1_000_000, 0.05
    torch.manual_seed(1)
    pos = dropped_positions(n, p)
    assert pos.dtype == torch.long and pos.min() >= 0 and pos.max() < n
    assert torch.all(pos[1:] > pos[:-1])  # sorted, no repeats
    # count ~ Binomial(n, p): mean 50,000, std 218
    assert abs(pos.numel() - 50_000) < 1_100
    # uniform over the tensor: 10 bins of mean 5,000 (std 69)
    assert torch.all((torch.bincount(pos // 100_000, minlength=10) - 5_000).abs() < 400)
    # independent neighbours: P(i and i+1 both dropped) = p^2, i.e. 2,500 of 1e6 pairs (std 50)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[pos] = True
    assert abs(int((mask[1:] & mask[:-1]).sum()) - 2_500) < 300
    # the first drop is at a Geometric(p) - 1 position: mean (1 - p) / p = 19 over many draws
    firsts = torch.stack([dropped_positions(1000, p)[0] for _ in range(2000)]).float()
    assert abs(firsts.mean().item() - 19.0) < 1.5


def test_dropped_positions_edges_and_seed():
    assert dropped_positions(0, 0.5).numel() == 0 and dropped_positions(10, 0.0).numel() == 0
    assert torch.equal(dropped_positions(4, 1.0), torch.arange(4))
    for n in range(1, 40):  # every position is in range, for tiny and dense masks
        pos = dropped_positions(n, 0.9)
        assert pos.numel() == 0 or pos.max() < n
    torch.manual_seed(3)
    a = dropped_positions(5000, 0.1)
    torch.manual_seed(3)
    assert torch.equal(a, dropped_positions(5000, 0.1))  # global generator: checkpointed RNG state replays it
    assert not torch.equal(a, dropped_positions(5000, 0.1))


def test_fast_dropout_has_dropout_statistics_and_gradient():
    drop = FastDropout(0.05).train()
    x = torch.ones(400_000, requires_grad=True)
    y = drop(x)
    assert 0.047 < (y == 0).float().mean().item() < 0.053
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.95))
    y.sum().backward()
    assert_close(x.grad, y.detach())  # d(sum y)/dx = mask / (1 - p)
    z = torch.randn(5, 7)
    assert torch.equal(drop.eval()(z), z) and torch.equal(FastDropout(0.0).train()(z), z)


class _Net(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(16, 12, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _lora_net(dropout: float, bias: bool = True):
    torch.manual_seed(0)
    model = get_peft_model(_Net(bias), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # peft starts B at 0: make the adapter matter
    return speed_up_lora(model), layer


@pytest.mark.parametrize("bias", [True, False])
def test_fast_lora_linear_equals_dense_lora_with_the_same_mask(bias):
    """The layer computes x W^T + b + 2 (x * m / (1 - p)) A^T B^T (alpha / r = 8 / 4), m = the drawn mask."""
    p = 0.3
    model, layer = _lora_net(p, bias)
    model.double()  # float64: the two summation orders agree to 1e-7
    assert type(layer) is FastLoraLinear
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    assert layer._fused_adapter(x) == "default"
    torch.manual_seed(11)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight])

    torch.manual_seed(11)
    mask = torch.ones(x.numel(), dtype=torch.float64)
    mask[dropped_positions(x.numel(), p)] = 0.0
    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ref = x @ w.T + ((x * mask.view_as(x) / (1 - p)) @ a.T @ b.T) * 2.0
    if bias:
        ref = ref + layer.base_layer.bias
    assert 0 < int((mask == 0).sum()) < x.numel()
    assert_close(y, ref)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), [x, a, b])):
        assert_close(g, r)
    assert layer.base_layer.weight.grad is None  # the base stays frozen


def test_fast_lora_linear_falls_back_to_peft_where_it_does_not_apply():
    model, layer = _lora_net(0.0)
    x = torch.randn(4, 16)
    fused = model(x)
    layer.__class__ = PeftLoraLinear
    assert_close(fused, model(x))  # no dropout: the same function as peft's
    layer.__class__ = FastLoraLinear
    with model.disable_adapter():
        assert_close(model(x), layer.base_layer(x))
    layer.merge()
    assert layer._fused_adapter(x) is None
    assert_close(model(x), fused)  # merged weights, through peft's path
    layer.unmerge()
    assert layer._fused_adapter(x.double()) is None  # dtype mismatch goes to peft


def test_embedded_lora_model_uses_fast_layers_with_peft_results():
    model = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.0))
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 4 * 7 and all(type(m) is FastLoraLinear for m in layers)  # q, k, v, o, gate, up, down
    for m in layers:
        nn.init.normal_(m.lora_B["default"].weight, std=0.02)
    ids = torch.randint(0, 1000, (2, 9))
    params = [p for p in model.parameters() if p.requires_grad]

    def logits_and_grads():
        logits = model(input_ids=ids).logits
        return logits, torch.autograd.grad(logits.float().square().mean(), params)

    fused = logits_and_grads()
    for m in layers:
        m.__class__ = PeftLoraLinear
    plain = logits_and_grads()
    assert_close(fused[0], plain[0], atol=1e-5, rtol=1e-4)
    for a, b in zip(fused[1], plain[1]):
        assert_close(a, b, atol=1e-6, rtol=1e-4)
    dropping = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.1))
    drops = [m for m in dropping.modules() if isinstance(m, FastDropout)]
    assert len(drops) == 4 * 7 and all(d.p == 0.1 for d in drops)


def test_fast_layers_are_cpu_only_and_can_be_switched_off():
    def kinds(model):
        return {type(m) for m in model.modules() if isinstance(m, PeftLoraLinear)}

    assert kinds(load_causal_lm(None, LoraSpec(r=4, alpha=8, cpu_kernels=False))) == {PeftLoraLinear}
    # a model bound for a GPU keeps peft's own layers and dropouts (it loads on CPU; Lightning moves it later)
    gpu = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.1), device="cuda:0")
    assert kinds(gpu) == {PeftLoraLinear}
    assert not any(isinstance(m, FastDropout) for m in gpu.modules())
