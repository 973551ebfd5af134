"""Generating questions with a trained module: ``predict`` (prompts file or a split) and ``test`` (metrics).

Every stage's module mixes in :class:`QuestionWriterMixin`, so ``python -m qgen predict`` and
``python -m qgen test`` work with the SFT, GRPO and distillation checkpoints alike:

- ``predict`` samples ``n`` questions for each prompt of ``data.predict_prompts`` (a JSONL file, read by
  :mod:`qgen.prompts`) or of the ``data.predict_split`` split. Each returned row holds the prompt fields, the raw text, the
  parsed question / answer / analysis / options (``valid`` false when it does not parse; kept, never
  dropped) and the generation settings. ``callbacks.PredictionWriter`` scores and writes them.
- ``test`` generates one question per example of the test split (the validation split when
  ``data.test_fraction`` is 0) and computes, against the reference question: BLEU-4 and ROUGE-L
  (characters for Chinese), novelty against the training questions (mean similarity, share above 0.85),
  distinct-1/2, self-BLEU, the parse-validity rate and the predicted-difficulty distribution. They are
  logged under ``test/`` and written to ``metrics.json`` in the run's log directory.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from qgen.backends import VLLMSpec, build_backend, request_seed
from qgen.backends.rollout import Rollout
from qgen.formatting import parse_question
from qgen.tasks import target_text
from qgen.watchdog import stage


@dataclass
class GenerationSpec:
    """Sampling settings of ``predict``, ``test`` and on-policy distillation.

    Args:
        max_new_tokens: completion length limit.
        temperature: sampling temperature; 0 = greedy decoding.
        top_p: nucleus sampling threshold.
        min_new_tokens: EOS is suppressed until this many tokens (0: off; benchmarks fix lengths with it).
    """

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    min_new_tokens: int = 0


# ------------------------------------------------------------------------------------------------- module
def parsed_row(text: str) -> dict[str, Any]:
    p = parse_question(text)
    return {"question": p.question, "answer": p.answer, "analysis": p.analysis, "options": p.options,
            "valid": p.valid, "problems": p.problems}  # fmt: skip


class QuestionWriterMixin:
    """``predict_step`` / ``test_step`` for every stage's LightningModule (see the module docstring)."""

    def _settings(self, key: str, cls):
        """The ``cls`` dataclass held in ``hparams[key]`` (a plain dict in checkpoints; defaults when absent)."""
        spec = self.hparams.get(key)
        if spec is None:
            return cls()
        return cls(**spec) if isinstance(spec, dict) else spec

    def generation_spec(self) -> GenerationSpec:
        return self._settings("generation", GenerationSpec)

    def _tokenizer(self):
        tok = getattr(self, "tokenizer", None)
        return tok if tok is not None else self.trainer.datamodule.tokenizer

    # ------------------------------------------------------------------------------------ the one seam
    def vllm_spec(self) -> VLLMSpec:
        return self._settings("vllm", VLLMSpec)

    def generation_backend(self):
        """The module's generation backend (``model.backend``), built at its first use."""
        backend = getattr(self, "_generation_backend", None)
        if backend is None:
            hp = self.hparams
            name = hp.get("backend", "hf")
            device = self.trainer.strategy.root_device if self._trainer is not None else self.device
            backend = build_backend(name, self.vllm_spec(), hp.get("dtype", "float32"), device, hp.get("quantization"))
            self._generation_backend = backend
            self._hand_over_backend_state()  # a resumed run's engine state, restored before the engine existed
        return backend

    def generation_backend_state(self) -> dict:
        """The backend's state for a checkpoint (``{}`` when there is none, or no backend was built)."""
        backend = getattr(self, "_generation_backend", None)
        return backend.state_dict() if backend is not None else {}

    def resume_generation_backend(self, state: dict) -> None:
        """A checkpoint's backend state, handed to the backend when it is built (now, if it already is)."""
        self._backend_state = state
        self._hand_over_backend_state()

    def _hand_over_backend_state(self) -> None:
        backend, state = getattr(self, "_generation_backend", None), getattr(self, "_backend_state", None)
        if backend is not None and state:
            backend.load_state_dict(state)
            self._backend_state = {}

    def use_backend(self, backend) -> None:
        """Sample with ``backend`` (a :class:`qgen.backends.GenerationBackend`) from now on, closing the current one."""
        current = getattr(self, "_generation_backend", None)
        if current is not None and current is not backend:
            current.close()
        self._generation_backend = backend

    def seed_base(self) -> int:
        spec = self.vllm_spec()
        return spec.seed if spec.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", "0") or 0)

    def sample(self, prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
               top_p: float, min_new_tokens: int = 0, seed_keys: list | None = None,
               seed_step: int | None = None, reference: bool = False) -> Rollout:  # fmt: skip
        """``group_size`` completions of each prompt from the module's backend, whose weights are brought up to
        date first (the vLLM engine's schedule: ``model.vllm.sync_every``).

        ``seed_keys``: one key per prompt (its global index, or a prompt file's key); with ``seed_step`` (default:
        the global step) they seed each completion (:func:`qgen.backends.request_seed`) where the backend takes
        per-request seeds. ``reference``: sample the frozen reference policy (the backbone without the trained
        adapter; the solver's).
        """
        backend = self.generation_backend()
        step = self.global_step if self._trainer is not None else 0
        if backend.prepare(self.model, self._tokenizer(), step):
            self.engine_pushed_step = step  # the engine holds this step's weights (qgen.audit audits the step)
        seeds = None
        if seed_keys is not None:
            base, at = self.seed_base(), step if seed_step is None else seed_step
            seeds = [request_seed(base, at, key, k) for key in seed_keys for k in range(group_size)]
        with stage("generation"):  # its deadline: qgen.watchdog
            return backend.generate(self.model, self._tokenizer(), prompts, group_size, max_new_tokens, temperature,
                                    top_p, min_new_tokens, seeds, reference=reference)  # fmt: skip

    def dropout_active(self) -> bool:
        """Whether a forward of the trained model now drops activations (LoRA dropout in training mode)."""
        return any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in self.model.modules())

    def audit_engine(self, trainer_logp, engine, mask, ref_logp, batch_idx: int, log_gap: bool = False) -> None:
        """The policy/engine audit (:mod:`qgen.audit`) of GRPO and on-policy distillation: adds this micro-batch's
        gaps between the trainer's log-probs (the dropout-free policy) and the engine's to the step's audit; at the
        step's last micro-batch the audit judges the step over every rank's tokens (one reduction, the only
        device-to-host copy) and stops or warns (``model.vllm.audit``). Every rank calls it on the same
        micro-batches. ``log_gap``: log ``train/engine_logprob_absdiff_mean`` / ``_max`` here (where no
        importance-sampling statistics log them).
        """
        from qgen.audit import DEFAULT_THRESHOLDS, EngineAudit, EngineMismatchError

        spec = self.vllm_spec()
        if getattr(self, "_audit", None) is None:
            dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
            threshold = spec.audit_threshold or DEFAULT_THRESHOLDS.get(dtype, DEFAULT_THRESHOLDS["bfloat16"])
            self._audit = EngineAudit(threshold, spec.audit_patience, engine=self.generation_backend().name)
        gap = (trainer_logp - engine).abs()[mask]
        if log_gap:
            n, zero = mask.size(0), gap.new_zeros(())
            self.log("train/engine_logprob_absdiff_mean", gap.mean() if gap.numel() else zero, batch_size=n,
                     sync_dist=True)  # fmt: skip
            self.log("train/engine_logprob_absdiff_max", gap.max() if gap.numel() else zero, batch_size=n,
                     sync_dist=True, reduce_fx="max")  # fmt: skip
        to_ref = (ref_logp.to(engine) - engine).abs()[mask].sum() if ref_logp is not None else None
        self._audit.add(gap.sum(), gap.numel(), to_ref)  # device tensors: summed on the device
        if (batch_idx + 1) % max(self.trainer.accumulate_grad_batches, 1):
            return
        a = self._audit
        sums = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device)
                            for x in (a.total, a.count, a.to_reference, a.reference_count)])  # fmt: skip
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        a.total, a.count, a.to_reference, a.reference_count = sums.tolist()
        line = a.judge(self.global_step, getattr(self, "engine_pushed_step", None) == self.global_step)
        if line is None:
            return
        if spec.audit == "warn":
            if self.trainer.is_global_zero:
                print(f"qgen: warning: {line}", file=sys.stderr, flush=True)
            a.strikes.clear()
            return
        callback = self.trainer.checkpoint_callback
        folder = (callback.dirpath if callback is not None else None) or self.trainer.default_root_dir
        path = os.path.join(folder, f"engine-audit-step{self.global_step}.ckpt")
        self.trainer.save_checkpoint(path)  # before this step's update: the last state the engine was right for
        raise EngineMismatchError(f"{line}; the state before this step's update is in {path}")

    def _check_backend(self) -> None:
        self.generation_backend()  # a missing vLLM fails here, before any step, with one line

    on_fit_start = on_predict_start = on_test_start = _check_backend

    def teardown(self, stage: str) -> None:
        backend = getattr(self, "_generation_backend", None)
        if backend is not None:
            backend.close()
            self._generation_backend = None

    def _generate(self, prompts: list[list[int]], keys: list | None = None):
        spec = self.generation_spec()
        return self.sample(prompts, 1, spec.max_new_tokens, spec.temperature, spec.top_p, spec.min_new_tokens,
                           seed_keys=keys, seed_step=0)  # fmt: skip

    def _generated(self, positions: list[int], prompt_of, loader, key_of) -> list[tuple[str, bool]]:
        """``(text, truncated)`` for dataset ``positions``. With the vLLM backend, a wave of
        ``model.vllm.predict_wave`` prompts, the next ones this rank's loader will hand out, goes to the
        engine at once (continuous batching), and later batches take their rows from it.
        """
        if not self.generation_backend().wants_whole_waves:
            rollout = self._generate([prompt_of(p) for p in positions], [key_of(p) for p in positions])
            return list(zip(rollout.texts, rollout.truncated.tolist()))
        if self._wave_order[0] is not loader:  # this rank's positions in the order its sampler yields them
            # Lightning's predict loop wraps the batch sampler to record indices: iterating the wrapper would
            # restart the loop's own iterator, so read the sampler underneath
            batches = getattr(loader.batch_sampler, "_batch_sampler", loader.batch_sampler)
            batches = batches if batches is not None else ([i] for i in loader.sampler)
            order = [int(i) for b in batches for i in b]
            self._wave_order = (loader, order, {p: k for k, p in enumerate(order)})
        _, order, rank_of = self._wave_order
        wave = self._wave  # dataset position -> (text, truncated), generated and not yet handed out
        missing = {p for p in positions if p not in wave}
        if missing:
            start = min(rank_of.get(p, len(order)) for p in missing)
            span = {p for p in order[start : start + self.vllm_spec().predict_wave] if p not in wave} | missing
            span = sorted(span, key=lambda p: rank_of.get(p, len(order)))
            rollout = self._generate([prompt_of(p) for p in span], [key_of(p) for p in span])
            wave.update(zip(span, zip(rollout.texts, rollout.truncated.tolist())))
        return [wave.pop(p) for p in positions]

    @staticmethod
    def _loader(loaders, index: int = 0):
        return loaders[index] if isinstance(loaders, (list, tuple)) else loaders

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        loader = self._loader(self.trainer.predict_dataloaders, dataloader_idx)
        dataset = loader.dataset
        where = getattr(self, "_predict_positions", None)
        if where is None or where[0] is not dataset:
            where = (dataset, {item["key"]: i for i, item in enumerate(dataset.items)})
            self._predict_positions = where
        positions = [where[1][key] for key in batch["keys"]]
        rows = self._generated(positions, lambda i: dataset.items[i]["prompt_ids"], loader,
                               lambda i: dataset.items[i]["key"])  # fmt: skip
        settings = {**asdict(self.generation_spec()), "backend": self.hparams.get("backend", "hf")}
        return [
            {"key": key, **meta, "text": text, **parsed_row(text), "truncated": bool(cut), "generation": settings}
            for key, meta, (text, cut) in zip(batch["keys"], batch["meta"], rows)
        ]

    # ------------------------------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        self._test_rows: list[dict[str, Any]] = []
        self._wave: dict[int, tuple[str, bool]] = {}
        self._wave_order: tuple = (None, [], {})

    def on_predict_epoch_start(self) -> None:
        self._wave, self._wave_order = {}, (None, [], {})

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        dataset = self.trainer.datamodule.test_dataset()
        positions = batch["index"].tolist()
        rows = self._generated(positions, lambda i: dataset.input_ids[i][: dataset.prompt_lengths[i]],
                               self._loader(self.trainer.test_dataloaders), lambda i: f"test/{i}")  # fmt: skip
        for i, (text, cut) in zip(positions, rows):
            rec = dataset.examples[i].record
            self._test_rows.append({"id": rec.id, "language": rec.language, "subject": rec.subject,
                                    "reference": target_text(rec), "text": text, "truncated": bool(cut)})  # fmt: skip

    def on_test_epoch_end(self) -> None:
        rows = self._gather_test_rows()
        from qgen.scoring import QuestionScorer

        metrics = evaluate_generations(rows, QuestionScorer.for_datamodule(self.trainer.datamodule))
        for key, value in metrics.items():
            if isinstance(value, int | float) and value == value:
                self.log(f"test/{key}", float(value), sync_dist=False, rank_zero_only=True)
        log_dir = self.trainer.log_dir
        if self.trainer.is_global_zero and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, "metrics.json"), "w", encoding="utf-8") as fh:
                json.dump(metrics, fh, indent=2, ensure_ascii=False)
            with open(os.path.join(log_dir, "test_generations.jsonl"), "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            print("test metrics:\n" + json.dumps(metrics, indent=2, ensure_ascii=False))

    def _gather_test_rows(self) -> list[dict[str, Any]]:
        rows = self._test_rows
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        return rows


def evaluate_generations(rows: list[dict[str, Any]], scorer, threshold: float = 0.85) -> dict:
    """The ``test`` metrics of generated rows (``text``, ``reference``, ``language``, ``subject``), scored by the
    run's :class:`qgen.scoring.QuestionScorer`.
    """
    from qgen.metrics import generation_metrics
    from qgen.scoring import ScoringBatch

    if not rows:
        return {"examples": 0}
    parsed = [parse_question(r["text"]) for r in rows]
    texts, refs, langs = [r["text"] for r in rows], [r["reference"] for r in rows], [r["language"] for r in rows]
    batch = ScoringBatch(texts, parsed, [None] * len(rows), langs, [bool(r.get("truncated")) for r in rows],
                         subjects=[r["subject"] for r in rows])  # fmt: skip
    sims = scorer.similarity(batch, threshold)[0]
    difficulty = scorer.difficulty(batch)
    out: dict[str, Any] = {"examples": len(rows)}
    out.update(generation_metrics(texts, refs, langs))
    out.update({
        "parse_valid_rate": float(np.mean([p.valid for p in parsed])),
        # valid questions: the stated answer is the one the question's own solution reaches (qgen.answers)
        "answer_consistent_rate": float(np.mean([c.consistent is True for c in scorer.answer_checks(batch)])),
        "truncated_rate": float(np.mean([bool(r.get("truncated")) for r in rows])),
        "novelty_max_similarity_mean": float(np.mean(sims)),
        f"novelty_share_above_{threshold:g}": float(np.mean(sims > threshold)),
        "difficulty_mean": float(np.mean(difficulty)),
        "difficulty_std": float(np.std(difficulty)),
        "difficulty_histogram": np.histogram(difficulty, bins=5, range=(0.0, 1.0))[0].tolist(),
    })  # fmt: skip
    return out
