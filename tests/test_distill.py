"""DistillModule: teacher kept out of checkpoints, frozen and in eval mode; judges filter / weight; tokenizer checks."""

import os
import shutil
import time

import lightning as L
import pytest
import torch
from conftest import CONFIGS, scalars

from callbacks import EducationalValueJudge, RigorReward
from qgen.cli import cli_main
from qgen.data import QuestionDataModule
from qgen.distill import DistillModule, check_same_tokenizer, resolve_teacher
from qgen.generation import GenerationSpec
from qgen.models import embedded_path, load_tokenizer

SMALL = ["--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--data.batch_size=4", "--model.init_args.generation.max_new_tokens=16"]  # fmt: skip


def test_checkpoint_holds_the_student_only_and_metrics_are_logged(tmp_path):
    cli = cli_main(["fit", "--config", os.path.join(CONFIGS, "distill.yaml"), "--model.init_args.teacher=embedded:default",
                    "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_steps=4",
                    "--trainer.val_check_interval=4", "--model.init_args.lmbda=0.5", "--model.init_args.on_policy_start=0",
                    *SMALL])  # fmt: skip
    module = cli.model
    log_dir = tmp_path / "lightning_logs" / "version_0"
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    student = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(state) == student and all(k.startswith("model.") for k in state)
    assert not any("teacher" in k for k in state)
    teacher_bytes = sum(p.numel() * p.element_size() for p in module.teacher.parameters())
    student_bytes = sum(p.numel() * p.element_size() for n, p in module.named_parameters() if n in student)
    size = os.path.getsize(ckpt)
    print(f"distill last.ckpt {size / 1e6:.2f} MB; teacher weights {teacher_bytes / 1e6:.2f} MB")
    assert size < 3.5 * student_bytes < teacher_bytes + 3.5 * student_bytes  # weights + Adam moments, no teacher
    assert size < teacher_bytes
    assert all(not p.requires_grad for p in module.teacher.parameters()) and not module.teacher.training
    for tag in ("train/loss", "train/divergence", "train/on_policy", "val/kl_to_teacher", "val/loss"):
        assert scalars(log_dir, tag), tag
    assert "teacher" in (log_dir / "hparams.yaml").read_text()


def _fit(tmp_path, module, judges, steps=2):
    L.seed_everything(5)
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_steps=steps, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=judges)  # fmt: skip
    trainer.fit(module, QuestionDataModule(batch_size=3, max_length=192))
    return trainer


def test_cluster_filter_drops_every_sequence_below_the_threshold(tmp_path):
    def module(threshold):
        return DistillModule(teacher="embedded:default", lmbda=1.0, judge_mode="filter", judge_threshold=threshold,
                             generation=GenerationSpec(max_new_tokens=12, temperature=1.0, top_p=1.0),
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0))  # fmt: skip

    strict = module(threshold=1.01)  # no score reaches it
    strict.configure_model()
    before = {n: p.detach().clone() for n, p in strict.model.named_parameters()}
    trainer = _fit(tmp_path / "a", strict, [RigorReward(0.5), EducationalValueJudge(0.5)])
    assert trainer.callback_metrics["train/judge_kept_frac"].item() == 0.0
    assert trainer.callback_metrics["train/on_policy"].item() == 1.0
    assert trainer.callback_metrics["train/loss"].item() == 0.0
    assert all(torch.equal(p, before[n]) for n, p in strict.model.named_parameters())
    assert "train/judge_rigor_mean" in trainer.callback_metrics

    lenient = module(threshold=0.0)  # every sequence kept
    lenient.configure_model()
    before = {n: p.detach().clone() for n, p in lenient.model.named_parameters()}
    trainer = _fit(tmp_path / "b", lenient, [RigorReward(0.5), EducationalValueJudge(0.5)])
    assert trainer.callback_metrics["train/judge_kept_frac"].item() == 1.0
    assert any(not torch.equal(p, before[n]) for n, p in lenient.model.named_parameters())


def test_a_teacher_with_another_tokenizer_is_rejected(tmp_path):
    other = tmp_path / "teacher"
    shutil.copytree(embedded_path(), other)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["<|qgen_extra|>"])
    tok.save_pretrained(str(other))
    with pytest.raises(ValueError, match="tokenizer differs from the student's"):
        check_same_tokenizer(load_tokenizer(None), load_tokenizer(str(other)), str(other))
    with pytest.raises(ValueError, match="tokenizer differs"):
        DistillModule(teacher=str(other), model_name_or_path="embedded:mini").configure_model()

    class Swapped:  # same size, two ids exchanged
        def __init__(self, vocab):
            self.vocab = dict(vocab)
            a, b = list(self.vocab)[10:12]
            self.vocab[a], self.vocab[b] = self.vocab[b], self.vocab[a]

        def get_vocab(self):
            return self.vocab

    base = load_tokenizer(None)
    with pytest.raises(ValueError, match="2 mapped differently"):
        check_same_tokenizer(base, Swapped(base.get_vocab()), "swapped")
    check_same_tokenizer(base, load_tokenizer("embedded:mini"), "embedded:mini")  # presets share the tokenizer


def test_teacher_last_prefers_the_newest_grpo_checkpoint(tmp_path):
    def fake(version, class_path):
        path = tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({"hyper_parameters": {"_class_path": class_path}}, path)
        time.sleep(0.02)
        return str(path)

    grpo = fake(0, "qgen.GRPOModule")
    fake(1, "qgen.SFTModule")  # newer, but SFT
    fake(2, "qgen.DistillModule")
    assert resolve_teacher("last", str(tmp_path / "lightning_logs")) == grpo
    assert resolve_teacher("some/folder") == "some/folder"
    with pytest.raises(FileNotFoundError, match="no GRPO or SFT last.ckpt"):
        resolve_teacher("last", str(tmp_path / "elsewhere"))


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="beta"):
        DistillModule(beta=1.5)
    with pytest.raises(ValueError, match="lmbda"):
        DistillModule(lmbda=2.0)
    with pytest.raises(ValueError, match="quantization needs model.lora"):
        DistillModule(quantization="nf4", lora=None)


def test_on_policy_draws_follow_lmbda_and_wait_for_on_policy_start():
    always, never, later = DistillModule(lmbda=1.0), DistillModule(lmbda=0.0), DistillModule(lmbda=1.0, on_policy_start=1)
    assert always._on_policy(0) and not never._on_policy(0) and not later._on_policy(0)  # global_step is 0 here
    share = DistillModule(lmbda=0.3)
    draws = [share._on_policy(i) for i in range(2000)]
    assert 0.27 < sum(draws) / len(draws) < 0.33
    assert draws == [share._on_policy(i) for i in range(2000)]  # a pure function of (seed, step, batch): resumable


def test_on_policy_distillation_is_audited_against_the_hf_engines_kv_cache(tmp_path, monkeypatch):
    """On-policy steps (lmbda 1): the student's samples' recorded log-probs against the dropout-free student's
    forward. Healthy: the gap is float32 noise (step 0 audited: every 10th with dropout); with every key the
    sampler's KV cache stores scaled by 1.5, step 0 fails (audit_patience 1 here: the run stops there).
    """
    import qgen.backends.hf as hf
    from qgen.audit import EngineMismatchError
    from qgen.backends import VLLMSpec

    def module(patience):
        return DistillModule(teacher="embedded:default", lmbda=1.0, on_policy_start=0,
                             generation=GenerationSpec(max_new_tokens=12, temperature=1.0, top_p=1.0),
                             vllm=VLLMSpec(audit_patience=patience))  # fmt: skip

    healthy = _fit(tmp_path / "healthy", module(1), [], steps=2)
    assert healthy.callback_metrics["train/engine_logprob_absdiff_mean"].item() < 1e-5
    from transformers.cache_utils import DynamicLayer

    real_generate, real_update = hf.generate_group, DynamicLayer.update

    def corrupted_update(self, key_states, value_states, *args, **kwargs):  # keys stored 1.5x too large
        return real_update(self, key_states * 1.5, value_states, *args, **kwargs)

    def generate_with_a_bad_cache(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(DynamicLayer, "update", corrupted_update)
            return real_generate(*args, **kwargs)

    monkeypatch.setattr(hf, "generate_group", generate_with_a_bad_cache)
    with pytest.raises(EngineMismatchError, match="weight pushes at steps 0 .*likely cause: the KV cache"):
        _fit(tmp_path / "faulty", module(1), [], steps=2)
