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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from callbacks.rewards import RewardCallback
from qgen.scoring import RewardOutput, ScoringBatch, educational_value

try:  # the HTTP client of the Hugging Face stack (huggingface_hub depends on it)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older stacks ship the original package name
    import httpx


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
        values = [educational_value(p, lang, r.knowledge if r is not None else None)
                  for p, lang, r in zip(batch.parsed, batch.languages, batch.records)]  # fmt: skip
        return RewardOutput(np.array(values, dtype=np.float32))


DEFAULT_RUBRIC = (
    "You are a senior exam-question reviewer (资深命题专家). Rate the exam question below on a scale of 1 to 10 "
    "for its overall quality as a test item: correctness and logical rigor of the statement, answer and "
    "solution; appropriate difficulty; originality; and educational value. Reply with one line of the form "
    "'Score: N' where N is an integer from 1 to 10."
)
_SCORE_LINE = re.compile(r"(?:score|rating|评分|得分|分数)\s*[:：=]?\s*\**\s*(10|[1-9])(?:\.\d+)?\b", re.IGNORECASE)
_ANY_SCORE = re.compile(r"\b(10|[1-9])\s*(?:/\s*10|分)?\b")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def parse_rating(content: str) -> int | None:
    """The 1-10 rating in a judge reply: a 'Score: N' line wins, else the last standalone 1-10 number."""
    content = _THINK.sub("", content or "")
    found = _SCORE_LINE.findall(content)
    if found:
        return int(found[-1])
    found = _ANY_SCORE.findall(content)
    return int(found[-1]) if found else None


class JudgeError(RuntimeError):
    """The judge endpoint is unreachable, rejects us, or keeps failing."""


class OpenAIJudge(RewardCallback):
    """An LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint; the score is ``(rating - 1) / 9``.

    - The API key is read from the environment variable ``api_key_env`` at setup and only ever sent in the
      ``Authorization`` header: it is not an argument, so it never reaches config.yaml, hparams.yaml,
      logs or checkpoints.
    - At setup the endpoint is probed (``GET /models``): an unreachable server or a rejected key stops the
      run before training starts, with a message naming ``base_url``.
    - Each request has a bounded ``timeout``; timeouts, connection errors, HTTP 429 and 5xx are retried
      ``max_retries`` times with exponential backoff (``backoff`` x 2^attempt seconds); other 4xx errors
      are not retried. After the last retry ``on_error: raise`` stops the run, ``neutral`` scores 0.5 and
      counts the failure (``train/judge_<name>_failures``).
    - At most ``concurrency`` requests are in flight.
    - Ratings are cached on disk (``cache_dir``, one JSONL file per model), keyed by a hash of the model,
      the rubric and the question text, so reruns and resumed runs do not pay twice.

    Args:
        base_url: endpoint root, e.g. ``https://api.deepseek.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: model name sent with each request, e.g. ``deepseek-reasoner``.
        weight: weight of this judge in the cluster.
        api_key_env: environment variable holding the API key (unset = no Authorization header, for local servers).
        rubric: system prompt; must ask for a 1-10 rating ("Score: N").
        timeout: seconds per request (connect, read and write).
        max_retries: retries after the first attempt.
        backoff: base of the exponential backoff, seconds.
        concurrency: requests in flight at most.
        max_tokens: completion budget of the judge (reasoning models need room to think).
        temperature: judge sampling temperature.
        cache_dir: folder of the rating cache; ``null`` = no cache.
        on_error: ``raise`` or ``neutral`` when a question cannot be rated.
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
    ):
        super().__init__(weight)
        if timeout <= 0 or max_retries < 0 or backoff < 0 or concurrency < 1:
            raise ValueError("OpenAIJudge: need timeout > 0, max_retries >= 0, backoff >= 0, concurrency >= 1")
        self.base_url, self.model, self.api_key_env, self.rubric = base_url.rstrip("/"), model, api_key_env, rubric
        self.timeout, self.max_retries, self.backoff, self.concurrency = timeout, max_retries, backoff, concurrency
        self.max_tokens, self.temperature, self.on_error, self.name = max_tokens, temperature, on_error, name
        self.cache_dir = cache_dir
        self.cache: dict[str, int] = {}
        self.requests = self.cache_hits = self.failures = 0
        self._client = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ connection
    def __repr__(self) -> str:
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r}, weight={self.weight})"

    def connect(self, check: bool = True) -> None:
        """Open the HTTP client (key from the environment), load the cache, and probe the endpoint."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.timeout),
                                    limits=limits)  # fmt: skip
        self._load_cache()
        if not check:
            return
        try:
            response = self._client.get("/models")
        except httpx.TransportError as err:  # connection refused, DNS, timeout
            raise JudgeError(
                f"OpenAIJudge: cannot reach {self.base_url} ({type(err).__name__}); start the server, fix "
                "base_url, or remove the judge from trainer.callbacks"
            ) from None
        if response.status_code in (401, 403):
            env = f"${self.api_key_env}" if self.api_key_env else "no key"
            raise JudgeError(f"OpenAIJudge: {self.base_url} rejected the API key ({env}): HTTP {response.status_code}")

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._client is None and stage == "fit":
            self.connect(check=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

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
            "model": self.model,
            "messages": [{"role": "system", "content": self.rubric}, {"role": "user", "content": question}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            with self._lock:
                self.requests += 1
            try:
                response = self._client.post("/chat/completions", json=body)
            except httpx.TransportError as err:  # timeouts included
                last = type(err).__name__
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                last = f"HTTP {response.status_code}"
                break  # a bad request does not get better by repeating it
            try:
                rating = parse_rating(response.json()["choices"][0]["message"].get("content") or "")
            except (ValueError, KeyError, IndexError, TypeError):
                rating, last = None, "malformed response"
            if rating is not None:
                return rating
            last = last or "no 1-10 rating in the reply"
        with self._lock:
            self.failures += 1
        if self.on_error == "raise":
            raise JudgeError(f"OpenAIJudge: {self.base_url} could not rate a question after "
                             f"{self.max_retries + 1} attempts (last: {last})")  # fmt: skip
        return None

    def score(self, batch: ScoringBatch) -> RewardOutput:
        if self._client is None:
            self.connect(check=False)
        questions = [t for t in batch.texts]
        keys = [self.cache_key(q) for q in questions]
        missing = {k: q for k, q in zip(keys, questions) if k not in self.cache}
        self.cache_hits += len(keys) - len(missing)
        if missing:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                ratings = dict(zip(missing, pool.map(self.rate, missing.values())))
            self._store({k: v for k, v in ratings.items() if v is not None})
        values = [(self.cache[k] - 1) / 9 if k in self.cache else 0.5 for k in keys]
        return RewardOutput(np.array(values, dtype=np.float32))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        prefix = getattr(pl_module, "score_prefix", "reward")
        pl_module.log(f"train/{prefix}_{self.name}_failures", float(self.failures))
        pl_module.log(f"train/{prefix}_{self.name}_cache_hits", float(self.cache_hits))

    def state_dict(self) -> dict:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "failures": self.failures}

    def load_state_dict(self, state_dict: dict) -> None:
        self.requests = state_dict.get("requests", 0)
        self.cache_hits = state_dict.get("cache_hits", 0)
        self.failures = state_dict.get("failures", 0)
