"""Solver-based difficulty: how often a frozen solver reaches the question's own stated answer.

For each generated question with a stated answer, ``samples`` solutions are drawn from a frozen solver
(by default the GRPO reference policy: the same backbone with the adapter disabled, through the same
``generate`` path as the rollouts), stopping after ``early_stop`` samples when all or none of them agree.
Each solution's final answer is checked against the stated answer with the answer-consistency check of
:mod:`qgen.answers` (math-verify). With ``n`` samples of which ``a`` agree:

- pass rate ``p = a / n`` and validity ``V = 1[a >= 1]`` (no solver sample reaching the stated answer is the
  signature of a wrong or unsolvable question);
- ``mode: shrunk`` (Absolute Zero style): ``V * (1 - p~)`` with ``p~ = (a + m (1 - d)) / (n + m)``, the pass
  rate shrunk toward the learned difficulty model's estimate ``d`` with ``m = prior_strength`` pseudo-samples;
- ``mode: band`` (R-Zero): ``V * (1 - 2 |p - 1/2|)``, highest for questions the solver gets half right;
- ``mode: learnability`` (prime-rl's verifier environments): ``V * 4 p (1 - p)``;
- ``mode: absolute_zero`` (Absolute Zero): ``V * (1 - p)`` (:mod:`qgen.passrate` has the shapes and sources).

With ``adaptive: true`` the solver is sampled in rounds of ``round_size`` and each question stops as soon as its
reward is settled (:class:`qgen.passrate.AdaptiveRule`: agreement with the reward of all ``samples`` within 0.1,
``cost_per_sample`` the price of a sample); ``early_stop`` is then unused. ``shrunk`` stops by the
``absolute_zero`` rule (the shape it shrinks) and reports its own formula.

A question for which another answer holds at least half of the samples is counted as a *likely wrong
stated answer*; with ``gated: true`` it scores 0 (SwS keeps only answer-consistent questions).

**Pseudo-labels** (``pseudo_labels: true``, R-Zero's): a question with no stated answer, or whose own solution
contradicts its stated answer (:func:`qgen.answers.check_answers` verdict ``False``), is solved against the
solvers' majority final answer instead (answers compared after :func:`qgen.answers.normalize_answer`): ``a`` is
the number of samples that reach it, so the pass rate is the majority's vote share, and the reward is the
shape at that share (validity: some sample has a final answer). The label and its share are kept with the
question's result (:class:`Solved`). TensorBoard: ``train/solver_pass_rate``, ``train/valid_frac``,
``train/likely_wrong_answers``, ``train/pseudo_labelled``, ``train/solver_samples`` (solver samples per
question), ``train/solver_in_band`` (0.2 <= p <= 0.8) and the histogram ``train/solver_pass_rates``.

Cost: ``samples`` extra completions per question at most (``early_stop`` when the solver agrees with itself),
e.g. 8 x 256 tokens for each of the 8 x B questions of a step: on Qwen3-14B this multiplies generation time
by up to ``samples``; the embedded demo leaves it off.

The solver runs in the training process's main thread, at the moment a chunk of questions has been
generated (``prefetch``), never in the background scoring thread, which must not touch the model.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from callbacks.rewards import RewardCallback
from qgen.answers import check_answers, normalize_answer, solution_answer
from qgen.backends import REFERENCE_NEEDS_ADAPTER, BackendError, resolve_weight_sync
from qgen.endpoint import ChatEndpoint, EndpointError
from qgen.formatting import ParsedQuestion, parse_question
from qgen.passrate import SHAPES, AdaptiveRule, pass_rate_reward
from qgen.scoring import DifficultyModel, QuestionScorer, RewardOutput, ScoringBatch
from qgen.watchdog import stage

SOLVE_PROMPT = {
    "en": "Solve the following problem. Reason step by step and end with 'The answer is X'.\n\n{question}",
    "zh": "请解答下面的题目，写出推理过程，最后写“答案为 X”。\n\n{question}",
}


class Solver(Protocol):
    def solve(self, questions: list[str], languages: list[str], samples: int) -> list[list[str]]:
        """``samples`` solution texts for each question."""


class PolicySolver:
    """The module's reference policy (the backbone without the trained adapter) as the solver, sampled through the
    module's own generation backend like the rollouts: ``hf`` with the adapter disabled, ``vllm`` through the
    engine's base with no adapter request (the adapter weight sync; a merged engine holds no reference policy).
    """

    def __init__(self, module, max_new_tokens: int = 256, temperature: float = 1.0):
        self.module, self.max_new_tokens, self.temperature = module, max_new_tokens, temperature

    def solve(self, questions: list[str], languages: list[str], samples: int) -> list[list[str]]:
        tok = self.module.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": SOLVE_PROMPT.get(lang, SOLVE_PROMPT["en"])
                                           .format(question=q)}], add_generation_prompt=True, tokenize=False)
                 for q, lang in zip(questions, languages)]  # fmt: skip
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        rollout = self.module.sample(prompts, samples, self.max_new_tokens, self.temperature, 1.0, reference=True)
        texts = rollout.texts
        return [texts[i * samples : (i + 1) * samples] for i in range(len(questions))]


@dataclass
class _Tally:
    """One question's solver samples. ``pseudo``: no usable stated answer (missing, or contradicted by the
    question's own solution): the label is the samples' majority final answer, and ``agree`` counts the samples
    that reach it (R-Zero's pseudo-label). Otherwise ``agree`` counts the samples that reach the stated answer.
    """

    parsed: ParsedQuestion
    language: str
    pseudo: bool
    finals: list[str] = field(default_factory=list)
    stated_votes: list[bool] = field(default_factory=list)

    def add(self, votes: list[bool], finals: list[str]) -> None:
        """One round's samples: agreement with the stated answer, and their final answers (normalised)."""
        self.stated_votes += votes
        self.finals += finals

    def majority(self) -> tuple[str, int]:
        counts = Counter(f for f in self.finals if f)
        return counts.most_common(1)[0] if counts else ("", 0)

    @property
    def n(self) -> int:
        return len(self.finals)

    @property
    def agree(self) -> int:
        return self.majority()[1] if self.pseudo else sum(self.stated_votes)

    def result(self) -> Solved:
        label, count = self.majority()
        wrong = Counter(f for f, ok in zip(self.finals, self.stated_votes) if not ok and f)
        likely_wrong = not self.pseudo and bool(wrong) and wrong.most_common(1)[0][1] >= self.n / 2
        share = count / self.n if self.n else 0.0
        return Solved(self.agree, self.n, likely_wrong, label if self.pseudo else None, share)


@dataclass(frozen=True)
class Solved:
    """What the solver found for one question: ``agree`` of ``n`` samples reach the label (the stated answer, or
    ``pseudo_label``, the majority answer, held by ``share`` of the samples).
    """

    agree: int
    n: int
    likely_wrong: bool
    pseudo_label: str | None = None
    share: float = 0.0


class SolverError(EndpointError):
    """The served solver is unreachable or rejects us."""


class ServedSolver:
    """A solver behind an OpenAI-compatible server (``vllm serve`` of any model, on GPUs of its own): one
    ``/chat/completions`` request per question asks for all ``samples`` solutions at once (``n``). Requests run
    ``concurrency`` at a time through :class:`qgen.endpoint.ChatEndpoint` (total deadline per attempt, retries,
    ``Retry-After``, circuit breaker; the API key from ``api_key_env`` only). A question whose request fails gets
    no solutions (it scores as unsolved and counts in ``train/solver_failures``); a tripped breaker skips the
    server for the rest of the run with a warning line each step. Nothing here is a collective, so under DDP and
    FSDP each rank asks for its own questions.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, max_new_tokens: int = 1024,
                 temperature: float = 1.0, timeout: float = 120.0, max_retries: int = 2, backoff: float = 1.0,
                 concurrency: int = 16, max_consecutive_failures: int = 8, max_retry_after: float = 30.0):  # fmt: skip
        self.endpoint = ChatEndpoint(base_url, model, api_key_env, timeout, max_retries, backoff, concurrency,
                                     max_consecutive_failures, max_retry_after, "ServedSolver",
                                     SolverError)  # fmt: skip
        self.max_new_tokens, self.temperature, self.concurrency = max_new_tokens, temperature, concurrency
        self.seconds: list[float] = []  # wall time of each solve call
        self._pool: ThreadPoolExecutor | None = None

    def _ask(self, question: str, language: str, samples: int) -> list[str]:
        prompt = SOLVE_PROMPT.get(language, SOLVE_PROMPT["en"]).format(question=question)
        body = {"messages": [{"role": "user", "content": prompt}], "n": samples, "temperature": self.temperature,
                "max_tokens": self.max_new_tokens}  # fmt: skip

        def parse(reply: dict) -> tuple[list[str] | None, str]:
            texts = [c["message"].get("content") or "" for c in reply["choices"]]
            if len(texts) != samples:
                return None, f"{len(texts)} choices for n={samples}"
            return texts, ""

        return self.endpoint.call(body, parse, raise_on_failure=False, what="solve a question") or []

    def solve(self, questions: list[str], languages: list[str], samples: int) -> list[list[str]]:
        if self.endpoint.tripped:
            return [[] for _ in questions]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="qgen-solver")
        started = time.perf_counter()
        futures = [self._pool.submit(self._ask, q, lang, samples) for q, lang in zip(questions, languages)]
        out = [f.result() for f in futures]
        self.seconds.append(time.perf_counter() - started)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.endpoint.close()


class SolverDifficulty(RewardCallback):
    """Difficulty from a frozen solver's pass rate on the question's own stated answer (see the module docstring).

    Args:
        weight: weight of this component in the total reward.
        samples: solver samples per question at most.
        early_stop: after this many samples, stop when all or none agree with the stated answer.
        mode: ``shrunk`` (pass rate shrunk toward the difficulty model), ``band`` (R-Zero's target band),
            ``learnability`` (``4 p (1 - p)``) or ``absolute_zero`` (``1 - p``).
        prior_strength: pseudo-samples of the difficulty model's estimate in ``shrunk``.
        max_new_tokens: solution length limit.
        temperature: solver sampling temperature.
        adaptive: sample in rounds and stop each question once its reward is settled (module docstring).
        round_size: solver samples per question and round (``adaptive``).
        cost_per_sample: the adaptive rule's price of one sample, in probability of agreement.
        pseudo_labels: a question without a stated answer, or whose own solution contradicts it, is solved
            against the solvers' majority answer (pass rate = that answer's share; module docstring).
        gated: a question whose stated answer the solvers' majority contradicts (likely wrong) scores 0.
    """

    name = "solver_difficulty"

    def __init__(self, weight: float = 0.4, samples: int = 8, early_stop: int = 4,
                 mode: Literal["shrunk", "band", "learnability", "absolute_zero"] = "shrunk",
                 prior_strength: float = 2.0, max_new_tokens: int = 256, temperature: float = 1.0,
                 adaptive: bool = False, round_size: int = 2, cost_per_sample: float = 0.05,
                 pseudo_labels: bool = True, gated: bool = False):  # fmt: skip
        super().__init__(weight)
        self.pseudo_labels, self.gated = pseudo_labels, gated
        if mode not in ("shrunk", *SHAPES):
            raise ValueError(f"SolverDifficulty: mode must be shrunk, {', '.join(SHAPES)}; got {mode!r}")
        self.rule = AdaptiveRule("absolute_zero" if mode == "shrunk" else mode, samples, round_size, 0.1,
                                 cost_per_sample) if adaptive else None  # fmt: skip
        if samples < 1 or not 1 <= early_stop <= samples or prior_strength < 0:
            raise ValueError("SolverDifficulty: need samples >= 1, 1 <= early_stop <= samples, prior_strength >= 0")
        self.samples, self.early_stop, self.mode, self.prior_strength = samples, early_stop, mode, prior_strength
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.solver: Solver | None = None
        self.prior = DifficultyModel()
        self._solved: dict[str, Solved] = {}  # question text -> what the solver found (this step)
        self.stats: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        from qgen.strategies import StrategyError, shards_weights

        if shards_weights(trainer.strategy) and self.solver is None:
            # each rank solves a different number of its own new questions: over sharded layers (a collective
            # per forward) the ranks would fall out of step and hang
            raise StrategyError("SolverDifficulty samples a data-dependent number of solutions per rank, which "
                                "sharded layers cannot do; under FSDP use the difficulty model "
                                "(callbacks.DifficultyReward)")
        hp = pl_module.hparams
        if self.solver is None and hp.get("backend", "hf") == "vllm" and resolve_weight_sync(
                (pl_module.vllm_spec()).weight_sync, hp.get("quantization")) == "merged":  # fmt: skip
            raise BackendError(f"SolverDifficulty: {REFERENCE_NEEDS_ADAPTER}")
        super().setup(trainer, pl_module, stage)
        if self.solver is None:
            self.solver = PolicySolver(pl_module, self.max_new_tokens, self.temperature)
        if not self.prior.fitted and trainer.datamodule is not None:
            self.prior = QuestionScorer.for_datamodule(trainer.datamodule).difficulty_model

    # --------------------------------------------------------------------------------------- solving
    def _votes(self, parsed: ParsedQuestion, solutions: list[str]) -> tuple[list[bool], list[str]]:
        checks = check_answers([ParsedQuestion(parsed.question, parsed.answer, s, parsed.options, True)
                                for s in solutions])  # fmt: skip
        finals = [normalize_answer(solution_answer(s) or "") for s in solutions]
        return [c.consistent is True for c in checks], finals

    def prefetch(self, texts: list[str], languages: list[str] | None = None) -> None:
        """Solve the new questions now (main thread); :meth:`score` reads the results."""
        parsed = [parse_question(t) for t in texts]
        languages = languages or ["zh" if any("\u4e00" <= ch <= "\u9fff" for ch in t) else "en" for t in texts]
        chosen = [(t, p, lang) for t, p, lang in zip(texts, parsed, languages)
                  if p.question and (p.answer or self.pseudo_labels) and t not in self._solved]  # fmt: skip
        if not chosen:
            return
        # the stated answer is the label, unless it is missing or its own solution contradicts it
        checks = check_answers([p for _, p, _ in chosen])
        state = {t: _Tally(p, lang, pseudo=not p.answer or check.consistent is False)
                 for (t, p, lang), check in zip(chosen, checks) if p.answer or self.pseudo_labels}  # fmt: skip
        if self.rule is not None:
            self._solve_adaptively(state)
        else:
            self._solve_in_two_calls(state)
        for text, tally in state.items():
            self._solved[text] = tally.result()

    def _ask(self, state: dict, texts: list[str], samples: int) -> list[str]:
        """One solver call for ``texts``; the texts whose solutions all came back (a served solver may fail)."""
        with stage("solver"):  # its deadline: qgen.watchdog
            solutions = self.solver.solve([state[t].parsed.question for t in texts], [state[t].language for t in texts],
                                          samples)  # fmt: skip
        complete = []
        for text, sols in zip(texts, solutions):
            state[text].add(*self._votes(state[text].parsed, sols))
            if len(sols) == samples:
                complete.append(text)
        return complete

    def _solve_in_two_calls(self, state: dict) -> None:
        """``early_stop`` samples each; the remaining ones for the questions whose vote is split."""
        first = self._ask(state, list(state), self.early_stop)
        again = [t for t in first if 0 < state[t].agree < state[t].n]
        if again and self.samples > self.early_stop:
            self._ask(state, again, self.samples - self.early_stop)

    def _solve_adaptively(self, state: dict) -> None:
        """Rounds of ``round_size`` samples for the questions not yet settled (one solver call per round size)."""
        pending = list(state)
        while pending:
            wanted: dict[int, list[str]] = {}
            for text in pending:
                more = self.rule.next_round(state[text].agree, state[text].n)
                if more:
                    wanted.setdefault(more, []).append(text)
            pending = [t for more, texts in wanted.items() for t in self._ask(state, texts, more)]

    def score(self, batch: ScoringBatch) -> RewardOutput:
        missing = [t for t in batch.texts if t not in self._solved]
        if missing:  # not prefetched (e.g. scoring a file): solve here
            self.prefetch(missing, None)
        questions = [p.question or t for p, t in zip(batch.parsed, batch.texts)]
        prior = self.prior.predict(questions, [p.analysis for p in batch.parsed],
                                   [r.subject if r is not None else "" for r in batch.records])  # fmt: skip
        values, rates, valid, wrong, used, pseudo = [], [], [], 0, [], 0
        self.rates = rates  # this batch's pass rates (the histogram)
        for text, d in zip(batch.texts, prior):
            solved = self._solved.get(text, Solved(0, 0, False))
            agree, n, likely_wrong = solved.agree, solved.n, solved.likely_wrong
            wrong += likely_wrong
            pseudo += solved.pseudo_label is not None
            if n == 0 or (self.gated and likely_wrong):  # nothing to solve against, or a contradicted answer
                values.append(0.0)
                valid.append(0.0)
                continue
            p = agree / n
            v = float(agree >= 1)
            used.append(n)
            if self.mode != "shrunk":  # the settled value of the adaptive rule, else the shape at a / n
                settled = self.rule.value(agree, n) if self.rule is not None else None
                values.append(settled if settled is not None else pass_rate_reward(self.mode, agree, n))
            else:
                shrunk = (agree + self.prior_strength * (1 - float(d))) / (n + self.prior_strength)
                values.append(v * (1 - shrunk))
            rates.append(p)
            valid.append(v)
        self.stats = {"pseudo_labelled": float(pseudo),"solver_pass_rate": float(np.mean(rates)) if rates else 0.0,
                      "valid_frac": float(np.mean(valid)) if valid else 0.0,
                      "likely_wrong_answers": float(wrong),
                      "solver_samples": float(np.mean(used)) if used else 0.0,
                      "solver_in_band": float(np.mean([0.2 <= r <= 0.8 for r in rates])) if rates else 0.0}  # fmt: skip
        return RewardOutput(np.array(values, dtype=np.float32), extra={"valid": np.array(valid, np.float32)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        for key, value in self.stats.items():  # shares are averaged over ranks, counts summed
            summed = key in ("likely_wrong_answers", "solver_failures", "pseudo_labelled")
            pl_module.log(f"train/{key}", value, sync_dist=True, reduce_fx="sum" if summed else "mean")
        experiment = getattr(getattr(trainer, "logger", None), "experiment", None)
        if getattr(self, "rates", None) and hasattr(experiment, "add_histogram") and trainer.is_global_zero:
            experiment.add_histogram("train/solver_pass_rates", np.array(self.rates), trainer.global_step)
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0:
            self._solved.clear()  # the step's questions are scored: forget them


class ServedSolverDifficulty(SolverDifficulty):
    """:class:`SolverDifficulty` whose solver is a served model (:class:`ServedSolver`), for the cluster setup
    (README, "A served solver"): the writer trains on its GPUs, ``vllm serve`` runs the solver on others.

    The server is probed at setup (unreachable or a rejected key: the run stops before training). A chunk's
    questions are sent the moment they are generated and solved in a background thread, adaptive rounds
    included, while the step goes on (later chunks, reference log-probs); :meth:`score` waits for them. The same
    question text is solved once per step, across calls. Works under DDP and FSDP (nothing here is a
    collective). Defaults: 10 samples, ``learnability``, adaptive rounds of 2.

    Args:
        base_url: the server's endpoint root, e.g. ``http://solver-node:8000/v1``; the environment variable
            ``QGEN_SOLVER_URL``, where set, overrides it (a launcher knows the host only once it is up).
        model: the served model's name.
        api_key_env: environment variable holding the API key (unset: none sent).
        timeout: seconds one request may take in all; max_retries: retries after the first attempt.
        concurrency: requests in flight at most (one per question and round).
        The other arguments are :class:`SolverDifficulty`'s.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, weight: float = 0.4,
                 samples: int = 10, early_stop: int = 4,
                 mode: Literal["shrunk", "band", "learnability", "absolute_zero"] = "learnability",
                 prior_strength: float = 2.0, max_new_tokens: int = 1024, temperature: float = 1.0,
                 adaptive: bool = True, round_size: int = 2, cost_per_sample: float = 0.05, timeout: float = 120.0,
                 max_retries: int = 2, concurrency: int = 16, max_consecutive_failures: int = 8):  # fmt: skip
        super().__init__(weight, samples, early_stop, mode, prior_strength, max_new_tokens, temperature, adaptive,
                         round_size, cost_per_sample)  # fmt: skip
        base_url = os.environ.get("QGEN_SOLVER_URL") or base_url
        self.served = ServedSolver(base_url, model, api_key_env, max_new_tokens, temperature, timeout, max_retries,
                                   concurrency=concurrency,
                                   max_consecutive_failures=max_consecutive_failures)  # fmt: skip
        self.solver = self.served
        self._background: ThreadPoolExecutor | None = None
        self._inflight: list[Future] = []
        self._asked: set[str] = set()
        self._failures_before = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not self.served.endpoint.connected:
            self.served.endpoint.connect(check=True)

    def prefetch(self, texts: list[str], languages: list[str] | None = None) -> None:
        """Send the new questions to the server now; solved in the background (:meth:`score` collects)."""
        languages = languages or [None] * len(texts)
        new = [(t, lang) for t, lang in zip(texts, languages) if t not in self._solved and t not in self._asked]
        if not new:
            return
        self._asked.update(t for t, _ in new)
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qgen-served-solver")
        langs = [lang for _, lang in new]
        self._inflight.append(self._background.submit(super().prefetch, [t for t, _ in new],
                                                      None if None in langs else langs))  # fmt: skip

    def score(self, batch: ScoringBatch) -> RewardOutput:
        for future in self._inflight:
            future.result()
        self._inflight = []
        out = super().score(batch)
        endpoint = self.served.endpoint
        self.stats["solver_failures"] = float(endpoint.failures - self._failures_before)
        self._failures_before = endpoint.failures
        seconds, self.served.seconds = self.served.seconds, []
        self.stats["solver_latency_s"] = float(np.mean(seconds)) if seconds else 0.0
        if endpoint.tripped:
            print(f"qgen: warning: served solver {endpoint.base_url}: skipped, the circuit breaker opened after "
                  f"{endpoint.consecutive_failures} failed requests in a row (last: {endpoint.last_error}); its "
                  "questions score as unsolved", file=sys.stderr, flush=True)  # fmt: skip
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0:
            self._asked.clear()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._background is not None:
            self._background.shutdown(wait=False, cancel_futures=True)
            self._background = None
        self.served.close()
