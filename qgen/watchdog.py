"""The hang watchdog: a thread in every rank that turns "waiting forever" into one line and an exit.

Each rank's watchdog thread, every ``heartbeat_s`` seconds:

- publishes a heartbeat (a counter and the stages this rank is in) to the run's rendezvous store (the
  ``MASTER_ADDR:MASTER_PORT`` TCP store every launcher sets up; its own client connection);
- reads the other ranks' heartbeats: a rank whose counter has not moved for ``peer_timeout`` seconds (this
  rank's clock; no clocks are compared across machines) has stopped answering (stopped, killed, swapped out,
  or its host gone); the store itself not answering for as long means rank 0 (its host) is gone;
- checks this rank's own stages (:func:`stage`: generation, scoring, the solver, checkpoint writing) against
  their deadlines.

On any of these it prints one line naming the stage and the rank (``qgen: error: ...``), kills the ranks this
process launched (Lightning's launcher; ``SIGKILL`` ends a stopped process too) and exits the process with
code 3, without unwinding (a stuck collective cannot be unwound). A heartbeat is a thread of its own, so a
rank that is busy (a long generation, a large checkpoint) keeps answering; only a process that no longer runs
stops. Checkpoints are written atomically (``qgen.checkpointing.atomic_torch_save``): an exit in the middle of
one leaves the previous checkpoint in place.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

EXIT_CODE = 3
DEFAULT_DEADLINES = {"generation": 1800.0, "scoring": 900.0, "solver": 900.0, "checkpoint": 900.0}

_active: Watchdog | None = None  # the running watchdog of this process (at most one)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Marks this thread as being in stage ``name`` (its deadline: the watchdog's ``deadlines[name]``)."""
    dog = _active
    if dog is None:
        yield
        return
    token = dog.enter(name)
    try:
        yield
    finally:
        dog.leave(token)


class Watchdog:
    """See the module docstring. ``rank`` / ``world_size``: this process's place; ``launched``: the child
    processes this one started (killed on failure); ``store_address``: ``(host, port)`` of the rendezvous store
    (``None``: no peers to watch, deadlines only).
    """

    def __init__(self, rank: int, world_size: int, peer_timeout: float, heartbeat_s: float = 2.0,
                 deadlines: dict[str, float] | None = None, store_address: tuple[str, int] | None = None,
                 launched: list | None = None, exit_fn=None):  # fmt: skip
        self.rank, self.world_size = rank, world_size
        self.peer_timeout, self.heartbeat_s = float(peer_timeout), float(heartbeat_s)
        self.deadlines = {**DEFAULT_DEADLINES, **(deadlines or {})}
        self.store_address, self.launched = store_address, launched or []
        self.exit_fn = exit_fn or os._exit
        self._stages: dict[int, tuple[str, float]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None
        self.step = 0
        self.failure: str | None = None

    # ------------------------------------------------------------------------------------------ stages
    def enter(self, name: str) -> int:
        with self._lock:
            token = next(self._ids)
            self._stages[token] = (name, time.monotonic())
        return token

    def leave(self, token: int) -> None:
        with self._lock:
            self._stages.pop(token, None)

    def where(self) -> str:
        with self._lock:
            names = [name for name, _ in self._stages.values()]
        return ", ".join(names) if names else "training"

    def overdue(self, now: float) -> tuple[str, float, float] | None:
        """``(stage, seconds in it, deadline)`` of a stage past its deadline."""
        with self._lock:
            stages = list(self._stages.values())
        for name, since in stages:
            limit = self.deadlines.get(name)
            if limit is not None and now - since > limit:
                return name, now - since, limit
        return None

    # ------------------------------------------------------------------------------------------ thread
    def start(self) -> Watchdog:
        global _active
        _active = self
        if self.store_address is not None and self.world_size > 1:
            import torch.distributed as dist

            host, port = self.store_address
            client = dist.TCPStore(host, port, self.world_size, is_master=False,
                                   timeout=timedelta(seconds=max(self.heartbeat_s * 2, 10)))  # fmt: skip
            self._store = dist.PrefixStore("qgen-heartbeat", client)
            self._beat(0)
        self._thread = threading.Thread(target=self._run, name="qgen-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        global _active
        self._stop.set()
        if _active is self:
            _active = None

    def _beat(self, count: int) -> None:
        self._store.set(str(self.rank), f"{count}|{self.step}|{self.where()}")

    def _run(self) -> None:
        seen: dict[int, tuple[str, float]] = {}  # peer -> (its last heartbeat, when it changed, on this clock)
        store_ok = time.monotonic()
        started = time.monotonic()
        for count in itertools.count(1):
            if self._stop.wait(self.heartbeat_s):
                return
            now = time.monotonic()
            late = self.overdue(now)
            if late is not None:
                name, spent, limit = late
                return self.fail(f"rank {self.rank}: {name} has run for {spent:.0f} s, past its deadline of "
                                 f"{limit:.0f} s (step {self.step}); stopping every rank")  # fmt: skip
            if self._store is None:
                continue
            try:
                self._beat(count)
                peers = [r for r in range(self.world_size) if r != self.rank]
                present = [r for r in peers if self._store.check([str(r)])]
                values = dict(zip(present, self._store.multi_get([str(r) for r in present]))) if present else {}
                store_ok = now
            except Exception:  # noqa: BLE001 - the store's host (rank 0) is gone or unreachable
                if self._stop.is_set():
                    return
                if now - store_ok > self.peer_timeout:
                    return self.fail(f"rank {self.rank}: rank 0 (the rendezvous store's host) stopped answering "
                                     f"{now - store_ok:.0f} s ago (step {self.step}); stopping")  # fmt: skip
                continue
            for peer in peers:
                raw = values.get(peer)
                text = raw.decode() if isinstance(raw, bytes) else None
                last = seen.get(peer)
                if text is not None and (last is None or last[0] != text):
                    seen[peer] = (text, now)
                    continue
                since = last[1] if last is not None else started
                if now - since > self.peer_timeout and not self._stop.is_set():
                    where = (last[0].split("|", 2) if last else ["", "?", "start-up"])
                    return self.fail(f"rank {peer} stopped answering: no heartbeat for {now - since:.0f} s (its last: "
                                     f"{where[2]} at step {where[1]}); rank {self.rank}, in {self.where()} at step "
                                     f"{self.step}, stops too")  # fmt: skip

    def fail(self, line: str) -> None:
        """Print ``line``, kill the processes this one launched, exit without unwinding."""
        if self._stop.is_set():
            return
        self.failure = line
        print(f"qgen: error: {line}", file=sys.stderr, flush=True)
        for proc in self.launched:
            with contextlib.suppress(Exception):
                proc.send_signal(signal.SIGKILL)
        self.exit_fn(EXIT_CODE)
