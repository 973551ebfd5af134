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
4. Steps 2-3 for each of ``--seeds``: a seed sets the data order (the data module's sampler), dropout and
   the on-policy samples, and is shared by the four students (paired runs). The teacher and the
   validation split stay fixed.

    python benchmarks/distill_kl.py [--teacher-steps 250] [--steps 200] [--seeds 1 2 3]

Last line: ``distill_kl_end_vs_sft_ratio=X distill_kl_ratio_min=… distill_kl_ratio_max=…`` (the
configs/distill.yaml student's final KL / the SFT student's, mean over seeds of the per-seed ratio;
< 1 = distillation got closer to the teacher).
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def datamodule(order_seed: int | None = None) -> QuestionDataModule:
    """The split and examples are fixed; ``order_seed`` orders the training batches."""
    return QuestionDataModule(batch_size=8, max_length=512, val_fraction=0.1, order_seed=order_seed)


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
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
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

    def students() -> dict:
        judges = [DifficultyReward(0.25), RigorReward(0.25), NoveltyReward(0.25), EducationalValueJudge(0.25)]
        return {
            "sft": (SFTModule(model_name_or_path="embedded:mini", lora=None, optimizer=optimizer), []),
            "distill fwd-KL": (DistillModule(teacher=teacher_ckpt, model_name_or_path="embedded:mini", beta=0.0,
                                             lmbda=0.0, judge_mode="off", optimizer=optimizer), []),  # fmt: skip
            "distill JSD 0.5": (DistillModule(teacher=teacher_ckpt, model_name_or_path="embedded:mini", beta=0.5,
                                              lmbda=0.0, judge_mode="off", optimizer=optimizer), []),  # fmt: skip
            "distill config": (DistillModule(teacher=teacher_ckpt, model_name_or_path="embedded:mini", beta=0.0,
                                             lmbda=0.1, on_policy_start=150, sft_weight=0.5,
                                             generation=GenerationSpec(96, 1.0, 1.0), optimizer=optimizer), judges),
        }  # fmt: skip

    results: dict[str, list[tuple[float, float, float]]] = {}  # student -> per seed (KL, CE, seconds)
    print(f"{'seed':>4}  {'student':<16} {'KL end':>8} {'CE end':>8} {'seconds':>8}")
    for seed in args.seeds:
        for name, (module, callbacks) in students().items():
            L.seed_everything(seed)
            started = time.perf_counter()
            trainer(root, args.steps, callbacks).fit(module, datamodule(seed))
            seconds = time.perf_counter() - started
            kl, nll = held_out(module.model, teacher, dm)
            results.setdefault(name, []).append((kl, nll, seconds))
            print(f"{seed:>4}  {name:<16} {kl:>8.3f} {nll:>8.3f} {seconds:>8.0f}", flush=True)

    def spread(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    print(f"\nheld-out KL(teacher || student) per target token, {len(dm.datasets['val'])} validation examples, "
          f"{args.steps} steps per student, seeds {args.seeds} (mean ± sd over seeds); KL at start {start_kl:.3f}, "
          f"student cross-entropy at start {start_nll:.3f}")  # fmt: skip
    print(f"{'student':<16} {'KL end':>15} {'end/start':>10} {'CE end':>15}  per seed (KL)")
    for name, rows in results.items():
        kls = [r[0] for r in rows]
        ces = spread([r[1] for r in rows])
        print(f"{name:<16} {spread(kls):>15} {statistics.mean(kls) / start_kl:>10.3f} {ces:>15}"
              f"  {', '.join(f'{k:.3f}' for k in kls)}")  # fmt: skip
    ratios = [c[0] / s[0] for c, s in zip(results["distill config"], results["sft"])]
    print(f"distill config / sft KL, per seed: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"distill_kl_end_vs_sft_ratio={statistics.mean(ratios):.2f} distill_kl_ratio_min={min(ratios):.2f} "
          f"distill_kl_ratio_max={max(ratios):.2f}")


if __name__ == "__main__":
    main()
