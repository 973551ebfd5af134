"""``QuestionDataModule``: the one data pipeline every stage shares.

Sources (MATH, GAOKAO-Bench, TAL-SCQ5K, generic JSONL, HF datasets) are read into one record schema
(:mod:`qgen.records`), split deterministically into train / val / test by a hash of (seed, source, id),
turned into chat examples by the task mixture (:mod:`qgen.tasks`), rendered with the backbone's chat
template and tokenized once, with the loss on assistant tokens only.

Two details make training exact rather than approximately right:

- **Resumable order.** The train sampler's order is a pure function of (seed, epoch); the train loader's
  ``state_dict`` (in the checkpoint) records how many batches of the epoch were consumed, and on
  ``--ckpt_path`` resume the sampler starts after them instead of re-reading the epoch from its start.
- **Token-exact gradient accumulation.** Each sample carries the number of target tokens in its whole
  optimizer step (all micro-batches, all ranks), so the loss is normalised by the step's token count: an
  accumulated step of 4 x 2 gives the same gradient as one batch of 8 (the per-micro-batch mean does not).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from qgen.models import BUNDLED_DATA, load_tokenizer
from qgen.prompts import (
    PromptDataset,
    build_prompt_items,
    collate_prompts,
    prompt_record,
    read_prompts,
    split_prompt_rows,
)
from qgen.records import DataError, Question, read_source
from qgen.tasks import TASKS, Example, build_examples

DEFAULT_MIXTURE = {"historical": 0.5, "variant": 0.3, "innovative": 0.2}
IGNORE_INDEX = -100


def split_of(rec: Question, seed: int, val_fraction: float, test_fraction: float) -> str:
    """``train`` / ``val`` / ``test`` from a hash of (seed, source, id): stable when sources are added."""
    u = int(hashlib.sha1(f"{seed}:{rec.source}:{rec.id}".encode()).hexdigest()[:12], 16) / 16**12
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def render_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, truncated)``; labels are ``IGNORE_INDEX`` outside the assistant reply.

    The prompt is rendered with the generation prompt exactly as at sampling time; the completion is the
    rest of the full conversation's rendering (for Qwen3, ``enable_thinking=False`` keeps the empty think
    block on the prompt side of both).
    """
    kwargs = {"tokenize": False, "enable_thinking": False}
    prompt = tokenizer.apply_chat_template(example.messages[:-1], add_generation_prompt=True, **kwargs)
    full = tokenizer.apply_chat_template(example.messages, **kwargs)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    return ids, labels, len(prompt_ids) + len(target_ids) > max_length


class TokenizedDataset(Dataset):
    """Pre-tokenized examples. An index may be ``(i, step_tokens)``, from :class:`ResumableSampler`."""

    def __init__(self, examples: list[Example], input_ids: list[list[int]], labels: list[list[int]]):
        self.examples, self.input_ids, self.labels = examples, input_ids, labels
        self.target_tokens = [sum(t != IGNORE_INDEX for t in lab) for lab in labels]
        self.lengths = [len(x) for x in input_ids]
        self.prompt_lengths = [next((k for k, t in enumerate(lab) if t != IGNORE_INDEX), len(lab)) for lab in labels]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int | tuple) -> dict[str, Any]:
        i, step_tokens, window, micro = (tuple(index) + (None, None, None))[:4] if isinstance(index, tuple) else (
            index, None, None, None)  # fmt: skip
        item = {
            "input_ids": self.input_ids[i],
            "labels": self.labels[i],
            "index": i,
            "prompt_length": self.prompt_lengths[i],
        }
        if step_tokens is not None:
            item["step_tokens"] = step_tokens
        if window is not None:
            item["step_window"], item["micro_index"] = window, micro
        return item


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.tensor(it["input_ids"])
        labels[row, :n] = torch.tensor(it["labels"])
        mask[row, :n] = 1
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "index": torch.tensor([it["index"] for it in items]),
        "prompt_lengths": torch.tensor([it["prompt_length"] for it in items]),
    }
    if "step_tokens" in items[0]:
        batch["step_tokens"] = torch.tensor(items[0]["step_tokens"], dtype=torch.float32)
    if "step_window" in items[0]:  # the whole optimizer step's micro-batches on this rank (GRPO's rollout buffer)
        batch["step_window"] = items[0]["step_window"]
        batch["micro_index"] = items[0]["micro_index"]
    return batch


class ResumableSampler(DistributedSampler):
    """Shuffled, rank-sharded order that is a pure function of (seed, epoch), able to start mid-epoch.

    Subclassing ``DistributedSampler`` tells Lightning not to replace it under DDP. Each yielded index is
    ``(i, step_tokens)`` where ``step_tokens`` = target tokens of the whole optimizer step (every
    micro-batch of every rank) / (world size x accumulation): the per-micro-batch loss ``sum / step_tokens``
    then averages, over Lightning's division by the accumulation count and DDP's mean over ranks, to the
    step's exact token-mean. With ``with_window`` the index also carries the step's micro-batches on this
    rank (a tuple of index tuples) and this micro-batch's position among them: GRPO generates the whole
    step's rollouts at its first micro-batch from them.
    """

    GROUP_CHUNK = 32  # global batches sorted together when grouping by length

    def __init__(self, dataset: TokenizedDataset, batch_size: int, accumulate: int, num_replicas: int = 1,
                 rank: int = 0, shuffle: bool = True, seed: int = 0, group_by_length: bool = False,
                 with_window: bool = False):  # fmt: skip
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size, self.accumulate, self.group_by_length = batch_size, accumulate, group_by_length
        self.with_window = with_window
        self.target_tokens = dataset.target_tokens
        self.resume_epoch, self.resume_skip = -1, 0

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start the next iteration of ``epoch`` after ``batches`` already-consumed batches."""
        self.resume_epoch, self.resume_skip = epoch, batches * self.batch_size

    def __iter__(self):
        order = self._global_order()
        shards = [order[r :: self.num_replicas] for r in range(self.num_replicas)]
        window = self.batch_size * self.accumulate
        start = self.resume_skip if self.epoch == self.resume_epoch else 0
        self.resume_epoch, self.resume_skip = -1, 0
        local = shards[self.rank]
        for w in range(0, len(local), window):
            total = sum(self.target_tokens[i] for shard in shards for i in shard[w : w + window])
            step_tokens = max(total, 1) / (self.num_replicas * self.accumulate)
            part = local[w : w + window]
            micro = tuple(tuple(part[b : b + self.batch_size]) for b in range(0, len(part), self.batch_size))
            for pos in range(max(w, start), min(w + window, len(local))):
                if self.with_window:
                    yield local[pos], step_tokens, micro, (pos - w) // self.batch_size
                else:
                    yield local[pos], step_tokens

    def _global_order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(len(self.dataset)))
            return order + order[: self.total_size - len(order)]
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        order += order[: self.total_size - len(order)]  # pad as DistributedSampler does
        if self.group_by_length:
            order = self._group(order, g)
        return order

    def _group(self, order: list[int], g: torch.Generator) -> list[int]:
        """Length-grouped batches: within chunks of ``GROUP_CHUNK`` global batches, sort by length and cut
        into batches (one per rank in turn), then shuffle the batches. Padding shrinks to a few tokens per
        batch while the order stays random at the batch level.
        """
        global_batch = self.batch_size * self.num_replicas
        chunk = global_batch * self.GROUP_CHUNK
        lengths = self.dataset.lengths
        out: list[int] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
            # batch k of rank r takes part[(k * R + r) * bs : ...]: consecutive lengths land in one batch
            batches = [part[b : b + global_batch] for b in range(0, len(part), global_batch)]
            bs, replicas = self.batch_size, self.num_replicas
            for k in torch.randperm(len(batches), generator=g).tolist():
                rows = batches[k]
                # interleaved, so that the rank-strided split in __iter__ gives rank r the run rows[r*bs:(r+1)*bs]
                out.extend(rows[r * bs + j] for j in range(bs) for r in range(replicas) if r * bs + j < len(rows))
        return out


class StatefulDataLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable (its ``_Stateful`` protocol).

    Its state is the number of batches of the current epoch that the trainer consumed (read from the
    trainer's progress counters, so prefetched batches do not count); ``load_state_dict`` makes the
    :class:`ResumableSampler` start after them.
    """

    def __init__(self, *args: Any, progress: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.progress = progress  # () -> (epoch, batches consumed in it)

    def state_dict(self) -> dict[str, int]:
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "epoch" in state and isinstance(self.sampler, ResumableSampler):
            self.sampler.resume_at(state["epoch"], state["batches"])


def _resolve_path(path: str) -> str:
    """Relative paths are read from the working directory, else from the project root."""
    if os.path.isabs(path) or os.path.exists(path) or glob.glob(path):
        return path
    candidate = os.path.join(os.path.dirname(BUNDLED_DATA), path)
    return candidate if os.path.exists(candidate) or glob.glob(candidate) else path


class QuestionDataModule(L.LightningDataModule):
    """Competition and gaokao question banks for SFT, GRPO and distillation.

    Args:
        sources: list of ``{format, path, name?, mapping?, split?, skip_invalid?, <record defaults>}``;
            ``format`` is one of math, gaokao_bench, tal_scq, jsonl, hf. Relative paths are read from the
            working directory, else from the project root.
        tokenizer: tokenizer folder or hub id; ``null`` = the embedded default (linked to the model's backbone).
        task_mixture: weights of the tasks historical / variant / innovative.
        variant_similarity: TF-IDF similarity range ``[low, high)`` of a condition variant's partner question.
        max_length: tokens per example; longer examples are truncated and counted.
        batch_size: examples per micro-batch (per device).
        val_fraction: share of records held out for validation.
        test_fraction: share of records held out for testing.
        seed: seed of the split, the task assignment and the sampling order.
        order_seed: seed of the training order alone (default: ``seed``): reruns with other batch orders
            over the same split and examples (paired seeds in benchmarks and ablations).
        skip_invalid: skip records with missing fields in every source (counted) instead of failing.
        group_by_length: batch training examples of similar length (random order of batches), which
            cuts padding; ``false`` = plain shuffling.
        num_workers: DataLoader workers.
        predict_prompts: ``predict``: a JSONL file of prompts (see :mod:`qgen.generation`); ``null`` =
            prompts for the records of ``predict_split``.
        predict_split: ``predict`` without a prompts file: ``train``, ``val`` or ``test``.
        predict_samples: questions per prompt (a prompt row's own ``n`` wins).
    """

    def __init__(
        self,
        sources: list[dict[str, Any]] | None = None,
        tokenizer: str | None = None,
        task_mixture: dict[str, float] | None = None,
        variant_similarity: tuple[float, float] = (0.3, 0.85),
        max_length: int = 1024,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        seed: int = 42,
        order_seed: int | None = None,
        skip_invalid: bool = False,
        group_by_length: bool = True,
        num_workers: int = 0,
        predict_prompts: str | None = None,
        predict_split: Literal["train", "val", "test"] = "test",
        predict_samples: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.sources = sources if sources is not None else [{"format": "jsonl", "path": "data/*.jsonl"}]
        self.task_mixture = task_mixture if task_mixture is not None else dict(DEFAULT_MIXTURE)
        problems = []
        if not self.sources:
            problems.append("data.sources is empty: name at least one source")
        for i, src in enumerate(self.sources):
            if not isinstance(src, dict) or "format" not in src or "path" not in src:
                problems.append(f"data.sources[{i}] needs 'format' and 'path', got {src!r}")
        if set(self.task_mixture) - set(TASKS) or sum(self.task_mixture.values()) <= 0:
            problems.append(f"data.task_mixture must weight {list(TASKS)}, got {self.task_mixture}")
        if not 0 <= val_fraction + test_fraction < 1:
            problems.append("data.val_fraction + data.test_fraction must be in [0, 1)")
        if max_length < 8 or batch_size < 1:
            problems.append("data.max_length must be >= 8 and data.batch_size >= 1")
        if predict_samples < 1:
            problems.append("data.predict_samples must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))
        self.records: dict[str, list[Question]] | None = None
        self.datasets: dict[str, TokenizedDataset] = {}
        self.summary: dict[str, Any] = {}
        self.tokenizer = None
        self.skip_prediction_keys: set[str] = set()  # filled by callbacks.PredictionWriter on a rerun

    # -------------------------------------------------------------------------------------------- loading
    def load_records(self) -> dict[str, list[Question]]:
        """Read every source (errors name the file and line) and split the records; cached."""
        if self.records is not None:
            return self.records
        per_source, skipped, records = {}, {}, []
        for src in self.sources:
            opts = dict(src)
            opts.setdefault("skip_invalid", self.hparams.skip_invalid)
            opts["path"] = _resolve_path(str(opts["path"]))
            result = read_source(**opts)
            name = src.get("name") or f"{src['format']}:{src['path']}"
            per_source[name] = per_source.get(name, 0) + len(result.records)
            skipped[name] = skipped.get(name, 0) + result.skipped
            records.extend(result.records)
        split = {"train": [], "val": [], "test": []}
        hp = self.hparams
        for rec in records:
            split[split_of(rec, hp.seed, hp.val_fraction, hp.test_fraction)].append(rec)
        if not split["train"]:
            raise DataError("no training records after the split: add data or lower val_fraction/test_fraction")
        self.records = split
        self.summary = {"records_per_source": per_source, "skipped_invalid": skipped,
                        "split": {k: len(v) for k, v in split.items()}}  # fmt: skip
        return split

    def prepare_data(self) -> None:
        # Parse and validate before any log directory or config file is written: bad input fails first.
        self.load_records()
        if self.hparams.predict_prompts:
            read_prompts(_resolve_path(self.hparams.predict_prompts))

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        records = self.load_records()
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        tasks, truncated, dropped = Counter(), Counter(), Counter()
        fallback = 0
        for name, recs in records.items():
            if not recs:
                continue
            examples, stats = build_examples(
                recs, self.task_mixture, self.hparams.seed, *self.hparams.variant_similarity
            )
            fallback += stats.variant_fallback
            kept, ids, labels = [], [], []
            for ex in examples:
                x, y, cut = render_example(self.tokenizer, ex, self.hparams.max_length)
                if all(t == IGNORE_INDEX for t in y):
                    dropped[name] += 1  # the prompt alone fills max_length: nothing to learn from
                    continue
                truncated[name] += cut
                tasks[f"{name}/{ex.task}"] += 1
                kept.append(ex), ids.append(x), labels.append(y)
            self.datasets[name] = TokenizedDataset(kept, ids, labels)
        self.summary.update(
            examples_per_task=dict(sorted(tasks.items())),
            variant_fallback_to_historical=fallback,
            truncated=dict(truncated),
            dropped_prompt_too_long=dict(dropped),
            max_length=self.hparams.max_length,
        )
        self._write_summary()

    def _write_summary(self) -> None:
        trainer = self.trainer
        # trainer.log_dir is a collective under DDP: every rank calls it. Without a logger there is no run
        # directory (log_dir would be the working directory): the summary is printed only.
        log_dir = trainer.log_dir if trainer is not None and trainer.logger is not None else None
        if trainer is not None and trainer.global_rank != 0:
            return
        print("data summary:\n" + json.dumps(self.summary, indent=2, ensure_ascii=False))
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, "data_summary.json"), "w", encoding="utf-8") as fh:
                json.dump(self.summary, fh, indent=2, ensure_ascii=False)

    # ---------------------------------------------------------------------------------------- dataloaders
    def _loader(self, dataset: Dataset, sampler=None, cls: type[DataLoader] = DataLoader, **kwargs: Any) -> DataLoader:
        return cls(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
            # a private generator: creating an iterator must not draw from the global RNG, or a resumed
            # run's dropout masks would differ from the uninterrupted run's
            generator=torch.Generator().manual_seed(self.hparams.seed),
            **kwargs,
        )

    def _progress(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = ResumableSampler(
            self.datasets["train"],
            batch_size=self.hparams.batch_size,
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            seed=self.hparams.seed if self.hparams.order_seed is None else self.hparams.order_seed,
            group_by_length=self.hparams.group_by_length,
            with_window=bool(getattr(trainer.lightning_module, "needs_step_window", False)) if trainer else False,
        )
        return self._loader(self.datasets["train"], sampler, StatefulDataLoader, progress=self._progress)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets.get("val") or self.datasets["train"])

    def test_dataset(self) -> TokenizedDataset:
        """The test split; the validation split when ``test_fraction`` is 0 (the training split as a last resort)."""
        return self.datasets.get("test") or self.datasets.get("val") or self.datasets["train"]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset())

    def predict_dataloader(self) -> DataLoader:
        """Generation prompts (see :mod:`qgen.generation`), minus the samples a rerun has already written."""
        hp = self.hparams
        if hp.predict_prompts:
            prompts = read_prompts(_resolve_path(hp.predict_prompts), hp.predict_samples)
            rows = []
            for row in prompts:
                rec, partner = prompt_record(row)
                fields = {k: row[k] for k in row if k not in ("n", "key_base")}
                rows.append((row["key_base"], rec, partner, row["task"], fields, None))
            counts = [row["n"] for row in prompts]
        else:
            records = self.load_records()[hp.predict_split]
            if not records:
                raise DataError(f"data.predict_split '{hp.predict_split}' has no records; set data.predict_prompts")
            rows, counts = split_prompt_rows(records), hp.predict_samples
        items = build_prompt_items(self.tokenizer, rows, counts, self.skip_prediction_keys)
        dataset, sampler = PromptDataset(items), None
        trainer = self.trainer
        from qgen.strategies import shards_weights

        if trainer is not None and shards_weights(trainer.strategy) and trainer.world_size > 1:
            # over sharded layers every rank must take the same number of generate calls: Lightning's predict
            # sampler gives ranks unequal shares (5 prompts: 3 and 2), so pad as training does, by repeating
            # prompts; the writer keeps one row per key
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                         shuffle=False)  # fmt: skip
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=False, sampler=sampler,
                          collate_fn=partial(collate_prompts, pad_id=self.tokenizer.pad_token_id))  # fmt: skip
