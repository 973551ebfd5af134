"""Does GRPO learn? A controlled check against TRL, and the default recipe on held-out prompts.

Both parts start from one short SFT of all weights of the embedded default (``--sft-steps``, as
``configs/sft.yaml``), then train a fresh LoRA adapter with GRPO.

**Controlled** (``--only controlled``): the reward is 1 when a completion is 40-60 tokens long (EOS
included), else 0, so it measures the optimiser, not the reward. qgen's ``GRPOModule`` and TRL's
``GRPOTrainer`` get the same model, the same prompts in the same order (qgen's; asserted token for token),
the same reward on the same token counts and the same settings (LoRA r 32 / alpha 64 / dropout 0.05 on all
linear layers, 2 prompts x 8 completions, 96 new tokens, temperature 1, beta 0.04, clip 0.2 / 0.28, per-
sequence loss mean, group-std advantages, AdamW at a constant ``--lr``, grad-norm clip 1, fp32, CPU), for
``--controlled-steps`` steps and each seed. Gain = mean reward of the last 10 steps minus the first 10.
What differs is each tool's own behaviour: TRL samples with dropout on, qgen samples with dropout off.
EOS is not suppressed (BENCHMARKING.md's fixed-length rule is for speed): the reward is the length itself.

**Default** (``--only default``): the shipped recipe (``configs/grpo.yaml``: its rewards, weights,
optimizer and schedule) against its lr-0 control (same seed, same prompts), for each seed and for both
``reward_aggregation`` options. Every ``--eval-every`` steps the policy samples 8 questions for each of
``--heldout`` held-out prompts (the validation split, minus any prompt identical to a training prompt;
checked) with a fixed seed, scored by the stationary rewards (novelty against the training questions, a
frozen bank; the run's repetition signal is left out). Gain = GRPO minus control at the last evaluation;
Student-t 95% interval over seeds (df = n - 1). The hacking guard is the largest drop of one component's
held-out mean against the control (mean over seeds).

    python benchmarks/grpo_learning.py [--only controlled|default] [--seeds 1 2 3 4 5] [--png PATH]

Needs ``pip install -e ".[bench]"`` (TRL, matplotlib). The last line is
``controlled_gain_qgen=… controlled_gain_trl=… default_gain_mean=… default_gain_ci_low=… worst_component_drop=…
controlled_diff_ci_high=…`` (the upper end of the qgen − TRL interval).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import os
import sys
import tempfile
import time
import warnings

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import constant_lr  # noqa: E402  (benchmarks/common.py)

import callbacks as reward_callbacks  # noqa: E402
from callbacks import RewardCallback  # noqa: E402
from qgen.data import QuestionDataModule, TokenizedDataset  # noqa: E402
from qgen.grpo import GRPOModule  # noqa: E402
from qgen.models import LoraSpec, load_policy  # noqa: E402
from qgen.optim import WarmupCosineLR  # noqa: E402
from qgen.scoring import RewardOutput, ScoringBatch  # noqa: E402
from qgen.sft import SFTModule  # noqa: E402

LOW, HIGH = 40, 60  # the controlled reward's length band, in tokens
LORA = LoraSpec(r=32, alpha=64, dropout=0.05)


def length_reward(lengths) -> list[float]:
    return [1.0 if LOW <= n <= HIGH else 0.0 for n in lengths]


class LengthReward(RewardCallback):
    """The controlled reward as a qgen reward callback (token counts from the rollout, EOS included)."""

    name = "length"

    def score(self, batch: ScoringBatch) -> RewardOutput:
        return RewardOutput(np.array(length_reward(batch.lengths), dtype=np.float32))


class Recorder(Callback):
    """Per training step: the mean reward and each component's mean, the prompts; held-out metrics per evaluation."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []
        self.prompts: list[list[int]] = []
        self.evals: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = pl_module.last
        row = {"total": float(last["rewards"].mean())}
        row.update({name: float(np.mean(out.values)) for name, out in last["components"].items()})
        self.rows.append(row)
        self.prompts.extend(list(p) for p in last["prompts"])

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        self.evals[trainer.global_step] = {k.removeprefix("val/reward_").removesuffix("_mean"): float(v)
                                           for k, v in metrics.items() if k.startswith("val/reward_")}  # fmt: skip


class HeldOutData(QuestionDataModule):
    """The shipped data, with the validation split cut to prompts that no training example has."""

    def __init__(self, heldout: int, **kw):
        super().__init__(**kw)
        self.heldout = heldout

    def setup(self, stage=None):
        fresh = not self.datasets
        super().setup(stage)
        if fresh:
            self.datasets["val"] = held_out(self.datasets["train"], self.datasets["val"], self.heldout)


def prompt_of(ds: TokenizedDataset, i: int) -> tuple[int, ...]:
    return tuple(ds.input_ids[i][: ds.prompt_lengths[i]])


def held_out(train: TokenizedDataset, val: TokenizedDataset, limit: int) -> TokenizedDataset:
    seen = {prompt_of(train, i) for i in range(len(train))}
    keep, kept = [], set()
    for i in range(len(val)):
        p = prompt_of(val, i)
        if p not in seen and p not in kept:
            keep.append(i), kept.add(p)
    keep = keep[:limit]
    subset = TokenizedDataset([val.examples[i] for i in keep], [val.input_ids[i] for i in keep],
                              [val.labels[i] for i in keep])  # fmt: skip
    assert not {prompt_of(subset, i) for i in range(len(subset))} & seen, "held-out prompts overlap training"
    train_ids = {(ex.record.source, ex.record.id) for ex in train.examples}
    assert not {(ex.record.source, ex.record.id) for ex in subset.examples} & train_ids, "held-out records overlap"
    return subset


def trainer(root: str, steps: int, callbacks: list, val_every: int | None = None) -> L.Trainer:
    val = {"val_check_interval": val_every, "check_val_every_n_epoch": None} if val_every else {"limit_val_batches": 0}
    return L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                     gradient_clip_val=1.0, enable_checkpointing=False, **val)  # fmt: skip


def sft(root: str, steps: int, val_fraction: float) -> str:
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
    module = SFTModule(lora=None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # as configs/sft.yaml
    t = L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt], gradient_clip_val=1.0)  # fmt: skip
    with quiet():
        t.fit(module, QuestionDataModule(batch_size=8, max_length=512, val_fraction=val_fraction))  # held-out stays out
    return os.path.join(root, "last.ckpt")


def quiet():
    """Hide the data summary and the trainers' chatter (this script prints its own tables)."""
    return contextlib.redirect_stdout(io.StringIO())


# ------------------------------------------------------------------------------------------------ controlled
def controlled_qgen(ckpt: str, root: str, seed: int, args) -> Recorder:
    L.seed_everything(seed)
    module = GRPOModule(init_from=ckpt, lora=LORA, group_size=8, max_new_tokens=96, beta=0.04, epsilon_low=0.2,
                        epsilon_high=0.28, aggregation="grpo", advantage="group_std", val_rewards=False,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0),
                        scheduler=constant_lr)  # fmt: skip
    recorder = Recorder()
    with quiet():
        trainer(root, args.controlled_steps, [LengthReward(1.0), recorder]).fit(
            module, QuestionDataModule(batch_size=2, max_length=512, val_fraction=args.val_fraction))
    return recorder


def controlled_trl(hf_dir: str, root: str, seed: int, prompts: list[list[int]], args) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    data = QuestionDataModule(batch_size=2, max_length=512, val_fraction=args.val_fraction)
    with quiet():
        data.setup("fit")
    train = data.datasets["train"]
    messages = {prompt_of(train, i): train.examples[i].messages[:-1] for i in range(len(train))}
    rows = [{"prompt": messages[tuple(p)]} for p in prompts]  # qgen's prompts, in qgen's order
    means: list[float] = []

    def reward(prompts, completions, completion_ids, **kw):
        values = length_reward([len(ids) for ids in completion_ids])
        means.append(float(np.mean(values)))
        return values

    config = GRPOConfig(output_dir=os.path.join(root, "trl"), seed=seed, use_cpu=True, bf16=False, fp16=False,
                        per_device_train_batch_size=16, num_generations=8, gradient_accumulation_steps=1,
                        max_steps=args.controlled_steps, learning_rate=args.lr, lr_scheduler_type="constant",
                        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", beta=0.04,
                        epsilon=0.2, epsilon_high=0.28, loss_type="grpo", scale_rewards="group",
                        max_completion_length=96, temperature=1.0, top_p=1.0, top_k=0, shuffle_dataset=False,
                        chat_template_kwargs={"enable_thinking": False}, report_to="none", save_strategy="no",
                        logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip
    grpo = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer, peft_config=peft)  # fmt: skip
    ids = grpo._tokenize_prompts([r["prompt"] for r in rows[:4]])[0]
    assert [list(x) for x in ids] == [list(p) for p in prompts[:4]], "TRL tokenizes the prompts differently"
    with quiet():
        grpo.train()
    return means


def gain(curve: list[float]) -> float:
    return float(np.mean(curve[-10:]) - np.mean(curve[:10]))


def interval(values: list[float]) -> tuple[float, float, float, float]:
    """mean, sd, and the Student-t 95% interval over seeds (df = n - 1)."""
    v = np.asarray(values, dtype=np.float64)
    mean, sd = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = float(stats.t.ppf(0.975, len(v) - 1) * sd / np.sqrt(len(v))) if len(v) > 1 else float("inf")
    return mean, sd, mean - half, mean + half


def controlled(ckpt: str, root: str, args) -> dict:
    hf_dir = os.path.join(root, "sft-hf")
    if not os.path.isdir(hf_dir):
        from qgen.models import load_tokenizer

        load_policy(ckpt, None).save_pretrained(hf_dir)
        load_tokenizer(None).save_pretrained(hf_dir)
    curves = {"qgen": [], "trl": []}
    for seed in args.seeds:  # the two tools alternate, seed by seed
        started = time.perf_counter()
        rec = controlled_qgen(ckpt, root, seed, args)
        curves["qgen"].append([r["total"] for r in rec.rows])
        t_qgen = time.perf_counter() - started
        started = time.perf_counter()
        curves["trl"].append(controlled_trl(hf_dir, root, seed, rec.prompts, args))
        t_trl = time.perf_counter() - started
        print(f"controlled seed {seed}: gain qgen {gain(curves['qgen'][-1]):+.3f} ({t_qgen:.0f} s), "
              f"TRL {gain(curves['trl'][-1]):+.3f} ({t_trl:.0f} s)", flush=True)  # fmt: skip
    g = {tool: [gain(c) for c in cs] for tool, cs in curves.items()}
    diff = [a - b for a, b in zip(g["qgen"], g["trl"])]
    print(f"\nControlled: reward 1 for {LOW}-{HIGH} tokens, {args.controlled_steps} steps, 2 prompts x 8, "
          f"lr {args.lr}, "
          f"seeds {args.seeds}; gain = last 10 steps minus first 10")  # fmt: skip
    print(f"{'seed':>6} {'qgen first10':>13} {'last10':>7} {'gain':>7} {'TRL first10':>12} {'last10':>7} {'gain':>7} "
          f"{'qgen-TRL':>9}")  # fmt: skip
    for i, s in enumerate(args.seeds):
        q, t = curves["qgen"][i], curves["trl"][i]
        print(f"{s:>6} {np.mean(q[:10]):>13.3f} {np.mean(q[-10:]):>7.3f} {gain(q):>+7.3f} {np.mean(t[:10]):>12.3f} "
              f"{np.mean(t[-10:]):>7.3f} {gain(t):>+7.3f} {gain(q) - gain(t):>+9.3f}")  # fmt: skip
    mean, sd, lo, hi = interval(diff)
    print(f"qgen - TRL over {len(diff)} paired seeds: mean {mean:+.3f}, sd {sd:.3f}, "
          f"95% t-interval [{lo:+.3f}, {hi:+.3f}]")
    return {"curves": curves, "gain_qgen": float(np.mean(g["qgen"])), "gain_trl": float(np.mean(g["trl"])),
            "diff_ci": (lo, hi)}  # fmt: skip


# --------------------------------------------------------------------------------------------------- default
@functools.cache
def shipped_recipe() -> dict:
    """The GRPO recipe of ``configs/grpo.yaml`` (read once; callers copy what they change)."""
    with open(os.path.join(ROOT, "configs", "grpo.yaml"), encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    model = dict(config["model"]["init_args"])
    optimizer, scheduler = model.pop("optimizer"), model.pop("scheduler")
    for key in ("model_name_or_path", "init_from"):
        model.pop(key, None)
    rewards = [(c["class_path"].split(".")[-1], c.get("init_args", {})) for c in config["trainer"]["callbacks"]
               if c["class_path"].startswith("callbacks.") and c["class_path"].endswith("Reward")]  # fmt: skip
    return {"model": model, "optimizer": optimizer["init_args"], "scheduler": scheduler["init_args"],
            "rewards": rewards, "data": config["data"], "clip": config["trainer"].get("gradient_clip_val")}  # fmt: skip


def default_run(ckpt: str, root: str, seed: int, lr: float, aggregation: str, args) -> Recorder:
    recipe = shipped_recipe()
    L.seed_everything(seed)
    opt, sched = recipe["optimizer"], recipe["scheduler"]
    model = dict(recipe["model"], lora=LoraSpec(**recipe["model"]["lora"]), reward_aggregation=aggregation)
    module = GRPOModule(init_from=ckpt, **model, optimizer=lambda p: torch.optim.AdamW(p, **dict(opt, lr=lr)),
                        scheduler=lambda o: WarmupCosineLR(o, **sched))  # fmt: skip
    rewards = [getattr(reward_callbacks, name)(**kw) for name, kw in recipe["rewards"]]
    recorder = Recorder()
    data = HeldOutData(args.heldout, sources=recipe["data"]["sources"], max_length=recipe["data"]["max_length"],
                       batch_size=recipe["data"]["batch_size"], seed=recipe["data"]["seed"],
                       val_fraction=args.val_fraction)  # fmt: skip
    every = args.steps if lr == 0 else args.eval_every  # lr 0: the policy never moves, one evaluation
    with quiet():
        trainer(root, args.steps, rewards + [recorder], val_every=every).fit(module, data)
    return recorder


def default(ckpt: str, root: str, args) -> dict:
    aggregations = ("sum_then_normalize", "normalize_then_sum")
    shipped = shipped_recipe()["model"].get("reward_aggregation", "sum_then_normalize")
    runs: dict[str, list[Recorder]] = {"control": [], **{a: [] for a in aggregations}}
    for seed in args.seeds:
        started = time.perf_counter()
        runs["control"].append(default_run(ckpt, root, seed, 0.0, shipped, args))
        for a in aggregations:
            runs[a].append(default_run(ckpt, root, seed, shipped_recipe()["optimizer"]["lr"], a, args))
        base = final(runs["control"][-1])["mean"]
        line = ", ".join(f"{a} {final(runs[a][-1])['mean'] - base:+.3f}" for a in aggregations)
        print(f"default seed {seed}: held-out gain {line} ({time.perf_counter() - started:.0f} s)", flush=True)
    components = [k for k in final(runs["control"][0]) if k != "mean"]
    print(f"\nDefault recipe (configs/grpo.yaml), {args.steps} steps, {args.heldout} held-out prompts x 8; "
          f"GRPO minus its lr-0 control at step {args.steps}, seeds {args.seeds}")  # fmt: skip
    result = {"runs": runs, "components": components}
    for a in aggregations:
        gains = [final(r)["mean"] - final(c)["mean"] for r, c in zip(runs[a], runs["control"])]
        mean, sd, lo, hi = interval(gains)
        drops = {k: float(np.mean([final(c)[k] - final(r)[k] for r, c in zip(runs[a], runs["control"])]))
                 for k in components}  # fmt: skip
        per_seed = " ".join(f"{x:+.3f}" for x in gains)
        print(f"{a:<19} gains {per_seed}: n {len(gains)}, mean {mean:+.3f}, sd {sd:.3f}, "
              f"95% t-interval [{lo:+.3f}, {hi:+.3f}]")  # fmt: skip
        print(f"{'':<19} component change vs control: " + ", ".join(f"{k} {-v:+.3f}" for k, v in drops.items()))
        result[a] = {"mean": mean, "sd": sd, "ci_low": lo, "worst_drop": max(drops.values())}
    better = max(aggregations, key=lambda a: result[a]["mean"])
    print(f"learns better on held-out prompts: {better}; configs/grpo.yaml ships {shipped}")
    result["shipped"] = shipped
    return result


def final(rec: Recorder) -> dict[str, float]:
    return rec.evals[max(rec.evals)]


# ------------------------------------------------------------------------------------------------------ main
def plot(path: str, ctl: dict | None, dft: dict | None, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (ctl, dft) if p is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    axes = list(axes[0])
    if ctl is not None:
        ax = axes.pop(0)
        for tool, color in (("qgen", "C0"), ("trl", "C1")):
            for i, curve in enumerate(ctl["curves"][tool]):
                smooth = np.convolve(curve, np.ones(5) / 5, mode="valid")
                ax.plot(np.arange(len(smooth)) + 5, smooth, color=color, alpha=0.8,
                        label=f"{'TRL' if tool == 'trl' else 'qgen'}" if i == 0 else None)  # fmt: skip
        ax.set(title=f"Controlled: reward 1 for {LOW}-{HIGH} tokens (5-step mean)", xlabel="step", ylabel="reward")
        ax.legend()
    if dft is not None:
        ax = axes.pop(0)
        for name, color in (("sum_then_normalize", "C0"), ("normalize_then_sum", "C2")):
            for i, (rec, ctl_rec) in enumerate(zip(dft["runs"][name], dft["runs"]["control"])):
                base = final(ctl_rec)["mean"]
                steps = [0] + sorted(rec.evals)
                values = [0.0] + [rec.evals[s]["mean"] - base for s in sorted(rec.evals)]
                ax.plot(steps, values, marker="o", color=color, alpha=0.8, label=name if i == 0 else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title="Default recipe: held-out reward, GRPO minus lr-0 control", xlabel="step", ylabel="reward gain")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"curves: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["controlled", "default"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--controlled-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-4, help="the controlled check's constant learning rate")
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps of the default recipe")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=32, help="held-out prompts per evaluation")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "grpo_learning.png"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="qgen-grpo-learning-")
    started = time.perf_counter()
    ckpt = sft(root, args.sft_steps, args.val_fraction)
    ctl = controlled(ckpt, root, args) if args.only in (None, "controlled") else None
    dft = default(ckpt, root, args) if args.only in (None, "default") else None
    plot(args.png, ctl, dft, args)
    print(f"total time {time.perf_counter() - started:.0f} s")
    fields = []
    if ctl is not None:
        fields += [f"controlled_gain_qgen={ctl['gain_qgen']:.3f}", f"controlled_gain_trl={ctl['gain_trl']:.3f}"]
    if dft is not None:
        d = dft[dft["shipped"]]
        fields += [f"default_gain_mean={d['mean']:.3f}", f"default_gain_ci_low={d['ci_low']:.3f}",
                   f"worst_component_drop={d['worst_drop']:.3f}"]  # fmt: skip
    if ctl is not None:  # qgen - TRL over the paired seeds: qgen learns no slower when this is >= 0
        fields.append(f"controlled_diff_ci_high={ctl['diff_ci'][1]:.3f}")
    print(" ".join(fields))


if __name__ == "__main__":
    main()
