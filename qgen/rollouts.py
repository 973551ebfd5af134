"""The rollouts of one GRPO optimizer step: generated at its first micro-batch, consumed by all of them.

Why a buffer: two of GRPO's normalisers are properties of the whole optimizer step, not of one
micro-batch. DAPO's token mean divides by the completion tokens of every accumulated micro-batch on every
rank, and ``advantage: batch_std`` scales by the std of every reward of the step (TRL gathers it over all
processes). Both are known only once the whole step has generated. So at the step's first micro-batch
:class:`StepRollouts` generates the rollouts of all ``accumulate_grad_batches`` micro-batches on this rank
(the sampler hands each micro-batch the indices of the step's micro-batches), counts the completion tokens
over all ranks, and starts scoring; the later micro-batches take their share from it.

Scoring (reward callbacks, possibly an LLM judge over HTTP) runs in a background thread, one micro-batch
at a time: as soon as a chunk of the step's generation exists (by default the whole step, in one call) its
micro-batches are queued for scoring, in order, and they are scored while the next chunk generates and while
the earlier micro-batches run their forward and backward passes; :meth:`StepRollouts.micro` waits for a
micro-batch's own scores just before its loss (not for the whole step's: a judge that answers a step's
requests in several waves holds the first micro-batch only for the first wave), so rewards are never stale
(they are always of this step's samples, from the policy being updated). Every scorer is row- or
group-wise (the repetition bank grows only after the optimizer step), so scoring a micro-batch alone gives
what scoring the whole chunk would.

``generate`` (:meth:`StepRollouts.generate_and_score`) is any callable from token-id prompts to
:class:`qgen.backends.rollout.Rollout` chunks; GRPO passes its module's :meth:`sample` (the generation seam).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from qgen.backends.rollout import Rollout, concat_rollouts
from qgen.losses import group_advantages
from qgen.scoring import RewardOutput, aggregate
from qgen.watchdog import stage


@dataclass
class MicroRollout:
    """One micro-batch's share of the step: ``n`` completions (whole groups)."""

    rollout: Rollout
    prompts: list[list[int]]  # the micro-batch's prompts (one per group)
    rewards: torch.Tensor  # [n]
    advantages: torch.Tensor  # [n]
    components: dict[str, RewardOutput]  # each reward component, this micro-batch's rows
    token_normalizer: float  # the step's completion tokens over all ranks / (ranks x micro-batches)
    gen_seconds: float  # the step's generation time (shared by its micro-batches)


def _all_reduce_sum(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def _concat_outputs(outs: list[RewardOutput]) -> RewardOutput:
    if len(outs) == 1:
        return outs[0]
    factor = None if all(o.factor is None for o in outs) else np.concatenate(
        [o.factor if o.factor is not None else np.ones(len(o.values), np.float32) for o in outs])  # fmt: skip
    keys = set.intersection(*(set(o.extra) for o in outs))
    return RewardOutput(np.concatenate([np.asarray(o.values) for o in outs]), factor,
                        {k: np.concatenate([o.extra[k] for o in outs]) for k in keys})  # fmt: skip


def _slice_output(out: RewardOutput, start: int, end: int) -> RewardOutput:
    return RewardOutput(
        out.values[start:end],
        None if out.factor is None else out.factor[start:end],
        {k: v[start:end] for k, v in out.extra.items()},
    )


class StepRollouts:
    """The rollouts, rewards and normalisers of one optimizer step on this rank. Constructing it only sets the
    step up; :meth:`generate_and_score` generates the rollouts and queues their scoring.

    Args:
        key: identifies the step (the trainer's global step and the micro-batches' indices).
        micro_prompts: for each micro-batch from ``first`` on, its prompts (token ids).
        micro_records: for each micro-batch, the records behind its prompts (one per prompt).
        first: position of the first generated micro-batch in the step (0 unless resumed mid-step).
        group_size: completions per prompt.
        score: ``(rollout, records per completion) -> (rewards [n], components)``, called once per scoring
            unit, in order, from one background thread: a unit is the part of a chunk that falls in one
            micro-batch (the whole micro-batch unless a chunk boundary cuts it).
        advantage: the advantage mode (:func:`qgen.losses.group_advantages`).
        micro_batches: the step's number of micro-batches (``accumulate_grad_batches``); with the world size
            it turns the step's token count into the per-micro-batch normaliser.
        world_size: ranks taking part.
        background: score in a thread while later chunks generate and the first micro-batch runs its forward passes.
        pad_id: the tokenizer's padding id (to join the chunks).
        prefetch: called with each chunk right after it is generated, before it is queued for scoring: scorers
            with slow I/O (an LLM judge) start their requests here, so they overlap everything that follows.
        reward_aggregation: ``sum_then_normalize`` (the weighted sum of the components is the reward whose
            group-relative advantage is taken, with ``advantage``) or ``normalize_then_sum`` (each component
            is standardised within its group first, then weighted and summed, as TRL's multi-objective
            option: components of very different spreads then count by their weights, not their spreads).
            The near-copy penalty multiplies every component before it is standardised.
        weights: each component's weight (``normalize_then_sum``).
    """

    def __init__(self, key, micro_prompts: list[list[list[int]]], micro_records: list[list], first: int,
                 group_size: int, score: Callable, advantage: str, micro_batches: int, world_size: int = 1,
                 background: bool = True, pad_id: int = 0, prefetch: Callable[[Rollout], None] | None = None,
                 reward_aggregation: str = "sum_then_normalize", weights: dict[str, float] | None = None):  # fmt: skip
        if reward_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ValueError("reward_aggregation must be sum_then_normalize or normalize_then_sum, "
                             f"got {reward_aggregation!r}")
        self.key, self.first, self.group_size, self.advantage = key, first, group_size, advantage
        self.micro_prompts = micro_prompts
        self.records = [r for mr in micro_records for r in mr for _ in range(group_size)]  # one per completion
        self.score, self.prefetch, self.pad_id = score, prefetch, pad_id
        self.micro_batches, self.world_size, self.background = micro_batches, world_size, background
        bounds, start = [], 0
        for mp in micro_prompts:
            bounds.append((start, start + len(mp) * group_size))
            start += len(mp) * group_size
        self.bounds = bounds
        self.reward_aggregation, self.weights = reward_aggregation, dict(weights or {})
        self._pool: ThreadPoolExecutor | None = None
        self._scores: list[Future | tuple] = []  # per scoring unit
        self._unit_rows: list[tuple[int, int]] = []
        self._joined: dict[int, tuple] = {}  # scoring unit -> (rewards, components)
        self._batch_advantages: torch.Tensor | None = None
        # per micro-batch, the reference log-probs computed early (while waiting for an earlier micro-batch's
        # scores): the frozen reference does not change within the step, so they are exact when used later
        self.ref_logprobs: dict[int, torch.Tensor] = {}
        self.rollout: Rollout | None = None
        self.rollouts: list[Rollout] = []

    def _score(self, unit: Rollout, records: list):
        with stage("scoring"):  # its deadline: qgen.watchdog
            return self.score(unit, records)

    def generate_and_score(self, generate: Callable[[list[list[int]]], Iterable[Rollout]]) -> StepRollouts:
        """Generate the step's rollouts with ``generate`` (``prompts -> iterable of Rollout``: the step's prompts in
        chunks of whole prompts, in order) and queue each chunk's micro-batches for scoring as soon as it exists
        (in the background thread, while the next chunk generates); then count the step's completion tokens over
        all ranks (a collective: every rank calls this once per step). Returns ``self``.
        """
        prompts = [p for mp in self.micro_prompts for p in mp]
        # each micro-batch is scored as soon as its rows exist (in the background), while the next chunk generates
        if self.background:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qgen-score")
        cuts = {b for bound in self.bounds for b in bound}
        chunks, done, started = [], 0, time.perf_counter()
        self.started = started  # when the step's first micro-batch began generating
        for chunk in generate(prompts):
            first, done = done, done + len(chunk.texts)
            chunks.append(chunk)
            if self.prefetch is not None:  # e.g. an LLM judge sends all of the chunk's requests now, in row order
                self.prefetch(chunk)
            edges = sorted({first, done} | {c for c in cuts if first < c < done})
            for a, b in zip(edges, edges[1:]):  # the chunk cut at micro-batch boundaries
                unit = chunk if (a, b) == (first, done) else chunk.select(a - first, b - first)
                self._unit_rows.append((a, b))
                if self._pool is not None:
                    self._scores.append(self._pool.submit(self._score, unit, self.records[a:b]))
                else:
                    self._scores.append(self._score(unit, self.records[a:b]))
        self.gen_seconds = time.perf_counter() - started
        self.rollout = concat_rollouts(chunks, self.pad_id)
        self.rollouts = [self.rollout.select(s, e) for s, e in self.bounds]
        local_tokens = float(self.rollout.completion_mask.sum())
        self.step_tokens = _all_reduce_sum(local_tokens)  # every rank generates its step: same call count
        self.token_normalizer = max(self.step_tokens, 1.0) / (self.world_size * self.micro_batches)
        return self

    def __len__(self) -> int:
        return len(self.rollouts)

    def rollout_of(self, micro: int) -> Rollout:
        """The rollout of micro-batch ``micro`` (its position in the step), without waiting for its scores."""
        return self.rollouts[micro - self.first]

    def _row_units(self, micro: int) -> list[int]:
        """The scoring units that hold micro-batch ``micro``'s rows."""
        start, end = self.bounds[micro - self.first]
        return [u for u, (a, b) in enumerate(self._unit_rows) if a < end and b > start]

    def ready(self, micro: int) -> bool:
        """Whether micro-batch ``micro``'s scores are in, so that :meth:`micro` would not wait (with
        ``batch_std`` every micro-batch counts: the std is over the whole step).
        """
        units = range(len(self._scores)) if self.advantage == "batch_std" else self._row_units(micro)
        return all(u in self._joined or not isinstance(self._scores[u], Future) or self._scores[u].done()
                   for u in units)  # fmt: skip

    def _unit_scores(self, units: list[int]) -> tuple[torch.Tensor, dict[str, RewardOutput]]:
        """Rewards and components of the rows of ``units`` (consecutive), waiting for their scoring."""
        for u in units:
            if u not in self._joined:
                s = self._scores[u]
                self._joined[u] = s.result() if isinstance(s, Future) else s
        parts = [self._joined[u] for u in units]
        rewards = torch.cat([torch.as_tensor(r, dtype=torch.float32).reshape(-1) for r, _ in parts]).detach()
        return rewards, {name: _concat_outputs([c[name] for _, c in parts]) for name in parts[0][1]}

    def micro(self, micro: int) -> MicroRollout:
        """Micro-batch ``micro``'s share with its scores: waits only for its own rows' scoring (every
        micro-batch's with ``advantage: batch_std``, whose std is over the whole step), so the later
        micro-batches' scoring keeps overlapping this one's forward and backward passes.
        """
        i = micro - self.first
        start, end = self.bounds[i]
        g = self.group_size
        if self.advantage == "batch_std":
            if self._batch_advantages is None:  # every rank joins here at its first micro-batch (a collective)
                rewards, _ = self._unit_scores(list(range(len(self._scores))))
                self._batch_advantages = group_advantages(rewards.view(-1, g), self.advantage).view(-1)
            advantages = self._batch_advantages[start:end]
        units = self._row_units(micro)
        self.ref_logprobs.pop(micro, None)
        rewards, components = self._unit_scores(units)
        offset = start - self._unit_rows[units[0]][0]
        rewards = rewards[offset : offset + end - start]
        components = {k: _slice_output(v, offset, offset + end - start) for k, v in components.items()}
        if self.reward_aggregation == "normalize_then_sum":
            advantages = torch.as_tensor(aggregate(components, self.weights, group_size=g))
        elif self.advantage != "batch_std":
            advantages = group_advantages(rewards.view(-1, g), self.advantage).view(-1)
        if len(self._joined) == len(self._scores) and self._pool is not None:
            self._pool.shutdown(wait=False)
        return MicroRollout(
            rollout=self.rollouts[i],
            prompts=self.micro_prompts[i],
            rewards=rewards,
            advantages=advantages,
            components=components,
            token_normalizer=self.token_normalizer,
            gen_seconds=self.gen_seconds,
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
