"""``StageModule``: what the SFT, GRPO and distillation modules share beyond the data.

- ``configure_model``: the subclass's :meth:`build_models`, then sharding where the strategy asks for it
  (:func:`qgen.strategies.shard_stage_models`: the policy and a distillation teacher);
- the backbone, loaded from ``model_name_or_path``, ``lora``, ``quantization``, ``dtype`` and
  ``gradient_checkpointing`` (:func:`qgen.models.load_causal_lm`);
- the optimizer over the trainable parameters and a per-step scheduler, from the YAML factories;
- slim checkpoints (trainable weights and RNG states only; :mod:`qgen.checkpointing`);
- ``predict`` / ``test`` generation (:class:`qgen.generation.QuestionWriterMixin`);
- the hyper-parameter checks every stage shares (:meth:`StageModule.init_stage`: attention kernel, Liger, the
  generation backend, quantization needs LoRA), and the strategy's start-up checks in :meth:`StageModule.setup`,
  so a plain ``L.Trainer(strategy=...)`` in a notebook is refused as the command line refuses it.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from typing import Any

import lightning as L
import torch

from qgen.backends import VLLMSpec, backend_problems
from qgen.checkpointing import continue_unfinished_epoch, restore_rng, slim_checkpoint
from qgen.generation import GenerationSpec, QuestionWriterMixin
from qgen.models import LoraSpec, check_attn_implementation, check_liger, load_causal_lm
from qgen.optim import configure_optimizers
from qgen.strategies import check_strategy, shard_stage_models


class StageModule(QuestionWriterMixin, L.LightningModule):
    """Base of every stage's LightningModule; subclasses set ``lora``, ``optimizer_factory`` and
    ``scheduler_factory`` and have the backbone arguments among their hyperparameters.
    """

    def init_stage(self, *, lora, quantization, attn_implementation: str, liger_kernels: bool, backend: str,
                   vllm, optimizer, scheduler, generation=None, problems: list[str] | tuple = ()) -> None:  # fmt: skip
        """The checks and normalisation every stage's ``__init__`` shares; call it right after ``super().__init__()``
        with the stage's own ``problems`` (one phrase each). Raises one ``ValueError`` naming every problem, then
        saves the caller's arguments as hyper-parameters (the factories excepted) in plain values.
        """
        check_attn_implementation(attn_implementation)
        check_liger(liger_kernels)
        vllm = VLLMSpec(**vllm) if isinstance(vllm, dict) else vllm
        found = backend_problems(backend, vllm, quantization) + list(problems)
        if quantization is not None and lora is None:
            found.append("model.quantization needs model.lora: quantized base weights cannot be fully fine-tuned")
        if found:
            raise ValueError("; ".join(found))
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], frame=inspect.currentframe().f_back)
        self.hparams["vllm"] = asdict(vllm)
        self.lora = LoraSpec(**lora) if isinstance(lora, dict) else lora
        self.hparams["lora"] = asdict(self.lora) if self.lora is not None else None  # plain values in checkpoints
        if isinstance(generation, GenerationSpec):
            self.hparams["generation"] = asdict(generation)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.model: torch.nn.Module | None = None
        self.strict_loading = False  # checkpoints hold trainable weights only

    def setup(self, stage: str) -> None:
        """The strategy's start-up checks (:func:`qgen.strategies.check_strategy`), under any ``Trainer``, before
        any model is built; then the tokenizer of the run's data.
        """
        if self._trainer is not None:
            device = self.trainer.strategy.root_device.type
            check_strategy(self.trainer.strategy, "gpu" if device == "cuda" else device, self.hparams)
            if self.trainer.datamodule is not None and hasattr(self, "tokenizer"):
                self.tokenizer = self.trainer.datamodule.tokenizer

    def global_ratio(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``sum(total) / sum(count)`` over every rank (a per-token mean of the whole step, not a mean of the
        ranks' means, which would weigh a rank with fewer tokens as much as one with more).
        """
        if self._trainer is None or self.trainer.world_size == 1:
            return total / count.clamp(min=1)
        return self.all_gather(total).sum() / self.all_gather(count).sum().clamp(min=1)

    def build_models(self) -> None:
        """Load ``self.model`` (and any frozen model the stage needs beside it)."""
        raise NotImplementedError

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.build_models()
        if self._trainer is not None:
            shard_stage_models(self.trainer.strategy, self.model, getattr(self, "teacher", None))

    def target_device(self) -> torch.device | None:
        """Where quantized weights must be loaded (the strategy's device), ``None`` outside a trainer."""
        return self.trainer.strategy.root_device if self._trainer is not None else None

    def builds_empty(self) -> bool:
        """Whether this rank builds its models on the meta device and receives its weights when sharded
        (:attr:`qgen.strategies.FSDP2Strategy.builds_empty`, :attr:`qgen.strategies.FSDP1Strategy.builds_empty`).
        """
        return self._trainer is not None and getattr(self.trainer.strategy, "builds_empty", False)

    def loads_on_rank0(self) -> bool:
        """Whether rank 0 alone loads the weights, for every rank (one host copy per node): quantized models
        then share rank 0's 4-bit layout when they load (``load_causal_lm(share_4bit=...)``).
        """
        return self._trainer is not None and getattr(self.trainer.strategy, "loads_on_rank0", False)

    def quant_storage(self, dtype: str) -> torch.dtype | None:
        """The dtype 4-bit weights are stored in under this run's strategy (FSDP1: its param dtype, as it
        flattens no integers); ``None``: bitsandbytes' default.
        """
        from qgen.models import _DTYPES

        storage = getattr(self.trainer.strategy, "quant_storage", None) if self._trainer is not None else None
        return storage(_DTYPES[dtype]) if storage is not None else None

    def load_backbone(self) -> torch.nn.Module:
        hp = self.hparams
        return load_causal_lm(hp.model_name_or_path, self.lora, hp.quantization, hp.dtype, hp.gradient_checkpointing,
                              device=self.target_device(),
                              attn_implementation=hp.get("attn_implementation", "sdpa"),
                              liger_kernels=hp.get("liger_kernels", False), empty=self.builds_empty(),
                              share_4bit=self.loads_on_rank0(), quant_storage=self.quant_storage(hp.dtype))  # fmt: skip

    def configure_optimizers(self):
        return configure_optimizers(
            self, self.optimizer_factory, self.scheduler_factory, self.trainer.estimated_stepping_batches
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        slim_checkpoint(self, checkpoint)  # trainable weights only: no frozen base, reference or teacher
        if self._trainer is not None:
            continue_unfinished_epoch(self.trainer, checkpoint)  # extending max_steps continues the epoch
        engine = self.generation_backend_state()
        if engine:  # e.g. the weights of the vLLM engine's latest push (model.vllm.sync_every > 1)
            checkpoint.setdefault("qgen", {})["engine"] = engine

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_rng(checkpoint)
        self.resume_generation_backend((checkpoint.get("qgen") or {}).get("engine") or {})
