"""Reward callbacks for GRPO: difficulty (0.4), novelty (0.3), rigor (0.2), diversity (0.1), and repetition.

The same callbacks are the distillation stage's *teacher cluster* (judges of the student's samples,
logged as ``train/judge_<name>_mean``); ``callbacks.judges`` adds the educational-value and LLM judges.

A callback's ``on_train_batch_end`` runs after the loss, so each reward callback *registers itself* with
the module in ``setup``; the module calls its ``score`` inside ``training_step``. After the step the
callback logs the mean and std of its component and updates its own state (the repetition bank). The
scoring itself is the run's :class:`qgen.scoring.QuestionScorer` (built once per run, shared with ``predict``,
``test`` and ``qgen score``): the callbacks configure and log, the scorer scores.

In YAML::

    trainer:
      callbacks:
        - class_path: callbacks.DifficultyReward
          init_args: {weight: 0.4}
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import Callback

from qgen.losses import gathered_std
from qgen.scoring import (
    DifficultyModel,
    NoveltyIndex,
    QuestionScorer,
    RewardOutput,
    ScoringBatch,
    group_diversity,
    rigor_gates,
)


class RewardCallback(Callback):
    """Base of the reward callbacks: registration with the module and per-step logging of the component."""

    name = "reward"

    def __init__(self, weight: float):
        if weight < 0:
            raise ValueError(f"{type(self).__name__}: weight must be >= 0, got {weight}")
        self.weight = weight

    def setup(self, trainer, pl_module, stage: str) -> None:
        if hasattr(pl_module, "register_reward"):
            pl_module.register_reward(self)

    def score(self, batch: ScoringBatch) -> RewardOutput:
        raise NotImplementedError

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        out = getattr(pl_module, "last", {}).get("components", {}).get(self.name)
        if out is None:
            return
        values = torch.as_tensor(out.values, dtype=torch.float32)
        n = max(1, values.numel() // max(1, pl_module.hparams.get("group_size", 1)))
        prefix = getattr(pl_module, "score_prefix", "reward")  # GRPO: rewards; distillation: the teacher cluster
        pl_module.log(f"train/{prefix}_{self.name}_mean", values.mean(), batch_size=n, sync_dist=True)  # over ranks
        if trainer.world_size > 1:  # the std of every rank's values (a collective: every rank logs each step)
            std = gathered_std(values)
        else:
            std = values.std() if values.numel() > 1 else values.new_zeros(())
        pl_module.log(f"train/{prefix}_{self.name}_std", std, batch_size=n)  # already global


class DifficultyReward(RewardCallback):
    """Predicted difficulty of the generated question (question + analysis), in [0, 1].

    The model is fitted in ``setup`` on the training records that carry a difficulty label (MATH level,
    TAL-SCQ difficulty, or any source with ``difficulty``); with fewer than 20 labels it is the seed's
    keyword/length heuristic. The fitted model is stored in the checkpoint and reloaded on resume.

    Args:
        weight: weight of this component in the total reward.
    """

    name = "difficulty"

    def __init__(self, weight: float = 0.4):
        super().__init__(weight)
        self.scorer: QuestionScorer | None = None

    @property
    def model(self) -> DifficultyModel | None:
        return self.scorer.difficulty_model if self.scorer is not None else None

    @model.setter
    def model(self, model: DifficultyModel) -> None:
        self.scorer = QuestionScorer(model)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.scorer is None and trainer.datamodule is not None:
            self.scorer = QuestionScorer.for_datamodule(trainer.datamodule)

    def score(self, batch: ScoringBatch) -> RewardOutput:
        return RewardOutput((self.scorer or QuestionScorer()).difficulty(batch))

    def state_dict(self) -> dict:
        if self.model is None or not self.model.fitted:
            return {}
        return {"difficulty_model": self.model.state()}  # plain arrays and strings: nothing to unpickle

    def load_state_dict(self, state_dict: dict) -> None:
        if "model" in state_dict:  # the pickled bytes that checkpoints of qgen <= 0.1.0 held
            raise ValueError(
                "DifficultyReward: this checkpoint stores the difficulty model as pickled bytes, which can run code "
                "when loaded; qgen refuses it. Start from the run's weights instead (model.init_from) and the "
                "difficulty model is refitted from the training data"
            )
        if "difficulty_model" in state_dict:  # the run's own model, as it was fitted when the run started
            self.scorer = QuestionScorer(DifficultyModel.from_state(state_dict["difficulty_model"]))


class NoveltyReward(RewardCallback):
    """Novelty against known questions: ``1 - max TF-IDF similarity`` to the bank, and the novelty constraint.

    The bank is the training questions, fixed for the run: the reward is stationary (the same question
    scores the same at step 1 and step 1000, on training and on held-out prompts). A question more similar
    than ``threshold`` to a known question multiplies the *total* reward by ``penalty``; that decision is
    taken on the exact cosine. Repeating the run's own earlier questions is a separate signal,
    :class:`RepetitionReward`, with its own weight.

    Args:
        weight: weight of this component in the total reward.
        threshold: similarity above which a question counts as a near-copy.
        penalty: multiplier of the total reward of a near-copy.
        top_k: n-grams kept per question vector of the fast index that estimates the similarity below the
            threshold (``null`` = exact cosine everywhere); the near-copy decision is always exact.
    """

    name = "novelty"

    def __init__(self, weight: float = 0.3, threshold: float = 0.85, penalty: float = 0.5, top_k: int | None = 64):
        super().__init__(weight)
        if not 0 < threshold <= 1 or not 0 <= penalty <= 1:
            raise ValueError(f"{type(self).__name__}: threshold must be in (0, 1] and penalty in [0, 1]")
        self.threshold, self.penalty, self.top_k = threshold, penalty, top_k
        self.scorer: QuestionScorer | None = None  # its bank: the novelty index
        self.known: list[str] = []  # the training questions

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.index is None and trainer.datamodule is not None:
            self.known = [r.question for r in trainer.datamodule.load_records()["train"]]
            self._build(trainer.datamodule)

    def _build(self, datamodule=None) -> None:
        """The bank: the run's scorer's (built once per run) or, without a data module, one of ``known``."""
        if datamodule is not None:
            self.scorer = QuestionScorer.for_datamodule(datamodule, self.top_k)
        else:
            self.scorer = QuestionScorer(bank=NoveltyIndex(self.known, top_k=self.top_k))

    @property
    def index(self) -> NoveltyIndex | None:
        scorer = getattr(self, "scorer", None)
        return scorer.bank if scorer is not None else None

    def score(self, batch: ScoringBatch) -> RewardOutput:
        sims, near_copy = (getattr(self, "scorer", None) or QuestionScorer()).similarity(batch, self.threshold)
        return RewardOutput(1.0 - sims, np.where(near_copy, self.penalty, 1.0).astype(np.float32),
                            {"similarity": sims, "near_copy": near_copy.astype(np.float32)})  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # the bank is the training data (a checkpoint of qgen <= 0.1.0 also held generated questions)


class RepetitionReward(NoveltyReward):
    """Repetition of the run's own questions: ``1 - max TF-IDF similarity`` to the questions it generated before.

    The bank starts empty (the IDF is fitted on the training questions, as :class:`NoveltyReward`'s) and
    grows once per optimizer step with that step's questions that were not near-copies (the parsed stem
    when the output parses, else the raw text); a question more similar than ``threshold`` to one of them
    multiplies the total reward by ``penalty``. This signal is not stationary by design (it pushes the
    policy away from what it wrote earlier), so it is left out of the held-out reward (``val/reward_*``).
    The questions are in the callback's ``state_dict``, so a resumed run has the same bank; under DDP every
    rank's questions are gathered (in rank order) before the bank grows, so every rank holds the same bank.

    Args:
        weight: weight of this component in the total reward.
        threshold: similarity above which a question repeats an earlier one.
        penalty: multiplier of the total reward of a repetition (1 = none).
        top_k: as :class:`NoveltyReward`'s.
    """

    name = "repetition"
    stationary = False  # left out of the held-out evaluation

    def __init__(self, weight: float = 0.1, threshold: float = 0.85, penalty: float = 0.5, top_k: int | None = 64):
        super().__init__(weight, threshold, penalty, top_k)
        self.accepted: list[str] = []  # generated questions added to the bank, in order
        self._pending: list[str] = []

    def _build(self, datamodule=None) -> None:
        """Its own bank (the run's questions), with the IDF of the training questions."""
        index = NoveltyIndex(self.known, top_k=self.top_k, keep_bank=False)
        index.add(self.accepted)
        self.scorer = QuestionScorer(bank=index)

    def score(self, batch: ScoringBatch) -> RewardOutput:
        out = super().score(batch)
        out.extra["question"] = np.array([p.question or t for p, t in zip(batch.parsed, batch.texts)], dtype=object)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        out = getattr(pl_module, "last", {}).get("components", {}).get(self.name)
        if out is not None:  # this micro-batch's questions; the bank grows when the optimizer step is done
            self._pending.extend(str(q) for q, bad in zip(out.extra["question"], out.extra["near_copy"])
                                 if str(q).strip() and not bad)  # fmt: skip
        step_done = (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0 or bool(
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)  # a short last window ends the epoch's step
        if not step_done:  # every micro-batch of a step is scored against the same bank
            return
        new = self._pending
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[str]] = [[] for _ in range(trainer.world_size)]
            torch.distributed.all_gather_object(gathered, new)
            new = [q for rank in gathered for q in rank]
        self._pending = []
        self.accepted.extend(new)
        if self.index is not None:
            self.index.add(new)
        pl_module.log("train/repetition_bank_size", float(len(self.accepted)))

    def state_dict(self) -> dict:
        return {"accepted": list(self.accepted)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.accepted = list(state_dict.get("accepted", []))
        if self.known:  # Lightning restores callback state after setup: rebuild the bank with it
            self._build()


class RigorReward(RewardCallback):
    """Logical rigor: a verified answer first, then parseable sections, reasoning connectives, no truncation.

    With ``check_answers`` the answer part is verifiable: the stated answer must equal the final answer of
    the question's own solution, compared mathematically (:mod:`qgen.answers`, math-verify). It leads the
    score (:func:`qgen.scoring.rigor_score`): a question whose answer is verified inconsistent scores below
    every question whose answer is verified consistent; an unverifiable one falls between. With ``gated``
    rigor becomes gates first (sections, not truncated, answer consistent): a question that fails one scores
    0 rigor and gets no credit at all (its total reward is multiplied by 0, so no difficulty or novelty for a
    question whose answer is wrong). Logs ``train/<prefix>_rigor_answer_consistent`` (the verified share).

    Args:
        weight: weight of this component in the total reward.
        check_answers: verify the stated answer against the solution (else: any non-empty answer counts).
        gated: rigor gates the whole reward (the Qwen3-14B configs; a tiny random-init model rarely writes a
            consistent answer, so the embedded demo keeps it off).
    """

    name = "rigor"

    def __init__(self, weight: float = 0.2, check_answers: bool = True, gated: bool = False):
        super().__init__(weight)
        if gated and not check_answers:
            raise ValueError("RigorReward: gated needs check_answers (the consistency gate is the verified check)")
        self.check_answers, self.gated = check_answers, gated
        self._consistent: np.ndarray | None = None

    def score(self, batch: ScoringBatch) -> RewardOutput:
        consistent: list[bool | None] = [None] * len(batch.texts)
        if self.check_answers:  # rigor reads the text alone: no fitted model or bank
            consistent = [c.consistent for c in QuestionScorer.answer_checks(batch)]
        values = QuestionScorer.rigor(batch, consistent, self.gated)
        extra = {}
        factor = None
        if self.check_answers:  # the verified share: an unverifiable answer counts as not consistent
            extra["answer_consistent"] = np.array([ok is True for ok in consistent], dtype=np.float32)
        if self.gated:
            factor = np.array([0.0 if rigor_gates(p, cut, ok) else 1.0
                               for p, cut, ok in zip(batch.parsed, batch.truncated, consistent)], dtype=np.float32)  # fmt: skip
        return RewardOutput(values, factor, extra)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        out = getattr(pl_module, "last", {}).get("components", {}).get(self.name)
        if out is not None and "answer_consistent" in out.extra:
            prefix = getattr(pl_module, "score_prefix", "reward")
            share = torch.as_tensor(out.extra["answer_consistent"], dtype=torch.float32).mean()
            pl_module.log(f"train/{prefix}_rigor_answer_consistent", share, sync_dist=True,
                          batch_size=max(1, len(out.extra["answer_consistent"])))  # fmt: skip


class DiversityReward(RewardCallback):
    """Intra-group diversity: 1 - mean similarity of a question to the others of its group.

    Args:
        weight: weight of this component in the total reward.
    """

    name = "diversity"

    def __init__(self, weight: float = 0.1):
        super().__init__(weight)

    def score(self, batch: ScoringBatch) -> RewardOutput:
        return RewardOutput(
            group_diversity([p.question or t for p, t in zip(batch.parsed, batch.texts)], batch.group_size)
        )
