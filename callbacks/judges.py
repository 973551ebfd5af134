"""Judges of the distillation stage's teacher cluster that are not also GRPO rewards.

- ``EducationalValueJudge``: a model-free educational-value score (:func:`qgen.scoring.educational_value`).
- ``OpenAIJudge``: a 1-10 rating from an OpenAI-compatible chat endpoint (DeepSeek-R1, a vLLM or SGLang
  server, ...), against a rubric.

Both plug in exactly like the reward callbacks (``trainer.callbacks`` in YAML) and register with any module
that has ``register_reward`` (GRPO uses them as extra rewards, distillation as judges).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np

from callbacks.rewards import RewardCallback
from qgen.endpoint import ChatEndpoint, EndpointError
from qgen.scoring import QuestionScorer, RewardOutput, ScoringBatch


class EducationalValueJudge(RewardCallback):
    """Educational value of a question in [0, 1]: worked solution, knowledge points covered, teachable
    length, checkable answer (see :func:`qgen.scoring.educational_value`).

    Args:
        weight: weight of this judge in the cluster (or of this reward in GRPO).
    """

    name = "educational_value"

    def __init__(self, weight: float = 0.25):
        super().__init__(weight)

    def score(self, batch: ScoringBatch) -> RewardOutput:
        return RewardOutput(QuestionScorer.educational_value(batch))


DEFAULT_RUBRIC = (
    "You are a senior exam-question reviewer (资深命题专家). Rate the exam question below on a scale of 1 to 10 "
    "for its overall quality as a test item: correctness and logical rigor of the statement, answer and "
    "solution; appropriate difficulty; originality; and educational value. Reply with one line of the form "
    "'Score: N' where N is an integer from 1 to 10."
)
_SCORE_LINE = re.compile(r"(?:score|rating|评分|得分|分数)\s*\**\s*[:：=]\s*\**\s*(-?\d+(?:\.\d+)?)(?!\s*[/／]\s*(?!10\b)\d)",
                         re.IGNORECASE)  # fmt: skip
_BARE = re.compile(r"^\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10|分)?\s*\**\s*$")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def parse_rating(content: str) -> int | None:
    """The explicit 1-10 rating in a judge reply, or ``None`` (a failed rating, counted and logged).

    Only an explicit rating counts: a ``Score: N`` (``Rating``, ``评分`` ...) line outside the reasoning, the
    last one winning, or a reply that is nothing but the number (``8``, ``8/10``). Reasoning is dropped first,
    including an unclosed ``<think>`` of a reply cut off mid-thought. A rating outside 1-10 (``Score: -3``,
    ``Score: 12``) is not clamped into range, and no other number in the text (``2 of 4 parts missing``) is
    ever taken for a rating.
    """
    content = _THINK.sub("", content or "")
    if "<think>" in content:  # cut off inside its reasoning: no verdict was given
        content = content[: content.index("<think>")]
    found = _SCORE_LINE.findall(content)
    if not found:
        bare = _BARE.match(content)
        found = [bare.group(1)] if bare else []
    if not found:
        return None
    value = float(found[-1])
    if not 1 <= value <= 10:
        return None
    return int(value + 0.5)


class JudgeError(EndpointError):
    """The judge endpoint is unreachable, rejects us, or keeps failing."""


class OpenAIJudge(RewardCallback):
    """An LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint; the score is ``(rating - 1) / 9``.

    The connection, deadlines, retries, ``Retry-After``, circuit breaker and API-key handling are
    :class:`qgen.endpoint.ChatEndpoint`'s (its docstring); the API key is read from ``api_key_env`` only. At
    setup the endpoint is probed (``GET /models``): an unreachable server or a rejected key stops the run before
    training starts. A reply without an explicit rating (see :func:`parse_rating`) is a failed rating.

    - After the last retry ``on_error: raise`` stops the run; ``neutral`` scores 0.5, counts the failure
      (``train/<prefix>_<name>_failures``) and prints a warning line for the step.
    - Circuit breaker: after ``max_consecutive_failures`` failed ratings in a row, ``raise`` stops the run and
      ``neutral`` stops asking for the rest of the run, with a warning line at every step it is skipped.
    - Ratings are cached on disk (``cache_dir``, one JSONL file per model), keyed by a hash of the model,
      the rubric and the question text, so reruns and resumed runs do not pay twice.

    Args:
        base_url: endpoint root, e.g. ``https://api.deepseek.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: model name sent with each request, e.g. ``deepseek-reasoner``.
        weight: weight of this judge in the cluster.
        api_key_env: environment variable holding the API key (unset = no Authorization header, for local servers).
        rubric: system prompt; must ask for a 1-10 rating ("Score: N").
        timeout: seconds one attempt may take in all (connect, send and every read together).
        max_retries: retries after the first attempt.
        backoff: base of the exponential backoff, seconds.
        concurrency: requests in flight at most.
        max_tokens: completion budget of the judge (reasoning models need room to think).
        temperature: judge sampling temperature.
        cache_dir: folder of the rating cache; ``null`` = no cache.
        on_error: ``raise`` or ``neutral`` when a question cannot be rated.
        max_consecutive_failures: failed ratings in a row that open the circuit breaker.
        max_retry_after: the longest ``Retry-After`` wait honoured, seconds.
        name: component name in logs (several LLM judges can sit side by side).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        weight: float = 0.25,
        api_key_env: str | None = "OPENAI_API_KEY",
        rubric: str = DEFAULT_RUBRIC,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        concurrency: int = 4,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        cache_dir: str | None = ".qgen_cache/judge",
        on_error: Literal["raise", "neutral"] = "raise",
        name: str = "llm",
        max_consecutive_failures: int = 8,
        max_retry_after: float = 60.0,
    ):
        super().__init__(weight)
        self.endpoint = ChatEndpoint(base_url, model, api_key_env, timeout, max_retries, backoff, concurrency,
                                     max_consecutive_failures, max_retry_after, "OpenAIJudge", JudgeError)  # fmt: skip
        self.rubric, self.concurrency = rubric, concurrency
        self.max_tokens, self.temperature, self.on_error, self.name = max_tokens, temperature, on_error, name
        self.cache_dir = cache_dir
        self.cache: dict[str, int] = {}
        self.cache_hits = 0
        self._pool: ThreadPoolExecutor | None = None  # concurrency threads sending rating requests
        self._inflight: dict[str, Future] = {}  # cache key -> rating being fetched

    # the endpoint's settings and counters, read through the judge
    base_url = property(lambda self: self.endpoint.base_url)
    model = property(lambda self: self.endpoint.model)
    tripped = property(lambda self: self.endpoint.tripped)
    failures = property(lambda self: self.endpoint.failures)
    requests = property(lambda self: self.endpoint.requests)
    last_error = property(lambda self: self.endpoint.last_error)
    consecutive_failures = property(lambda self: self.endpoint.consecutive_failures)

    # ------------------------------------------------------------------------------------------ connection
    def __repr__(self) -> str:
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r}, weight={self.weight})"

    def connect(self, check: bool = True) -> None:
        """Open the HTTP client (key from the environment), load the cache, and probe the endpoint."""
        self._load_cache()
        self.endpoint.connect(check)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.endpoint.connected and stage == "fit":
            self.connect(check=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self._inflight = None, {}
        self.endpoint.close()

    # ----------------------------------------------------------------------------------------------- cache
    def _cache_path(self) -> str | None:
        if not self.cache_dir:
            return None
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model)
        return os.path.join(self.cache_dir, f"{safe}.jsonl")

    def cache_key(self, question: str) -> str:
        return hashlib.sha256(json.dumps([self.model, self.rubric, question]).encode()).hexdigest()

    def _load_cache(self) -> None:
        path = self._cache_path()
        if not path or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    self.cache[row["key"]] = int(row["rating"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a torn line from a killed run

    def _store(self, ratings: dict[str, int]) -> None:
        self.cache.update(ratings)
        path = self._cache_path()
        if not path or not ratings:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"key": k, "rating": v}) + "\n" for k, v in ratings.items())

    # -------------------------------------------------------------------------------------------- requests
    def rate(self, question: str) -> int | None:
        """One rating, with retries; ``None`` (or :class:`JudgeError` with ``on_error: raise``) on failure."""
        body = {
            "messages": [{"role": "system", "content": self.rubric}, {"role": "user", "content": question}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

        def parse(reply: dict) -> tuple[int | None, str]:
            text = reply["choices"][0]["message"].get("content") or ""
            rating = parse_rating(text)
            why = f"no explicit 1-10 rating in the reply ({text.strip()[-80:]!r})"
            return rating, "" if rating is not None else why

        return self.endpoint.call(body, parse, self.on_error == "raise", "rate a question")

    def prefetch(self, texts: list[str]) -> None:
        """Send the rating requests of ``texts`` now, without waiting (GRPO calls this the moment a chunk of
        questions is generated); :meth:`score` later collects the replies instead of asking again.
        """
        if self.tripped:
            return
        if not self.endpoint.connected:
            self.connect(check=False)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"qgen-judge-{self.name}")
        for text in texts:
            key = self.cache_key(text)
            if key not in self.cache and key not in self._inflight:
                self._inflight[key] = self._pool.submit(self._guarded_rate, text)

    def _guarded_rate(self, question: str) -> int | None:
        return None if self.tripped else self.rate(question)

    def score(self, batch: ScoringBatch) -> RewardOutput:
        if self.tripped:
            self._warn(f"skipped: the circuit breaker opened after {self.consecutive_failures} failed ratings in a "
                       f"row (last: {self.last_error}); every question scores 0.5 for the rest of the run")  # fmt: skip
            return RewardOutput(np.full(len(batch.texts), 0.5, dtype=np.float32))
        if not self.endpoint.connected:
            self.connect(check=False)
        questions = [t for t in batch.texts]
        keys = [self.cache_key(q) for q in questions]
        missing = {k: q for k, q in zip(keys, questions) if k not in self.cache}
        self.cache_hits += len(keys) - len(missing)
        failed_before = self.failures
        if missing:
            self.prefetch(list(missing.values()))  # sends what was not prefetched; in-flight requests are reused
            ratings = []
            for key in missing:
                future = self._inflight.pop(key, None)
                ratings.append(future.result() if future is not None else None)
            self._store({k: v for k, v in zip(missing, ratings) if v is not None})
        failed = self.failures - failed_before
        if failed:
            self._warn(f"{failed} of {len(missing)} ratings failed this step (last: {self.last_error}); they score 0.5")
        if self.tripped and self.on_error == "raise":
            raise JudgeError(f"OpenAIJudge: {self.consecutive_failures} failed ratings in a row from {self.base_url} "
                             f"(last: {self.last_error}); stopping")  # fmt: skip
        values = [(self.cache[k] - 1) / 9 if k in self.cache else 0.5 for k in keys]
        return RewardOutput(np.array(values, dtype=np.float32))

    def _warn(self, message: str) -> None:
        print(f"qgen: warning: judge {self.name} ({self.base_url}): {message}", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        prefix = getattr(pl_module, "score_prefix", "reward")
        pl_module.log(f"train/{prefix}_{self.name}_failures", float(self.failures))
        pl_module.log(f"train/{prefix}_{self.name}_cache_hits", float(self.cache_hits))

    def state_dict(self) -> dict:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "failures": self.failures}

    def load_state_dict(self, state_dict: dict) -> None:
        self.endpoint.requests = state_dict.get("requests", 0)
        self.cache_hits = state_dict.get("cache_hits", 0)
        self.endpoint.failures = state_dict.get("failures", 0)
