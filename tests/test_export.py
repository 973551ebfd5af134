"""export: a PEFT adapter folder and a merged model folder that plain transformers loads and generates with."""

import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from qgen.data import QuestionDataModule
from qgen.export import export
from qgen.models import LoraSpec, embedded_path
from qgen.sft import SFTModule


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A LoRA SFT checkpoint from a real (short, high learning rate) fit, so the adapter is far from zero."""
    root = tmp_path_factory.mktemp("sft")
    L.seed_everything(0)
    module = SFTModule(lora=LoraSpec(r=8, alpha=16, dropout=0.0), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))
    L.Trainer(default_root_dir=str(root), max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
              limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=str(root), save_last=True, save_top_k=0)],
              ).fit(module, QuestionDataModule(batch_size=4, max_length=192))  # fmt: skip
    return str(root / "last.ckpt")


def test_adapter_and_merged_exports_load_generate_and_agree(sft_checkpoint, tmp_path):
    adapter, merged = export(sft_checkpoint, str(tmp_path / "adapter")), export(sft_checkpoint, str(tmp_path / "merged"), merge=True)
    assert adapter["kind"] == "adapter" and merged["kind"] == "merged"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(adapter["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(merged["files"])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "请命制一道数列题。"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    lora_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(embedded_path()).eval()
    with torch.no_grad():
        lora_logits, merged_logits, base_logits = (m(ids).logits for m in (lora_model, merged_model, base))
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-4, rtol=0)
    assert (lora_logits - base_logits).abs().max() > 1e-2  # the adapter really is in both exports
    for model in (lora_model, merged_model):
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids.shape[1]


def test_export_refuses_a_non_empty_folder_and_a_missing_checkpoint(sft_checkpoint, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(sft_checkpoint, str(tmp_path / "busy"))
    assert os.listdir(tmp_path / "busy") == ["keep.txt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(str(tmp_path / "nope.ckpt"), str(tmp_path / "out"))


def test_a_grpo_adapter_export_carries_the_sft_model_it_sits_on(sft_checkpoint, tmp_path):
    from qgen.grpo import GRPOModule

    grpo = GRPOModule(init_from=sft_checkpoint, lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    grpo.configure_model()
    with torch.no_grad():
        for n, p in grpo.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    state = {f"model.{n}": p.detach().clone() for n, p in grpo.model.named_parameters() if p.requires_grad}
    torch.save({"state_dict": state, "hyper_parameters": {**grpo.hparams, "_class_path": "qgen.GRPOModule"}},
               tmp_path / "grpo.ckpt")  # fmt: skip
    summary = export(str(tmp_path / "grpo.ckpt"), str(tmp_path / "adapter"))
    assert summary["kind"] == "adapter" and "base_model" in summary["files"]
    ids = torch.randint(5, 500, (1, 12))
    grpo.model.eval()
    with torch.no_grad():
        expected = grpo.model(input_ids=ids).logits
        exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()(input_ids=ids).logits
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=1e-4)


def test_a_moved_grpo_run_still_finds_its_sft_model_and_a_changed_one_is_refused(sft_checkpoint, tmp_path, monkeypatch):
    """GRPO checkpoints name their starting policy by absolute path, SHA-256 and position relative to the
    checkpoint: when the runs' folder moves, export finds it beside the checkpoint; when it changed, it refuses.
    """
    import shutil

    from qgen.checkpointing import CheckpointError, describe_source
    from qgen.grpo import GRPOModule

    runs = tmp_path / "runs"
    (runs / "sft").mkdir(parents=True)
    (runs / "grpo").mkdir()
    shutil.copy(sft_checkpoint, runs / "sft" / "last.ckpt")
    monkeypatch.chdir(runs)
    grpo = GRPOModule(init_from="sft/last.ckpt", lora=LoraSpec(r=8, alpha=16, dropout=0.0))
    assert os.path.isabs(grpo.hparams.init_from)  # a relative path is stored absolute
    grpo.configure_model()
    state = {f"model.{n}": p.detach().clone() for n, p in grpo.model.named_parameters() if p.requires_grad}
    torch.save({"state_dict": state, "hyper_parameters": {**grpo.hparams, "_class_path": "qgen.GRPOModule"},
                "qgen": {"init_from": describe_source("sft/last.ckpt", str(runs / "grpo"))}},
               runs / "grpo" / "last.ckpt")  # fmt: skip
    moved = tmp_path / "elsewhere" / "runs"
    shutil.move(str(runs), str(moved))
    monkeypatch.chdir(tmp_path)
    summary = export(str(moved / "grpo" / "last.ckpt"), str(tmp_path / "adapter"))
    assert "base_model" in summary["files"]
    with open(moved / "sft" / "last.ckpt", "ab") as fh:  # the SFT model changed after GRPO started from it
        fh.write(b"\0")
    with pytest.raises(CheckpointError, match="has changed since"):
        export(str(moved / "grpo" / "last.ckpt"), str(tmp_path / "adapter2"))
