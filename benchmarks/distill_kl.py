"""Distillation vs plain SFT: how close does a small student get to its teacher on held-out questions?

1. The teacher: the embedded default after ``--teacher-steps`` of SFT (all weights, as configs/sft.yaml).
2. Four students, all ``embedded:mini`` from the same random init, ``--steps`` steps each on the same
   data, batch size, learning rate and schedule:
   - ``sft``: plain cross-entropy on the dataset targets (``SFTModule``, full fine-tuning);
   - ``distill fwd-KL``: ``DistillModule`` with beta 0 (forward KL), off-policy only (lmbda 0);
   - ``distill JSD 0.5``: beta 0.5, off-policy only;
   - ``distill config``: ``DistillModule`` as in configs/distill.yaml (forward KL + 0.5 x cross-entropy;
     from step 150, lmbda 0.1: one step in ten on the student's own samples, weighted by the four judges).
3. Each student's forward KL(teacher || student) per target token on the validation split (temperature 1),
   before and after, and its cross-entropy on the same tokens.

    python benchmarks/distill_kl.py [--teacher-steps 250] [--steps 200]

Last line: ``distill_kl_end_vs_sft_ratio=X`` (the configs/distill.yaml student's final KL / the SFT
student's; < 1 = distillation got closer to the teacher).
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
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from callbacks import DifficultyReward, EducationalValueJudge, NoveltyReward, RigorReward  # noqa: E402
from qgen.data import QuestionDataModule  # noqa: E402
from qgen.distill import DistillModule  # noqa: E402
from qgen.generation import GenerationSpec  # noqa: E402
from qgen.losses import IGNORE_INDEX, distill_loss, token_nll  # noqa: E402
from qgen.models import load_causal_lm, load_from_checkpoint  # noqa: E402
from qgen.sft import SFTModule  # noqa: E402


def trainer(root: str, steps: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, callbacks=callbacks or [],
                     gradient_clip_val=1.0, enable_checkpointing=bool(callbacks))  # fmt: skip


def datamodule() -> QuestionDataModule:
    return QuestionDataModule(batch_size=8, max_length=512, val_fraction=0.1)


@torch.no_grad()
def held_out(student: torch.nn.Module, teacher: torch.nn.Module, dm: QuestionDataModule) -> tuple[float, float]:
    """(forward KL per target token, student cross-entropy per token) on the validation split."""
    student.eval()
    kl_sum = nll_sum = tokens = 0.0
    for batch in dm.val_dataloader():
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        hs = student.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        ht = teacher.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        target = labels[:, 1:] != IGNORE_INDEX
        out = distill_loss(hs[:, :-1], student.get_output_embeddings().weight, ht[:, :-1],
                           teacher.get_output_embeddings().weight, target, beta=0.0)  # fmt: skip
        nll = token_nll(hs, student.get_output_embeddings().weight, labels)
        kl_sum, nll_sum = kl_sum + float(out.divergence_sum), nll_sum + float(nll.nll_sum)
        tokens += float(out.tokens)
    student.train()
    return kl_sum / tokens, nll_sum / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=250)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="qgen-distill-bench-")

    L.seed_everything(0)
    started = time.perf_counter()
    teacher_module = SFTModule(lora=None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer(root, args.teacher_steps, [ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)]).fit(
        teacher_module, datamodule()
    )
    teacher_ckpt = os.path.join(root, "last.ckpt")
    teacher = load_from_checkpoint(teacher_ckpt)
    print(f"teacher: {args.teacher_steps} SFT steps in {time.perf_counter() - started:.0f} s")

    dm = datamodule()
    dm.setup("fit")
    baseline = load_causal_lm("embedded:mini")
    start_kl, start_nll = held_out(baseline, teacher, dm)

    def optimizer(params):
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    judges = [DifficultyReward(0.25), RigorReward(0.25), NoveltyReward(0.25), EducationalValueJudge(0.25)]
    runs = {
        "sft": (SFTModule(model_name_or_path="embedded:mini", lora=None, optimizer=optimizer), []),
        "distill fwd-KL": (DistillModule(teacher=teacher_ckpt, model_name_or_path="embedded:mini", beta=0.0, lmbda=0.0,
                                         judge_mode="off", optimizer=optimizer), []),  # fmt: skip
        "distill JSD 0.5": (DistillModule(teacher=teacher_ckpt, model_name_or_path="embedded:mini", beta=0.5, lmbda=0.0,
                                          judge_mode="off", optimizer=optimizer), []),  # fmt: skip
        "distill config": (DistillModule(teacher=teacher_ckpt, model_name_or_path="embedded:mini", beta=0.0, lmbda=0.1,
                                         on_policy_start=150, sft_weight=0.5, generation=GenerationSpec(96, 1.0, 1.0),
                                         optimizer=optimizer), judges),  # fmt: skip
    }
    rows = []
    for name, (module, callbacks) in runs.items():
        L.seed_everything(1)
        started = time.perf_counter()
        trainer(root, args.steps, callbacks).fit(module, datamodule())
        seconds = time.perf_counter() - started
        kl, nll = held_out(module.model, teacher, dm)
        rows.append((name, kl, nll, seconds))

    print(f"\nheld-out KL(teacher || student) per target token, {len(dm.datasets['val'])} validation examples, "
          f"{args.steps} steps per student")  # fmt: skip
    print(f"{'student':<16} {'KL start':>9} {'KL end':>9} {'end/start':>10} {'CE end':>8} {'seconds':>8}")
    for name, kl, nll, seconds in rows:
        print(f"{name:<16} {start_kl:>9.3f} {kl:>9.3f} {kl / start_kl:>10.3f} {nll:>8.3f} {seconds:>8.0f}")
    print(f"(student cross-entropy at start {start_nll:.3f})")
    ratio = rows[-1][1] / rows[0][1]
    print(f"distill_kl_end_vs_sft_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
