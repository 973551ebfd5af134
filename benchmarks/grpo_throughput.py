"""GRPO throughput: qgen's GRPOModule vs TRL's GRPOTrainer, measured in one run.

Both train the embedded default (LoRA r=32, all linear layers) on the same prompts (the bundled question
bank's SFT prompts), 2 prompts x G = 8 completions per step, the same ``max_new_tokens``, temperature 1,
beta = 0 (no reference pass), one rollout and one update per step, fp32, no gradient checkpointing, and the
same reward: the four qgen scorers (difficulty, novelty, rigor, diversity), fitted once and shared, wrapped
as a TRL reward function on TRL's side. The first ``--warmup`` steps are not timed; runs alternate for
``--rounds`` rounds and the best round of each trainer is compared.

(Log-prob memory against TRL's chunked kernel: ``benchmarks/logprob_memory.py``.)

    python benchmarks/grpo_throughput.py [--steps 10] [--max-new-tokens 64]

Needs the bench extra (``pip install -e ".[bench]"``). The last line is ``grpo_steps_per_s_ratio_vs_trl=X.XX``.
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
from callbacks import DifficultyReward, DiversityReward, NoveltyReward, RigorReward  # noqa: E402
from qgen.data import QuestionDataModule  # noqa: E402
from qgen.formatting import parse_question  # noqa: E402
from qgen.grpo import GRPOModule  # noqa: E402
from qgen.models import LoraSpec, embedded_path  # noqa: E402
from qgen.scoring import ScoringBatch  # noqa: E402

LR, PROMPTS, G = 1e-4, 2, 8


class Timer:
    def __init__(self, warmup: int):
        self.warmup, self.steps, self.t0, self.t1 = warmup, 0, None, None

    def begin(self):
        if self.steps == self.warmup:
            self.t0 = time.perf_counter()

    def end(self):
        self.steps += 1
        self.t1 = time.perf_counter()

    @property
    def s_per_step(self) -> float:
        return (self.t1 - self.t0) / (self.steps - self.warmup)


def make_rewards(dm: QuestionDataModule) -> list:
    rewards = [DifficultyReward(0.4), NoveltyReward(0.3), RigorReward(0.2), DiversityReward(0.1)]

    class _Trainer:  # what the callbacks' setup reads
        datamodule = dm

    for cb in rewards:
        cb.setup(_Trainer(), object(), "fit")
    return rewards


def run_qgen(dm, rewards, args) -> Timer:
    timer = Timer(args.warmup)

    class _T(Callback):
        def on_train_batch_start(self, *a):
            timer.begin()

        def on_train_batch_end(self, *a):
            timer.end()

    L.seed_everything(0)
    module = GRPOModule(lora=LoraSpec(r=32, alpha=64, dropout=0.05), group_size=G, max_new_tokens=args.max_new_tokens,
                        beta=0.0, optimizer=lambda p: torch.optim.AdamW(p, lr=LR))  # fmt: skip
    module.configure_model()
    for cb in rewards:
        module.register_reward(cb)
    dm.hparams.batch_size = PROMPTS
    L.Trainer(max_steps=args.warmup + args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[_T()]).fit(module, dm)  # fmt: skip
    return timer


def run_trl(dm, rewards, args) -> Timer:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    timer = Timer(args.warmup)
    examples = dm.datasets["train"].examples
    dataset = Dataset.from_dict({"prompt": [ex.messages[:-1] for ex in examples], "row": list(range(len(examples)))})

    def total_reward(prompts, completions, row, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        records = [examples[i].record for i in row]
        batch = ScoringBatch(texts, [parse_question(t) for t in texts], records, [r.language for r in records],
                             [False] * len(texts), G)  # fmt: skip
        total = sum(cb.weight * torch.as_tensor(cb.score(batch).values) for cb in rewards)
        return total.tolist()

    class _T(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.begin()

        def on_step_end(self, *a, **k):
            timer.end()

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, per_device_train_batch_size=PROMPTS * G,
        num_generations=G, max_completion_length=args.max_new_tokens, beta=0.0, learning_rate=LR, lr_scheduler_type="constant",
        temperature=1.0, top_p=1.0, num_iterations=1, steps_per_generation=1, gradient_checkpointing=False, bf16=False,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=100, seed=0, disable_tqdm=True, loss_type="grpo",
    )  # fmt: skip
    peft = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(embedded_path()), reward_funcs=total_reward, args=config,
                          train_dataset=dataset, processing_class=dm.tokenizer, peft_config=peft, callbacks=[_T()])  # fmt: skip
    trainer.train()
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best round of each counts")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    dm = QuestionDataModule(batch_size=PROMPTS, max_length=512)
    dm.setup("fit")
    rewards = make_rewards(dm)
    rounds: dict[str, list[Timer]] = {"qgen": [], "trl": []}
    for _ in range(args.rounds):  # alternate, so drift in machine speed hits both alike
        rounds["qgen"].append(run_qgen(dm, rewards, args))
        rounds["trl"].append(run_trl(dm, rewards, args))
    qgen_t, trl_t = (min(rounds[k], key=lambda t: t.s_per_step) for k in ("qgen", "trl"))
    every = {k: ", ".join(f"{t.s_per_step:.2f}" for t in v) for k, v in rounds.items()}
    print(f"\nGRPO throughput, embedded default, {PROMPTS} prompts x G={G}, max_new_tokens {args.max_new_tokens}, "
          f"beta 0, {args.steps} timed steps")  # fmt: skip
    print(f"{'trainer':<18} {'s/step':>8} {'steps/s':>8} {'ratio':>6}  all rounds (s/step)")
    for name, key, t in (("qgen GRPOModule", "qgen", qgen_t), ("TRL GRPOTrainer", "trl", trl_t)):
        ratio = trl_t.s_per_step / t.s_per_step
        print(f"{name:<18} {t.s_per_step:>8.2f} {1 / t.s_per_step:>8.3f} {ratio:>6.2f}  {every[key]}")
    print(f"grpo_steps_per_s_ratio_vs_trl={trl_t.s_per_step / qgen_t.s_per_step:.2f}")


if __name__ == "__main__":
    main()
