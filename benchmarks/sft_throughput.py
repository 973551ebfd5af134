"""SFT throughput, like for like: qgen's SFTModule vs TRL 1.16's SFTTrainer vs a bare PyTorch loop.

Same work on every side (asserted, not assumed):
- the same model (the embedded default, fp32), LoRA r=32 alpha=64 on all linear layers, dropout 0.05;
- the **same batches**: qgen's own length-grouped batches (its default sampler), written out in order and
  handed to TRL as a dataset read sequentially (``train_sampling_strategy="sequential"``), so TRL trains on
  exactly qgen's batches (as length-grouped as TRL's own ``group_by_length`` would make them, with the
  same padding); every side records the token ids of the batches it computes a loss on, and the script
  checks they are identical;
- tokens counted where the loss is computed (the real tokens of the batch that reaches the loss function),
  printed per step;
- the same optimisation: AdamW (torch's fused implementation on every side), lr 2e-4 constant, no weight
  decay, gradient-norm clipping at 1.0, no accumulation; the first ``--warmup`` steps are not timed
  (a step's time is end of step to end of step, data loading included on every side).

Sides (``--sides``; rounds alternate and every round is printed):
- ``qgen``: SFTModule with peft's own LoRA layers, as a GPU user runs it (``lora.cpu_kernels: false``);
- ``qgen-fused``: qgen's default on CPU, its fused LoRA layers (``qgen.lora``): a **CPU-only** speed-up;
- ``qgen-ckpt`` / ``trl-ckpt``: both with gradient checkpointing (non-reentrant), as the 14B configs run;
- ``trl``: SFTTrainer as it runs on CPU: its fused LM head scores every position (prompt and padding too);
- ``trl-cudalike``: the same with only labelled positions scored, as it does on CUDA (Triton devices);
- ``bare``: a plain PyTorch loop over the same batches (same model, qgen's loss function, same optimizer and
  clipping): the limit for this model, against which Lightning's and qgen's overhead shows;
- optional: ``qgen-packed`` (qgen's padding-free batches) and ``trl-padfree`` (TRL's ``padding_free``).

    python benchmarks/sft_throughput.py [--steps 20] [--rounds 3] [--batch-size 8] [--max-length 512]

Needs the bench extra: ``pip install -e ".[bench]"``. The last line is
``sft_vs_trl=… sft_vs_bare=… tokens_per_step=…`` (ratios are medians over rounds of per-round ratios).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (benchmarks/common.py: what the sides share; model and machine)
from common import StepClock, constant_lr, fused_adamw  # noqa: E402

from qgen.data import IGNORE_INDEX, QuestionDataModule  # noqa: E402
from qgen.models import LoraSpec, causal_lm_nll, load_causal_lm  # noqa: E402
from qgen.sft import SFTModule  # noqa: E402

LR, CLIP, SEED = 2e-4, 1.0, 0
DEFAULT_SIDES = ["qgen", "qgen-fused", "qgen-ckpt", "trl", "trl-cudalike", "trl-ckpt", "bare"]
OPTIONAL_SIDES = ["qgen-packed", "trl-padfree"]
SEEN_BATCHES = 3  # batches whose token ids each side records for the same-work check


class Meter(StepClock):
    """End time of every step, the real tokens each loss saw, and the first batches' token ids."""

    def __init__(self, warmup: int):
        super().__init__(warmup)
        self.tokens, self.seen = [], []

    def loss_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None = None) -> None:  # fmt: skip
        """Called where the loss is computed, with the batch it is computed on."""
        if attention_mask is None:  # a packed row: every token is real, sequences start where positions restart
            self.tokens.append(int(input_ids.numel()))
            if len(self.seen) < SEEN_BATCHES:
                starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [input_ids.size(1)]
                self.seen.append([input_ids[0, a:b].tolist() for a, b in zip(starts, starts[1:])])
            return
        self.tokens.append(int(attention_mask.sum()))
        if len(self.seen) < SEEN_BATCHES:
            self.seen.append([ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)])

    @property
    def tokens_per_step(self) -> float:
        return statistics.mean(self.tokens[self.warmup :])

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.s_per_step


def qgen_batches(dm: QuestionDataModule, n: int) -> list[dict[str, torch.Tensor]]:
    """Qgen's first ``n`` training batches, as its trainer will draw them (same sampler, seed and epoch)."""
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == n:
            return batches
    raise SystemExit(f"the bundled data gives only {len(batches)} batches; lower --steps or --batch-size")


# ------------------------------------------------------------------------------------------------- qgen
def run_qgen(dm, args, meter: Meter, cpu_kernels: bool, checkpointing: bool = False, packing: bool = False):
    class Measured(SFTModule):
        def training_step(self, batch, batch_idx):
            if packing:  # the row the loss is computed on
                from qgen.models import pack_rows

                ids, positions, _ = pack_rows(batch["input_ids"], batch["attention_mask"])
                meter.loss_batch(ids, None, positions)
            else:
                meter.loss_batch(batch["input_ids"], batch["attention_mask"])
            return super().training_step(batch, batch_idx)

    class StepEnd(Callback):
        def on_train_batch_end(self, *a, **k):
            meter.step_end()

    L.seed_everything(SEED)
    module = Measured(model_name_or_path=args.model, dtype=args.dtype,
                      lora=LoraSpec(r=32, alpha=64, dropout=0.05, cpu_kernels=cpu_kernels),
                      gradient_checkpointing=checkpointing, packing=packing, optimizer=fused_adamw(LR),
                      scheduler=constant_lr)  # fmt: skip
    trainer = L.Trainer(max_steps=args.warmup + args.steps, **common.lightning_kwargs(args), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, gradient_clip_val=CLIP, gradient_clip_algorithm="norm",
                        callbacks=[StepEnd()])  # fmt: skip
    trainer.fit(module, dm)
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW) and trainer.optimizers[0].defaults["fused"]


# -------------------------------------------------------------------------------------------------- TRL
def run_trl(dm, args, meter: Meter, batches, variant: str = ""):
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [(ids[m.bool()].tolist(), (lab[m.bool()] != IGNORE_INDEX).int().tolist())
            for b in batches for ids, m, lab in zip(b["input_ids"], b["attention_mask"], b["labels"])]  # fmt: skip
    dataset = Dataset.from_dict({"input_ids": [r[0] for r in rows], "completion_mask": [r[1] for r in rows]})

    class Measured(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            meter.loss_batch(inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids"))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepEnd(TrainerCallback):
        def on_step_end(self, *a, **k):
            meter.step_end()

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        max_length=None if variant == "padfree" else args.max_length, learning_rate=LR,  # inputs come truncated
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch_fused", max_grad_norm=CLIP, gradient_checkpointing=variant == "ckpt",
        gradient_checkpointing_kwargs={"use_reentrant": False}, padding_free=variant == "padfree",
        train_sampling_strategy="sequential", **common.trl_kwargs(args), report_to=[], save_strategy="no",
        logging_steps=1000, dataloader_num_workers=0, completion_only_loss=True, seed=SEED, disable_tqdm=True,
    )  # fmt: skip
    model = common.hf_model(args)
    peft = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Measured(model=model, args=config, train_dataset=dataset, processing_class=dm.tokenizer,
                       peft_config=peft, callbacks=[StepEnd()])  # fmt: skip
    original = trl_utils._use_triton
    if variant == "cudalike":  # score only labelled positions, as TRL does on Triton (CUDA) devices
        trl_utils._use_triton = lambda device: True
    try:
        trainer.train()
    finally:
        trl_utils._use_triton = original
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer) \
        is torch.optim.AdamW  # fmt: skip


# ------------------------------------------------------------------------------------------------- bare
def run_bare(dm, args, meter: Meter, batches):
    L.seed_everything(SEED)
    model = load_causal_lm(args.model, LoraSpec(r=32, alpha=64, dropout=0.05, cpu_kernels=False),
                           dtype=args.dtype).to(args.device)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fused_adamw(LR)(params)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    for batch in batches[: args.warmup + args.steps]:
        meter.loss_batch(batch["input_ids"], batch["attention_mask"])
        with autocast:
            loss = causal_lm_nll(model, {k: v.to(args.device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step_end()


RUNNERS = {
    "qgen": lambda dm, a, m, b: run_qgen(dm, a, m, cpu_kernels=False),
    "qgen-fused": lambda dm, a, m, b: run_qgen(dm, a, m, cpu_kernels=True),
    "qgen-ckpt": lambda dm, a, m, b: run_qgen(dm, a, m, cpu_kernels=False, checkpointing=True),
    "qgen-packed": lambda dm, a, m, b: run_qgen(dm, a, m, cpu_kernels=False, packing=True),
    "trl": lambda dm, a, m, b: run_trl(dm, a, m, b),
    "trl-cudalike": lambda dm, a, m, b: run_trl(dm, a, m, b, "cudalike"),
    "trl-ckpt": lambda dm, a, m, b: run_trl(dm, a, m, b, "ckpt"),
    "trl-padfree": lambda dm, a, m, b: run_trl(dm, a, m, b, "padfree"),
    "bare": lambda dm, a, m, b: run_bare(dm, a, m, b),
}

# each ratio: qgen side / reference side, per round
RATIOS = {
    "sft_vs_trl": ("qgen", "trl"),
    "sft_vs_trl_cudalike": ("qgen", "trl-cudalike"),
    "sft_vs_bare": ("qgen", "bare"),
    "sft_ckpt_vs_trl_ckpt": ("qgen-ckpt", "trl-ckpt"),
    "sft_fused_cpu_vs_trl": ("qgen-fused", "trl"),
    "sft_fused_cpu_vs_qgen": ("qgen-fused", "qgen"),
    "sft_packed_vs_qgen": ("qgen-packed", "qgen"),
    "sft_vs_trl_padfree": ("qgen", "trl-padfree"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", nargs="+", default=DEFAULT_SIDES, choices=DEFAULT_SIDES + OPTIONAL_SIDES)
    common.add_machine_args(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    dm = QuestionDataModule(tokenizer=args.model, batch_size=args.batch_size, max_length=args.max_length,
                            val_fraction=0.0, seed=SEED)  # fmt: skip
    dm.setup("fit")
    batches = qgen_batches(dm, args.warmup + args.steps)
    reference = [[ids[m.bool()].tolist() for ids, m in zip(b["input_ids"], b["attention_mask"])]
                 for b in batches[:SEEN_BATCHES]]  # fmt: skip
    expected_tokens = [int(b["attention_mask"].sum()) for b in batches]
    padding = 1 - sum(expected_tokens) / sum(b["input_ids"].numel() for b in batches)

    rounds: dict[str, list[Meter]] = {side: [] for side in args.sides}
    print(f"{'round':>5}  {'side':<13} {'tokens/s':>9} {'s/step':>7} {'tokens/step':>11}")
    for r in range(args.rounds):  # alternate, so drift in machine speed hits every side alike
        for side in args.sides:
            meter = Meter(args.warmup)
            RUNNERS[side](dm, args, meter, batches)
            # the same work: the same batches' token ids, and the same real tokens per step
            assert meter.seen == reference, f"{side}: its first batches are not qgen's batches"
            assert meter.tokens == expected_tokens, f"{side}: tokens per step differ from qgen's batches"
            rounds[side].append(meter)
            print(f"{r:>5}  {side:<13} {meter.tokens_per_s:>9.0f} {meter.s_per_step:>7.3f} "
                  f"{meter.tokens_per_step:>11.0f}", flush=True)  # fmt: skip

    print(f"\nSFT throughput, {common.describe(args)}, {len(batches)} batches of {args.batch_size} (max_length "
          f"{args.max_length}, {padding:.1%} padding), {args.steps} timed steps, {args.threads} threads, "
          f"{args.rounds} rounds")  # fmt: skip
    print(f"{'side':<13} {'tokens/s median':>15}  every round")
    for side, meters in rounds.items():
        values = [m.tokens_per_s for m in meters]
        print(f"{side:<13} {statistics.median(values):>15.0f}  {', '.join(f'{v:.0f}' for v in values)}")
    summary = []
    print(f"\n{'ratio':<24} {'median':>6}  {'min':>5} {'max':>5}  per round")
    for name, (num, den) in RATIOS.items():
        if num not in rounds or den not in rounds:
            continue
        per_round = [a.tokens_per_s / b.tokens_per_s for a, b in zip(rounds[num], rounds[den])]
        med = statistics.median(per_round)
        print(f"{name:<24} {med:>6.2f}  {min(per_round):>5.2f} {max(per_round):>5.2f}  "
              f"{', '.join(f'{v:.2f}' for v in per_round)}")  # fmt: skip
        summary.append(f"{name}={med:.2f}")
    summary.append(f"tokens_per_step={statistics.mean(expected_tokens[args.warmup:]):.0f}")
    # the required names first
    order = {"sft_vs_trl": 0, "sft_vs_bare": 1, "tokens_per_step": 2}
    summary.sort(key=lambda kv: order.get(kv.split("=")[0], 3))
    print(" ".join(summary))


if __name__ == "__main__":
    main()
