"""Stage 2, GRPO: sample a group of questions per prompt, score them, push the policy towards the better ones.

One training step (DeepSeekMath, Shao et al. 2024, eq. 3-4):

1. for each prompt of the batch, ``group_size`` completions in one batched ``generate`` call (KV cache,
   left padding, stop at EOS), with dropout off;
2. rewards from the reward callbacks registered in ``setup`` (difficulty, novelty, rigor, diversity):
   ``total = sum_i w_i r_i``, times the novelty penalty where a question is a near-copy of a known one;
3. group-relative advantages (:func:`qgen.losses.group_advantages`);
4. the clipped-ratio loss with a k3 KL to the reference (:func:`qgen.losses.grpo_loss`). The reference is
   the same model with the LoRA adapter disabled (the policy GRPO started from, see ``init_from``), so no
   second copy of the model is held. Log-probs run
   each prompt through the decoder once per group and share its KV cache with the G completions
   (:func:`qgen.sampling.completion_logprobs`), which cuts the cost of the training forward and backward.

Departures from the paper: one policy update per rollout, so ``old_logp = logp.detach()`` (ratio 1 in
value, the clipped gradient path is kept general); asymmetric clipping (``epsilon_high``, from DAPO) and
the Dr. GRPO / DAPO aggregations are options. Optimisation is automatic, so gradient accumulation and
clipping stay in the trainer's YAML.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from qgen.generation import GenerationSpec
from qgen.losses import group_advantages, grpo_loss
from qgen.models import LoraSpec, add_lora, causal_lm_nll, load_policy, load_trainable_weights
from qgen.sampling import Rollout, completion_logprobs, generate_group
from qgen.scoring import RewardOutput, combine_scores
from qgen.sft import default_optimizer, default_scheduler
from qgen.stage import StageModule


class GRPOModule(StageModule):
    """Group Relative Policy Optimisation of a question writer, rewarded by the reward callbacks.

    Args:
        model_name_or_path: local HF folder or hub id; ``null`` = the embedded default tiny Qwen3.
        init_from: the policy to start from: a qgen ``.ckpt`` (SFT, full or LoRA) or a PEFT adapter folder. Its
            weights are merged into the base and a fresh adapter is trained on top, so the KL reference is
            that starting policy. With ``quantization`` (4-bit weights cannot take a merge) its adapter is
            trained further instead, and the reference is the quantized base model.
        lora: LoRA adapter settings (required: the reference policy is the backbone without the adapter).
        quantization: ``nf4`` or ``int8`` base weights (QLoRA).
        dtype: dtype of the base weights.
        gradient_checkpointing: recompute activations in backward.
        group_size: completions sampled per prompt.
        max_new_tokens: completion length limit; longer completions are truncated (and score lower rigor).
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        beta: KL coefficient (0 = no reference pass).
        epsilon_low: lower clip range of the ratio.
        epsilon_high: upper clip range of the ratio.
        advantage: ``group_std``, ``no_std``, ``median`` or ``batch_std`` (see ``group_advantages``).
        aggregation: ``grpo`` (per-sequence mean), ``dapo`` (token mean) or ``dr_grpo`` (constant normaliser).
        logprob_chunk_size: rows per chunk of the per-token log-prob computation.
        share_prompt_forward: run each prompt through the decoder once for its whole group (its KV cache is
            shared by the G completions) when computing log-probs; same values and gradients, a fraction of
            the cost. Ignored under gradient checkpointing, which disables the KV cache.
        optimizer: optimizer factory.
        scheduler: LR scheduler factory.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        init_from: str | None = None,
        lora: LoraSpec = LoraSpec(),
        quantization: Literal["nf4", "int8"] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        group_size: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        beta: float = 0.04,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.28,
        advantage: Literal["group_std", "no_std", "median", "batch_std"] = "group_std",
        aggregation: Literal["grpo", "dapo", "dr_grpo"] = "grpo",
        logprob_chunk_size: int = 1024,
        share_prompt_forward: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
    ):
        super().__init__()
        problems = []
        if lora is None:
            problems.append("model.lora is required: the GRPO reference is the backbone with the adapter disabled")
        if group_size < 2:
            problems.append("model.group_size must be >= 2 for group-relative advantages")
        if not (0 <= epsilon_low < 1 and epsilon_high >= 0 and beta >= 0 and temperature > 0 and 0 < top_p <= 1):
            problems.append("need 0 <= epsilon_low < 1, epsilon_high >= 0, beta >= 0, temperature > 0, 0 < top_p <= 1")
        if problems:
            raise ValueError("; ".join(problems))
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.lora = LoraSpec(**lora) if isinstance(lora, dict) else lora
        self.hparams["lora"] = asdict(self.lora)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.rewards: dict[str, Any] = {}  # name -> reward callback (registered in its setup)
        self.last: dict[str, Any] = {}  # the latest rollout and scores, read by callbacks after the step
        self.strict_loading = False

    # ---------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        if hp.init_from and hp.quantization is None:
            # the starting policy's weights become the base; a fresh adapter on top is trained, so the KL
            # reference (adapter disabled) is exactly the policy GRPO started from
            base = load_policy(hp.init_from, hp.model_name_or_path, hp.dtype, self.target_device())
            if hp.gradient_checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model = add_lora(base, self.lora, hp.gradient_checkpointing).train()
            return
        self.model = self.load_backbone()
        if hp.init_from:  # quantized base: the starting adapter itself is trained further
            load_trainable_weights(self.model, hp.init_from)

    def register_reward(self, callback: Any) -> None:
        self.rewards[callback.name] = callback

    def setup(self, stage: str) -> None:
        self.tokenizer = self.trainer.datamodule.tokenizer if self.trainer.datamodule is not None else None

    def generation_spec(self) -> GenerationSpec:
        """``predict`` / ``test`` sample as training does."""
        hp = self.hparams
        return GenerationSpec(hp.max_new_tokens, hp.temperature, hp.top_p)

    # ------------------------------------------------------------------------------------------- scoring
    def score(self, rollout: Rollout, records: list) -> tuple[torch.Tensor, dict[str, RewardOutput]]:
        if not self.rewards:
            raise RuntimeError(
                "GRPOModule has no reward callbacks: add callbacks.DifficultyReward etc. to trainer.callbacks"
            )
        total, outputs = combine_scores(self.rewards, rollout.texts, records, rollout.truncated.tolist(),
                                        rollout.group_size)  # fmt: skip
        return torch.as_tensor(total, device=self.device), outputs

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp, g = self.hparams, self.hparams.group_size
        prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], batch["prompt_lengths"])]
        examples = self.trainer.datamodule.datasets["train"].examples
        records = [examples[int(i)].record for i in batch["index"] for _ in range(g)]
        started = time.perf_counter()
        rollout = generate_group(self.model, self.tokenizer, prompts, g, hp.max_new_tokens, hp.temperature, hp.top_p)
        gen_seconds = time.perf_counter() - started
        rewards, components = self.score(rollout, records)  # [N]
        advantages = group_advantages(rewards.view(-1, g), hp.advantage).view(-1)  # [N]
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings().weight
        share = hp.share_prompt_forward and not hp.gradient_checkpointing
        logp = completion_logprobs(decoder, head, rollout, hp.logprob_chunk_size, share)  # [N, C]
        ref_logp = None
        if hp.beta > 0:
            with torch.no_grad(), self.model.disable_adapter():
                ref_logp = completion_logprobs(decoder, head, rollout, hp.logprob_chunk_size, share)
        out = grpo_loss(logp, logp.detach(), advantages, rollout.completion_mask, ref_logp, hp.beta,
                        hp.epsilon_low, hp.epsilon_high, hp.aggregation, hp.max_new_tokens)  # fmt: skip
        self.last.update(rollout=rollout, rewards=rewards.detach().cpu(), components=components, prompts=prompts)
        self._log_step(out, rollout, rewards, advantages, gen_seconds)
        return out.loss

    def _log_step(
        self, out, rollout: Rollout, rewards: torch.Tensor, advantages: torch.Tensor, gen_seconds: float
    ) -> None:
        g = self.hparams.group_size
        lengths = rollout.completion_mask.sum(-1).float()  # [N]
        stats = {
            "train/loss": out.loss.detach(),
            "train/reward_mean": rewards.mean(),
            "train/reward_std": rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()),
            "train/advantage_std": advantages.std() if advantages.numel() > 1 else advantages.new_zeros(()),
            "train/frac_zero_std": (rewards.view(-1, g).std(dim=1) < 1e-6).float().mean(),
            "train/kl": out.kl,
            "train/clipfrac": out.clipfrac,
            "train/ratio_mean": out.ratio_mean,
            "train/completion_len_mean": lengths.mean(),
            "train/completion_len_max": lengths.max(),
            "train/frac_truncated": rollout.truncated.float().mean(),
            "train/gen_tokens_per_s": lengths.sum() / max(gen_seconds, 1e-9),
            "train/lr": torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"]),
        }
        self.log_dict({k: v.float() for k, v in stats.items()}, prog_bar=False, batch_size=rewards.numel() // g)
        self.log("reward", rewards.mean(), prog_bar=True, logger=False, batch_size=rewards.numel() // g)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Validation is the SFT loss of the held-out questions: it shows drift away from the question bank."""
        out = causal_lm_nll(self.model, batch, chunk_size=self.hparams.logprob_chunk_size)
        self.log("val/loss", out.loss, batch_size=batch["input_ids"].size(0))
