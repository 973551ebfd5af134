"""GRPO learning signal: does GRPO raise the total reward above a control run that does not learn?

A short SFT of all weights of the embedded default (``--sft-steps``, as ``configs/sft.yaml``), then two
runs of ``--steps`` GRPO steps from it with the four reward callbacks at the seed's weights, the same
seed and the same prompts: the *control* with learning rate 0 (it samples, scores and grows the novelty
bank exactly like GRPO, but its policy never moves) and *GRPO* at ``--lr`` (default: the learning rate
of ``configs/grpo.yaml``). The reward is not stationary (the novelty bank fills with the run's own
questions), so the comparison is GRPO vs control over the last 10 steps, not first vs last.

    python benchmarks/grpo_learning.py [--sft-steps 150] [--steps 60] [--lr 5e-4]

The last line is ``grpo_reward_last10_minus_control=X.XXX`` (positive: GRPO learned).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from callbacks import DifficultyReward, DiversityReward, NoveltyReward, RigorReward  # noqa: E402
from qgen.data import QuestionDataModule  # noqa: E402
from qgen.grpo import GRPOModule  # noqa: E402
from qgen.models import LoraSpec  # noqa: E402
from qgen.sft import SFTModule  # noqa: E402


class Recorder(Callback):
    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = pl_module.last
        row = {"total": float(last["rewards"].mean())}
        row.update({name: float(np.mean(out.values)) for name, out in last["components"].items()})
        self.rows.append(row)


def trainer(root: str, steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, callbacks=callbacks, gradient_clip_val=1.0)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="qgen-grpo-bench-")
    L.seed_everything(0)
    lora = LoraSpec(r=32, alpha=64, dropout=0.05)
    ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
    sft = SFTModule(lora=None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # as configs/sft.yaml
    trainer(root, args.sft_steps, [ckpt]).fit(sft, QuestionDataModule(batch_size=8, max_length=512))
    runs = {name: grpo_run(root, lora, args, lr) for name, lr in (("control", 0.0), ("GRPO", args.lr))}
    print(f"\nGRPO on the embedded default after {args.sft_steps} SFT steps: {args.steps} steps, "
          f"2 prompts x 8 completions, lr {args.lr} (control: lr 0); mean over the last 10 steps")  # fmt: skip
    print(f"{'reward':<12} {'control':>9} {'GRPO':>9} {'change':>8}")
    for name in runs["GRPO"][0]:
        a, b = (np.mean([r[name] for r in rows[-10:]]) for rows in runs.values())
        print(f"{name:<12} {a:>9.3f} {b:>9.3f} {b - a:>+8.3f}")
    a, b = (np.mean([r["total"] for r in rows[-10:]]) for rows in runs.values())
    print(f"grpo_reward_last10_minus_control={b - a:.3f}")


def grpo_run(root: str, lora: LoraSpec, args, lr: float) -> list[dict[str, float]]:
    L.seed_everything(0)
    grpo = GRPOModule(init_from=os.path.join(root, "last.ckpt"), lora=lora, group_size=8,
                      max_new_tokens=args.max_new_tokens, beta=0.04,
                      optimizer=lambda p: torch.optim.AdamW(p, lr=lr))  # fmt: skip
    recorder = Recorder()
    rewards = [DifficultyReward(0.4), NoveltyReward(0.3), RigorReward(0.2), DiversityReward(0.1)]
    trainer(root, args.steps, rewards + [recorder]).fit(grpo, QuestionDataModule(batch_size=2, max_length=512))
    return recorder.rows


if __name__ == "__main__":
    main()
