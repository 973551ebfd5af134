"""GRPO throughput, like for like: qgen's GRPOModule vs TRL 1.16's GRPOTrainer.

Same work on every side (asserted, not assumed):
- the same model (the embedded default, fp32) and adapter: LoRA r=32 alpha=64 on all linear layers, dropout 0
  (TRL samples in training mode, qgen in eval mode: with dropout 0 both sample from the same policy);
- the **same prompts in the same order**: qgen's (recorded from its first run), handed to TRL unshuffled
  and checked token for token after TRL's own chat templating;
- the **same generation length**: EOS suppressed on both sides (``min_new_tokens = max_new_tokens``), so
  every step generates exactly ``prompts x G x max_new_tokens`` tokens (counted and printed);
- the same reward function with the same inputs: qgen's ``combine_scores`` over the four model-free scorers
  (difficulty, novelty, rigor, diversity; fitted once, shared), with each completion's truncation flag and
  token count and the near-copy penalty, on both sides;
- the same optimisation: beta 0.04 (a reference pass on both), clip range 0.2 / 0.28, per-sequence loss
  mean (``grpo``), group-std advantages, one update per generation, AdamW (torch's fused implementation)
  at a constant 1e-4 without weight decay, gradient-norm clipping at 1.0; the first ``--warmup`` steps are
  not timed (a step's time is end of step to end of step).

Sides (rounds alternate, every round printed):
- ``qgen`` / ``trl``: no gradient checkpointing; qgen with peft's own LoRA layers (as a GPU user runs it);
  both sample with ``transformers`` ``generate``, qgen after prefilling each prompt once for its group
  (``qgen.backends.hf.generate_group``), TRL with the prompt repeated ``G`` times (it has no such option);
- ``qgen-ckpt`` / ``trl-ckpt``: gradient checkpointing on both (non-reentrant), as configs/qwen3-14b-grpo.yaml
  runs; qgen still shares each prompt's forward pass across its group (the prompt pass is not checkpointed);
- ``qgen-fused``: qgen's default on CPU, its fused LoRA layers: a **CPU-only** speed-up.
- ``--backends hf,vllm`` (run it in the vLLM environment, README "Generation backends"; with TRL installed
  there): the four sides ``qgen`` / ``trl`` (``transformers`` generation) and ``qgen-vllm`` (``model.backend:
  vllm``, weights synced every step, importance-sampling correction on) / ``trl-vllm`` (``use_vllm=True,
  vllm_mode="colocate"``, TRL's own correction on), EOS suppressed on the vLLM sides through ``min_tokens``.
  A side that cannot run here is reported with its error instead of a time.

    python benchmarks/grpo_throughput.py [--steps 6] [--rounds 3] [--max-new-tokens 64] [--backends hf,vllm]

Needs the bench extra (``pip install -e ".[bench]"``). The last line is
``grpo_vs_trl=… grpo_vs_trl_ckpt=… [grpo_vllm_vs_trl_vllm=…] gen_tokens_per_step=…`` (medians over rounds of
per-round ratios of s/step). Generation tokens/s per side (tokens over time inside generation) are printed too.
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
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (benchmarks/common.py: what the sides share; model and machine)
from common import StepClock, constant_lr, fused_adamw  # noqa: E402

from callbacks import DifficultyReward, DiversityReward, NoveltyReward, RigorReward  # noqa: E402
from qgen.data import QuestionDataModule  # noqa: E402
from qgen.grpo import GRPOModule  # noqa: E402
from qgen.models import LoraSpec  # noqa: E402
from qgen.scoring import combine_scores  # noqa: E402

LR, PROMPTS, G, CLIP, SEED = 1e-4, 2, 8, 1.0, 0
SIDES = ["qgen", "trl", "qgen-ckpt", "trl-ckpt", "qgen-fused", "qgen-vllm", "trl-vllm"]


class Meter(StepClock):
    """Step ends, tokens generated per step and the prompts (dataset indices) in the order trained on."""

    def __init__(self, warmup: int):
        super().__init__(warmup)
        self.gen_tokens, self.prompts, self.gen_seconds = [], [], []
        self.error = ""

    @property
    def gen_tokens_per_s(self) -> float:
        timed = self.gen_seconds[self.warmup :]
        return sum(self.gen_tokens[self.warmup :]) / max(sum(timed), 1e-9)


def make_rewards(dm: QuestionDataModule) -> dict:
    rewards = [DifficultyReward(0.4), NoveltyReward(0.3), RigorReward(0.2), DiversityReward(0.1)]

    class _Trainer:  # what the callbacks' setup reads
        datamodule = dm

    for cb in rewards:
        cb.setup(_Trainer(), object(), "fit")
    return {cb.name: cb for cb in rewards}


def prompt_ids(dm: QuestionDataModule, i: int) -> list[int]:
    ds = dm.datasets["train"]
    return list(ds.input_ids[i][: ds.prompt_lengths[i]])


# ------------------------------------------------------------------------------------------------- qgen
def run_qgen(dm, rewards, args, meter: Meter, cpu_kernels: bool = False, checkpointing: bool = False,
             backend: str = "hf") -> None:  # fmt: skip
    from qgen.backends import VLLMSpec

    class Measure(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            meter.step_end()
            meter.gen_tokens.append(int(module.last["rollout"].completion_mask.sum()))
            meter.gen_seconds.append(module._rollouts.gen_seconds)
            meter.prompts.extend(int(i) for i in batch["index"])

    L.seed_everything(SEED)
    module = GRPOModule(model_name_or_path=args.model, dtype=args.dtype,
                        lora=LoraSpec(r=32, alpha=64, dropout=0.0, cpu_kernels=cpu_kernels), group_size=G,
                        max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, beta=0.04,
                        epsilon_low=0.2, epsilon_high=0.28, aggregation="grpo", advantage="group_std",
                        gradient_checkpointing=checkpointing, val_rewards=False, optimizer=fused_adamw(LR),
                        scheduler=constant_lr, backend=backend,
                        vllm=VLLMSpec(kv_cache_gib=1, max_model_len=1024))  # fmt: skip
    module.configure_model()
    for cb in rewards.values():
        module.register_reward(cb)
    L.Trainer(max_steps=args.warmup + args.steps, **common.lightning_kwargs(args), logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, gradient_clip_val=CLIP, callbacks=[Measure()]).fit(module, dm)  # fmt: skip


# -------------------------------------------------------------------------------------------------- TRL
def run_trl(dm, rewards, args, meter: Meter, order: list[int], checkpointing: bool = False,
            vllm: bool = False) -> None:  # fmt: skip
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    examples = dm.datasets["train"].examples
    dataset = Dataset.from_dict({"prompt": [examples[i].messages[:-1] for i in order], "row": order})

    def reward(prompts, completions, completion_ids, row, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        lengths = [len(ids) for ids in completion_ids]
        eos = dm.tokenizer.eos_token_id
        truncated = [eos not in ids for ids in completion_ids]  # qgen's flag: no EOS before the length limit
        total, _ = combine_scores(rewards, texts, [examples[i].record for i in row], truncated, G, lengths=lengths)
        meter.gen_tokens.append(sum(lengths))
        meter.prompts.extend(row[::G])
        return total.tolist()

    class StepEnd(TrainerCallback):
        def on_step_end(self, *a, **k):
            meter.step_end()

    length = {"min_tokens": args.max_new_tokens} if vllm else {"min_new_tokens": args.max_new_tokens}
    engine = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=1024,
                  vllm_importance_sampling_correction=True) if vllm else {}  # fmt: skip
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), seed=SEED, **common.trl_kwargs(args), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=PROMPTS * G, num_generations=G, gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens, generation_kwargs=length, **engine,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="grpo",
        scale_rewards="group", num_iterations=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch_fused", max_grad_norm=CLIP, gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, shuffle_dataset=False,
        chat_template_kwargs={"enable_thinking": False}, report_to=[], save_strategy="no", logging_steps=10_000,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    peft = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=common.hf_model(args), reward_funcs=reward,
                          args=config, train_dataset=dataset, processing_class=dm.tokenizer, peft_config=peft,
                          callbacks=[StepEnd()])  # fmt: skip
    ids = trainer._tokenize_prompts([examples[i].messages[:-1] for i in order[:4]])[0]
    assert [list(x) for x in ids] == [prompt_ids(dm, i) for i in order[:4]], "TRL tokenizes the prompts differently"
    generate = trainer._generate

    def timed(*a, **k):  # TRL's whole generation call, as qgen's gen_seconds
        started = time.perf_counter()
        out = generate(*a, **k)
        meter.gen_seconds.append(time.perf_counter() - started)
        return out

    trainer._generate = timed
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", nargs="+", default=None, choices=SIDES,
                        help="default: the five hf sides; --backends hf,vllm: qgen, trl, qgen-vllm, trl-vllm")  # fmt: skip
    parser.add_argument("--backends", default="hf", help="hf, or hf,vllm for the four-side vLLM comparison")
    common.add_machine_args(parser)
    args = parser.parse_args()
    if args.sides is None:
        args.sides = ["qgen", "trl", "qgen-vllm", "trl-vllm"] if "vllm" in args.backends else SIDES[:5]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    dm = QuestionDataModule(tokenizer=args.model, batch_size=PROMPTS, max_length=512, seed=SEED)
    dm.setup("fit")
    rewards = make_rewards(dm)
    expected_tokens = PROMPTS * G * args.max_new_tokens
    steps = args.warmup + args.steps
    order: list[int] = []
    rounds: dict[str, list[Meter]] = {side: [] for side in args.sides}
    print(f"{'round':>5}  {'side':<11} {'s/step':>7} {'gen tokens/step':>15} {'gen tokens/s':>13}")
    for r in range(args.rounds):  # alternate, so drift in machine speed hits every side alike
        for side in sorted(args.sides, key=lambda s: not s.startswith("qgen")):  # qgen first: its order for TRL
            meter = Meter(args.warmup)
            if side.startswith("qgen"):
                run_qgen(dm, rewards, args, meter, cpu_kernels=side == "qgen-fused", checkpointing=side == "qgen-ckpt",
                         backend="vllm" if side == "qgen-vllm" else "hf")  # fmt: skip
                order = order or list(meter.prompts)
            else:
                try:
                    run_trl(dm, rewards, args, meter, order, checkpointing=side == "trl-ckpt", vllm=side == "trl-vllm")
                except Exception as err:  # noqa: BLE001 - reported, the other sides still run
                    if side != "trl-vllm":
                        raise
                    meter.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                    print(f"{r:>5}  {side:<11} failed: {meter.error}", flush=True)
                    rounds[side].append(meter)
                    continue
            # the same work: qgen's prompts in qgen's order, exactly G x max_new_tokens tokens per prompt
            assert meter.prompts[: PROMPTS * steps] == order[: PROMPTS * steps], f"{side}: other prompts than qgen's"
            assert meter.gen_tokens == [expected_tokens] * steps, f"{side}: generated {meter.gen_tokens}"
            rounds[side].append(meter)
            print(f"{r:>5}  {side:<11} {meter.s_per_step:>7.3f} {expected_tokens:>15d} {meter.gen_tokens_per_s:>13.0f}",
                  flush=True)  # fmt: skip

    print(f"\nGRPO throughput, {common.describe(args)}, {PROMPTS} prompts x G={G} x {args.max_new_tokens} tokens (EOS "
          f"suppressed), beta 0.04, {args.steps} timed steps, {args.rounds} rounds")  # fmt: skip
    print(f"{'side':<11} {'s/step median':>13} {'gen tokens/s':>13}  every round (s/step)")
    for side, meters in rounds.items():
        if any(m.error for m in meters):
            print(f"{side:<11} did not run: {meters[0].error}")
            continue
        values = [m.s_per_step for m in meters]
        gen = statistics.median(m.gen_tokens_per_s for m in meters)
        print(f"{side:<11} {statistics.median(values):>13.3f} {gen:>13.0f}  {', '.join(f'{v:.3f}' for v in values)}")
    ratios = {"grpo_vs_trl": ("trl", "qgen"), "grpo_vs_trl_ckpt": ("trl-ckpt", "qgen-ckpt"),
              "grpo_fused_cpu_vs_trl": ("trl", "qgen-fused"), "grpo_vllm_vs_trl_vllm": ("trl-vllm", "qgen-vllm"),
              "grpo_vllm_vs_trl_hf": ("trl", "qgen-vllm"), "grpo_vllm_vs_hf": ("qgen", "qgen-vllm")}  # fmt: skip
    summary = []
    print(f"\n{'ratio (TRL s/step / qgen s/step)':<34} {'median':>6}  {'min':>5} {'max':>5}")
    for name, (ref, side) in ratios.items():
        if ref in rounds and side in rounds and not any(m.error for m in rounds[ref] + rounds[side]):
            per_round = [a.s_per_step / b.s_per_step for a, b in zip(rounds[ref], rounds[side])]
            print(f"{name:<34} {statistics.median(per_round):>6.2f}  {min(per_round):>5.2f} {max(per_round):>5.2f}")
            summary.append(f"{name}={statistics.median(per_round):.2f}")
    print(" ".join([*summary, f"gen_tokens_per_step={expected_tokens}"]))


if __name__ == "__main__":
    main()
