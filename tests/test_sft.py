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
