"""Rank 0's control channel: commands to every rank, a heartbeat when idle, failure state.

Why: the other ranks follow rank 0's broadcast commands. A peer that is killed or stopped
shows itself only inside a collective, so an idle job would not notice, and a server
would keep answering `/health` ok over a dead job and hang its next request. The channel

- runs each command (broadcast + local execution) under one lock, so commands from the
  generating thread and the heartbeat never interleave;
- sends a `ping` (a broadcast, then a one-element all_reduce with the collective timeout)
  whenever no command went out for `interval_s`, so a stuck or dead peer is found within
  interval_s + the collective timeout even with no traffic - and workers, which wait for
  the next command with a finite timeout, always get one while rank 0 lives;
- remembers the first failure of a multi-rank command: the ranks are then out of step
  for good, so every later command fails at once with PeerFailure (never a wait on a
  broken group), and `on_failure` (the server: answer 503, then exit) hears of it once.

In a world of one there are no peers: commands just run, and nothing is ever marked failed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kimi_trt.runtime.comm import Comm, PeerFailure

PING = ("ping",)


class ControlChannel:
    """Commands from rank 0 (see the module docstring). `execute(cmd)` runs one locally."""

    def __init__(self, comm: Comm, execute: Callable[[tuple], Any], interval_s: float):
        self._comm = comm
        self._execute = execute
        self._interval = interval_s
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        self._thread: threading.Thread | None = None
        if not comm.is_single:
            self._thread = threading.Thread(target=self._beat, name="kimi-heartbeat", daemon=True)
            self._thread.start()

    def send(self, cmd: tuple) -> Any:
        """Broadcast `cmd` and run it here; PeerFailure at once if the job already failed."""
        if self._comm.is_single:
            return self._execute(cmd)
        with self._lock:
            self._check()
            try:
                return self._run(cmd)
            except Exception as e:  # noqa: BLE001 - any error leaves the ranks out of step
                self.failure = failed = e
        self._notify()
        raise failed

    def close(self, farewell: tuple | None = None) -> None:
        """Stop the heartbeat; broadcast `farewell` (e.g. shutdown) if the job is healthy."""
        self._stop.set()
        if self._comm.is_single:
            return
        with self._lock:
            if farewell is not None and self.failure is None:
                self._comm.broadcast_object(farewell)

    def _check(self) -> None:
        if self.failure is not None:
            raise PeerFailure(f"the job lost a rank earlier ({self.failure})")

    def _run(self, cmd: tuple) -> Any:
        try:
            self._comm.broadcast_object(cmd)
            return self._execute(cmd)
        finally:
            self._last = time.monotonic()

    def _beat(self) -> None:
        delay = self._interval
        while not self._stop.wait(delay):
            with self._lock:
                if self._stop.is_set() or self.failure is not None:
                    return
                idle = time.monotonic() - self._last
                if idle < self._interval:
                    delay = self._interval - idle
                    continue
                delay = self._interval
                try:
                    self._run(PING)
                    continue
                except Exception as e:  # noqa: BLE001 - as in send()
                    self.failure = e
            self._notify()
            return

    def _notify(self) -> None:
        callback = self.on_failure
        self.on_failure = None  # once
        if callback is not None:
            callback(self.failure)
