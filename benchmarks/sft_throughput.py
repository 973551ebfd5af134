"""SFT throughput: qgen's SFTModule vs TRL's SFTTrainer, measured in one run.

Both train the same embedded default model (same weights, LoRA r=32 on all linear layers, dropout 0.05)
on the same tokenized examples (the bundled question bank through QuestionDataModule: identical token
ids and assistant-only masks), with the same micro-batch size, max length, fp32, no gradient
checkpointing, AdamW at the same LR, on the same CPU threads. TRL gets the tokenized dataset directly
(``input_ids`` + ``completion_mask``), so its own preprocessing is not timed. The first ``--warmup`` steps
of each run are not timed; tokens/s counts the real (non-pad) tokens of the timed batches. Runs
alternate for ``--rounds`` rounds and the best round of each trainer is compared.

    python benchmarks/sft_throughput.py [--steps 30] [--batch-size 8] [--max-length 512]

Needs the bench extra: ``pip install -e ".[bench]"``. The last line is ``sft_tokens_per_s_ratio_vs_trl=X.XX``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qgen.data import IGNORE_INDEX, QuestionDataModule  # noqa: E402
from qgen.models import LoraSpec, embedded_path  # noqa: E402
from qgen.sft import SFTModule  # noqa: E402

LR = 2e-4


class StepTimer:
    """Wall time and real tokens of the steps after ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup, self.step, self.tokens, self.t0, self.t1 = warmup, 0, 0, None, None

    def begin(self) -> None:
        if self.step == self.warmup:
            self.t0 = time.perf_counter()

    def end(self, tokens: int) -> None:
        if self.step >= self.warmup:
            self.tokens += tokens
            self.t1 = time.perf_counter()
        self.step += 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.t1 - self.t0)

    @property
    def s_per_step(self) -> float:
        return (self.t1 - self.t0) / (self.step - self.warmup)


class _LightningTimer(Callback):
    def __init__(self, timer: StepTimer):
        self.timer = timer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.timer.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timer.end(int(batch["attention_mask"].sum()))


def run_qgen(dm: QuestionDataModule, args) -> StepTimer:
    L.seed_everything(0)
    timer = StepTimer(args.warmup)
    module = SFTModule(lora=LoraSpec(r=32, alpha=64, dropout=0.05),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.0))  # fmt: skip
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[_LightningTimer(timer)])  # fmt: skip
    trainer.fit(module, dm)
    return timer


def run_trl(dm: QuestionDataModule, args) -> StepTimer:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    train = dm.datasets["train"]
    dataset = Dataset.from_dict({
        "input_ids": train.input_ids,
        "completion_mask": [[int(t != IGNORE_INDEX) for t in lab] for lab in train.labels],
    })  # fmt: skip
    timer = StepTimer(args.warmup)

    class _Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.begin()

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        gradient_checkpointing=False, bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10,
        dataloader_num_workers=0, completion_only_loss=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(embedded_path())
    peft = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=dm.tokenizer,
                         peft_config=peft, callbacks=[_Timer()])  # fmt: skip
    collator = trainer.data_collator

    def counting_collator(items):
        batch = collator(items)
        timer.pending = (
            int(batch["attention_mask"].sum())
            if "attention_mask" in batch
            else int((batch["input_ids"] != dm.tokenizer.pad_token_id).sum())
        )
        return batch

    class _End(TrainerCallback):
        def on_step_end(self, *a, **k):
            timer.end(timer.pending)

    trainer.data_collator = counting_collator
    trainer.add_callback(_End())
    trainer.train()
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best round of each counts")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    dm = QuestionDataModule(batch_size=args.batch_size, max_length=args.max_length, val_fraction=0.0)
    dm.setup("fit")
    runners = {"qgen SFTModule": run_qgen, "TRL SFTTrainer": run_trl}
    rounds: dict[str, list[StepTimer]] = {name: [] for name in runners}
    for _ in range(args.rounds):  # alternate, so drift in machine speed hits both alike
        for name, run in runners.items():
            rounds[name].append(run(dm, args))
    results = {name: max(timers, key=lambda t: t.tokens_per_s) for name, timers in rounds.items()}
    print(f"\nSFT throughput, embedded default ({sum(1 for _ in dm.datasets['train'].input_ids)} examples), "
          f"batch {args.batch_size}, max_length {args.max_length}, {args.steps} timed steps, {args.threads} threads")  # fmt: skip
    print(f"{'trainer':<16} {'tokens/s':>10} {'s/step':>8} {'tokens':>8} {'ratio':>6}  all rounds (tokens/s)")
    ref = results["TRL SFTTrainer"].tokens_per_s
    for name, t in results.items():
        every = ", ".join(f"{r.tokens_per_s:.0f}" for r in rounds[name])
        print(
            f"{name:<16} {t.tokens_per_s:>10.0f} {t.s_per_step:>8.3f} {t.tokens:>8d} {t.tokens_per_s / ref:>6.2f}  {every}"
        )
    print(f"sft_tokens_per_s_ratio_vs_trl={results['qgen SFTModule'].tokens_per_s / ref:.2f}")


if __name__ == "__main__":
    main()
