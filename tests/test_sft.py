"""SFTModule inside a real Trainer: accumulation, checkpoint contents and size, QLoRA on CPU."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from qgen.data import QuestionDataModule
from qgen.models import LoraSpec
from qgen.sft import SFTModule


class GradCapture(Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def fit(tmp_path, module, batch_size=8, accumulate=1, max_steps=1, callbacks=(), **trainer_kw):
    L.seed_everything(7)
    # plain shuffling: the first 8 examples are then the same for batch 8 and for 4 x batch 2
    dm = QuestionDataModule(batch_size=batch_size, max_length=192, val_fraction=0.0, group_by_length=False)
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
        **trainer_kw,
    )
    trainer.fit(module, dm)
    return trainer


def lora_module(**kw):
    return SFTModule(lora=LoraSpec(r=8, alpha=16, dropout=0.0), **kw)


def test_accumulation_equals_large_batch(tmp_path):
    """4 micro-batches of 2 give the gradient of one batch of 8: the loss is the token mean of the whole step."""
    big, small = GradCapture(), GradCapture()
    fit(tmp_path / "a", lora_module(), batch_size=8, accumulate=1, callbacks=[big], enable_checkpointing=False)
    fit(tmp_path / "b", lora_module(), batch_size=2, accumulate=4, callbacks=[small], enable_checkpointing=False)
    assert big.grads.keys() == small.grads.keys() and len(big.grads) > 0
    for name, g in big.grads.items():
        torch.testing.assert_close(small.grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in big.grads.values())


def test_lora_checkpoint_holds_trainable_weights_only_and_is_small(tmp_path):
    ckpts = {}
    for name, module in (("lora", lora_module()), ("full", SFTModule(lora=None))):
        cb = ModelCheckpoint(dirpath=str(tmp_path / name), save_last=True, save_top_k=0, every_n_train_steps=1)
        trainer = fit(tmp_path / name, module, batch_size=2, callbacks=[cb])
        ckpts[name] = (str(tmp_path / name / "last.ckpt"), trainer.lightning_module)
    path, module = ckpts["lora"]
    state = torch.load(path, weights_only=True)["state_dict"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(state) == trainable and all("lora_" in k for k in state)
    full_size, lora_size = os.path.getsize(ckpts["full"][0]), os.path.getsize(path)
    print(f"last.ckpt: LoRA {lora_size / 1e6:.2f} MB vs full {full_size / 1e6:.2f} MB ({lora_size / full_size:.1%})")
    assert lora_size < 0.25 * full_size


def test_only_lora_parameters_change(tmp_path):
    module = lora_module()
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(tmp_path, module, batch_size=2, max_steps=2, enable_checkpointing=False)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_qlora_nf4_trains_a_step_on_cpu(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    module = SFTModule(lora=LoraSpec(r=8, alpha=16, dropout=0.0), quantization="nf4")
    grads = GradCapture()
    fit(tmp_path, module, batch_size=2, callbacks=[grads], enable_checkpointing=False)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    assert grads.grads and all("lora_" in n for n in grads.grads)
    assert all(torch.isfinite(g).all() for g in grads.grads.values())


def test_nf4_layers_compute_the_same_on_every_cpu(monkeypatch):
    """bitsandbytes repacks a 4-bit weight in place at its first eval / no-grad forward on a CPU with
    AVX512-BF16 (asserting out_features % 32 == 0, breaking FSDP1's flat-parameter views). The check is made
    true here whatever this CPU has, so the test fails wherever qgen would take that path: the layers keep
    their stored layout, and eval / no-grad logits equal the training-mode forward's.
    """
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules

    from qgen.models import load_causal_lm

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # as on such a CPU
    model = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.0), "nf4", "bfloat16")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.arange(3, 19).reshape(2, 8)
    train_logits = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    torch.testing.assert_close(eval_logits, train_logits, rtol=0, atol=0)


def test_quantization_without_lora_is_rejected():
    with pytest.raises(ValueError, match="model.quantization needs model.lora"):
        SFTModule(lora=None, quantization="nf4")


def test_right_padded_batches_need_no_padding_mask():
    """Right padding under a causal mask: the loss and gradients without the mask equal those with it."""
    from qgen.losses import token_nll
    from qgen.models import causal_attention_mask, causal_lm_nll, load_causal_lm

    model = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.0))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    ids = torch.randint(3, 1000, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:], mask[2, 10:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert causal_attention_mask(mask) is None
    left = torch.ones(3, 12, dtype=torch.long)
    left[1, :3] = 0
    assert causal_attention_mask(left) is left  # left padding keeps its mask

    params = [p for p in model.parameters() if p.requires_grad]
    fast = causal_lm_nll(model, batch)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    masked = token_nll(hidden, model.get_output_embeddings().weight, labels)
    torch.testing.assert_close(fast.loss, masked.loss)
    for a, b in zip(torch.autograd.grad(fast.loss, params), torch.autograd.grad(masked.loss, params)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_replays_lora_dropout_and_gives_the_same_gradients():
    from qgen.models import causal_lm_nll, load_causal_lm

    ids = torch.randint(3, 1000, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.2), gradient_checkpointing=checkpointing)
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
        assert model.is_gradient_checkpointing == checkpointing
        torch.manual_seed(5)
        out = causal_lm_nll(model, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((out.loss, torch.autograd.grad(out.loss, params)))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss, loss_ckpt)
    for a, b in zip(grads, grads_ckpt):  # the recomputed forward draws the same dropout masks
        torch.testing.assert_close(a, b)


def _loss_and_grads(model, batch, **kw):
    from qgen.models import causal_lm_nll

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    out = causal_lm_nll(model, batch, **kw)
    out.loss.backward()
    return out, [p.grad.clone() for p in params]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batches_give_the_padded_loss_and_gradients(attn):
    from qgen.models import load_causal_lm, pack_rows

    model = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.0), attn_implementation=attn)
    assert model.config._attn_implementation == attn
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (4, 14), generator=g)
    mask = torch.ones(4, 14, dtype=torch.long)
    mask[0, 9:], mask[1, 5:], mask[3, 12:] = 0, 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    labels[2, 3:8] = -100  # a prompt inside the row, as in a multi-turn example
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    packed_ids, positions, packed_labels = pack_rows(ids, mask, labels)
    assert packed_ids.shape == (1, 9 + 5 + 14 + 12)
    assert positions[0, :11].tolist() == list(range(9)) + [0, 1]
    assert (packed_labels[0, [0, 9, 14, 28]] == -100).all()  # no sequence is predicted from the one before
    padded, padded_grads = _loss_and_grads(model, batch)
    packed, packed_grads = _loss_and_grads(model, batch, packed=True)
    assert packed.tokens == padded.tokens
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # packing must not leak attention across sequences: changing the first sequence leaves the others' loss
    other = dict(batch, input_ids=ids.clone())
    other["input_ids"][0, :9] = torch.randint(3, 1000, (9,), generator=g)
    first_free = {k: v[1:] for k, v in batch.items()}
    from qgen.models import causal_lm_nll

    with torch.no_grad():
        alone = causal_lm_nll(model, first_free).nll_sum
        mixed = causal_lm_nll(model, other, packed=True).nll_sum - causal_lm_nll(
            model, {k: v[:1] for k, v in other.items()}).nll_sum  # fmt: skip
    torch.testing.assert_close(mixed, alone, atol=1e-4, rtol=1e-5)


def test_sft_packing_option_trains_like_the_padded_batch(tmp_path):
    padded, packed = GradCapture(), GradCapture()
    fit(tmp_path / "a", lora_module(), batch_size=4, callbacks=[padded], enable_checkpointing=False)
    fit(tmp_path / "b", lora_module(packing=True), batch_size=4, callbacks=[packed], enable_checkpointing=False)
    for name, grad in padded.grads.items():
        torch.testing.assert_close(packed.grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_attention_implementation_is_checked_before_loading():
    from qgen.models import check_attn_implementation

    with pytest.raises(ValueError, match="model.attn_implementation must be one of"):
        check_attn_implementation("flex")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash_attention_2"):
            SFTModule(attn_implementation="flash_attention_2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_attention_packed_equals_sdpa_padded_on_gpu():
    pytest.importorskip("flash_attn")
    from qgen.models import load_causal_lm

    ids = torch.randint(3, 1000, (3, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, 25:], mask[2, 31:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :10] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for attn, packed in (("sdpa", False), ("flash_attention_2", True)):
        torch.manual_seed(0)
        model = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.0), dtype="bfloat16",
                               attn_implementation=attn).cuda()  # fmt: skip
        results.append(_loss_and_grads(model, batch, packed=packed))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.loss, b.loss, atol=2e-2, rtol=2e-2)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.float(), y.float(), atol=5e-2, rtol=5e-2)


def test_liger_kernels_are_refused_where_they_cannot_run():
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ValueError, match="liger-kernel package"):
            SFTModule(liger_kernels=True)
    elif not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            SFTModule(liger_kernels=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_kernels_give_the_plain_loss_and_gradients_on_gpu():
    pytest.importorskip("liger_kernel")
    from qgen.models import load_causal_lm

    ids = torch.randint(3, 1000, (2, 32), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    results = []
    for liger in (False, True):
        torch.manual_seed(0)
        model = load_causal_lm(None, LoraSpec(r=4, alpha=8, dropout=0.0), liger_kernels=liger).cuda()
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
        results.append(_loss_and_grads(model, batch))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.loss, b.loss, atol=1e-4, rtol=1e-4)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
