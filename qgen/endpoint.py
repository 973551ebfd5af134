"""One OpenAI-compatible ``/chat/completions`` endpoint, as the LLM judge and the served solver use it.

- The API key is read from the environment variable ``api_key_env`` when connecting and only ever sent in the
  ``Authorization`` header: never an argument, so it never reaches a config, hparams, logs or checkpoints.
- :meth:`ChatEndpoint.connect` probes ``GET /models``: an unreachable server or a rejected key fails there, with
  a message naming ``base_url``.
- Each attempt has a total deadline of ``timeout`` seconds (connect, send and every read together: a server
  that drips a byte at a time cannot hold a step); timeouts, connection errors, HTTP 429 and 5xx are retried
  ``max_retries`` times with exponential backoff (``backoff`` x 2^attempt seconds, or the server's
  ``Retry-After`` when longer, up to ``max_retry_after``); other 4xx errors are not retried. A reply the caller
  cannot use (its ``parse`` returns ``None`` or raises) is a failed call too.
- Circuit breaker: after ``max_consecutive_failures`` failed calls in a row, :attr:`ChatEndpoint.tripped` is set
  (the caller decides whether that stops the run or skips the endpoint for the rest of it).
- At most ``concurrency`` connections are open.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

try:  # the HTTP client of the Hugging Face stack (huggingface_hub depends on it)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older stacks ship the original package name
    import httpx


class EndpointError(RuntimeError):
    """The endpoint is unreachable, rejects us, or keeps failing."""


class ChatEndpoint:
    """See the module docstring. ``who`` names the user in messages (``OpenAIJudge``, ``ServedSolver``);
    ``error``: the exception class raised (a subclass of :class:`EndpointError`).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, concurrency: int = 4, max_consecutive_failures: int = 8,
                 max_retry_after: float = 60.0, who: str = "endpoint",
                 error: type[EndpointError] = EndpointError):  # fmt: skip
        if timeout <= 0 or max_retries < 0 or backoff < 0 or concurrency < 1 or max_consecutive_failures < 1:
            raise ValueError(f"{who}: need timeout > 0, max_retries >= 0, backoff >= 0, concurrency >= 1, "
                             "max_consecutive_failures >= 1")  # fmt: skip
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout, self.max_retries, self.backoff, self.concurrency = timeout, max_retries, backoff, concurrency
        self.max_consecutive_failures, self.max_retry_after = max_consecutive_failures, max_retry_after
        self.who, self.error = who, error
        self.requests = self.failures = self.consecutive_failures = 0
        self.tripped = False
        self.last_error = ""
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def connect(self, check: bool = True) -> None:
        """Open the HTTP client (key from the environment) and, with ``check``, probe the endpoint."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.timeout),
                                    limits=limits)  # fmt: skip
        if not check:
            return
        try:
            response = self._client.get("/models")
        except httpx.TransportError as err:  # connection refused, DNS, timeout
            raise self.error(f"{self.who}: cannot reach {self.base_url} ({type(err).__name__}); start the server, "
                             "fix base_url, or remove it from the config") from None  # fmt: skip
        if response.status_code in (401, 403):
            env = f"${self.api_key_env}" if self.api_key_env else "no key"
            raise self.error(f"{self.who}: {self.base_url} rejected the API key ({env}): HTTP {response.status_code}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def post(self, body: dict, path: str = "/chat/completions") -> tuple[int, dict, bytes]:
        """One attempt under a total deadline of ``timeout`` seconds: ``(status, headers, body)``.

        The request runs in a daemon thread that streams the body and gives up at the deadline; should the
        server stall inside the headers, the thread is left behind (a daemon: it never blocks the exit) and
        this attempt fails at the deadline all the same.
        """
        if self._client is None:
            self.connect(check=False)
        deadline = time.monotonic() + self.timeout
        result: dict = {}

        def work() -> None:
            try:
                with self._client.stream("POST", path, json=body) as response:
                    chunks = []
                    for chunk in response.iter_bytes():
                        chunks.append(chunk)
                        if time.monotonic() > deadline:
                            raise TimeoutError("total deadline")
                    result["value"] = (response.status_code, dict(response.headers), b"".join(chunks))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                result["error"] = err

        worker = threading.Thread(target=work, daemon=True, name="qgen-endpoint-request")
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()) + 0.05)
        if worker.is_alive() or isinstance(result.get("error"), TimeoutError):
            raise TimeoutError(f"no complete reply within {self.timeout:g} s")
        if "error" in result:
            raise result["error"]
        return result["value"]

    def retry_after(self, headers: dict) -> float:
        value = {k.lower(): v for k, v in headers.items()}.get("retry-after")
        if not value:
            return 0.0
        try:
            seconds = float(value)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return 0.0
        return min(max(seconds, 0.0), self.max_retry_after)

    def call(self, body: dict, parse: Callable[[dict], tuple[Any, str]], raise_on_failure: bool,
             what: str = "answer a request") -> Any:  # fmt: skip
        """POST ``body`` (``model`` added) with retries; ``parse(reply json) -> (value, why not)`` turns a reply
        into a value (``None`` with a reason: a failed attempt). Returns the value, or ``None`` after the last
        attempt (:attr:`error` instead with ``raise_on_failure``).
        """
        body = {"model": self.model, **body}
        last, attempts, wait = "", 0, 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(max(self.backoff * 2 ** (attempt - 1), wait))
            wait = 0.0
            attempts += 1
            with self._lock:
                self.requests += 1
            try:
                status, headers, content = self.post(body)
            except (httpx.TransportError, TimeoutError) as err:  # timeouts included
                last = f"{type(err).__name__}: {err}" if isinstance(err, TimeoutError) else type(err).__name__
                continue
            if status == 429 or status >= 500:
                last, wait = f"HTTP {status}", self.retry_after(headers)
                continue
            if status >= 400:
                last = f"HTTP {status}"
                break  # a bad request does not get better by repeating it
            try:
                value, last = parse(json.loads(content))
            except (ValueError, KeyError, IndexError, TypeError):
                value, last = None, "malformed response"
            if value is not None:
                with self._lock:
                    self.consecutive_failures = 0
                return value
        with self._lock:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = last
            if self.consecutive_failures >= self.max_consecutive_failures:
                self.tripped = True
        if raise_on_failure:
            plural = "attempt" if attempts == 1 else "attempts"
            raise self.error(f"{self.who}: {self.base_url} could not {what} after {attempts} {plural} (last: {last})")
        return None
