"""Batch concurrent requests into `Engine.generate` calls on one thread.

Why: the runtime's `generate(prompts, params, on_token)` runs a whole batch to completion
and streams tokens through a callback; servers receive requests one by one on other
threads. `EngineBatcher` owns the engine: it waits for a request, keeps collecting for a
short window (`window_s`), runs one `generate` over everything collected (each request
with its own sampling parameters) and routes every token to its request's callback.
Requests that arrive during a call wait for the next one; the runtime's generation loop
itself fills freed cache slots from the batch's own queue.

Cancellation: `BatchRequest.cancel()` (client gone) makes the next `on_token` for that
request return False, which ends it in the runtime and frees its slot.

One request never fails another: each is validated alone before it joins a batch, its
callbacks' exceptions cancel only it, and a failure while the runtime samples it ends
only it (the runtime's finish_reason "error"). Only a failure of a whole step (the
engine or the multi-rank job broke) fails the batch. Callbacks run on the batcher thread
and must be quick (hand tokens to another thread).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kimi_trt.errors import UserError
from kimi_trt.runtime.comm import PeerFailure
from kimi_trt.runtime.generate import GenerationResult
from kimi_trt.runtime.sampling import SamplingParams, TokenConstraint

log = logging.getLogger(__name__)

TokenCallback = Callable[[int], "bool | None"]
DoneCallback = Callable[["GenerationResult | None", "BaseException | None"], None]


@dataclass
class BatchRequest:
    """One prompt to continue. `on_token(id)` streams (False cancels); `on_done(result, error)`
    is called exactly once: with the result (finish_reason stop/length/cancelled) or an error.
    `constraint` (optional) restricts its tokens (runtime/sampling.TokenConstraint)."""

    prompt: list[int]
    params: SamplingParams
    on_token: TokenCallback
    on_done: DoneCallback
    constraint: TokenConstraint | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()


class EngineBatcher:
    """Owns a rank-0 Engine; `submit` from any thread, `close` to stop."""

    def __init__(self, engine, window_s: float = 0.005, max_requests: int | None = None):
        self.engine = engine
        self.window_s = window_s
        self.max_requests = max_requests or max(1, 4 * engine.max_batch_size)
        self._queue: queue.Queue[BatchRequest | None] = queue.Queue()
        self._running = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="kimi-batcher", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests submitted but not yet in a generate call."""
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        """The batcher thread is running (False after close or if it died)."""
        return self._thread.is_alive()

    @property
    def running(self) -> int:
        """Requests in the current generate call that have not finished."""
        with self._lock:
            return self._running

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise UserError if the engine cannot run this request (too long, bad ids...)."""
        self.engine.validate_prompts([prompt], [params])

    def submit(self, request: BatchRequest) -> None:
        if self._closed:
            raise RuntimeError("EngineBatcher is closed")
        self._queue.put(request)

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the current batch, fail the waiting requests, stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- batcher thread --------------------------------------------------------------
    def _collect(self) -> list[BatchRequest] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_requests:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    item = self._queue.get(timeout=remaining)
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # keep the stop signal for the loop
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while (batch := self._collect()) is not None:
            self._run(self._admit(batch))
        self._drain_waiting()

    def _admit(self, batch: list[BatchRequest]) -> list[BatchRequest]:
        ready = []
        for req in batch:
            if req.cancelled.is_set():
                req.on_done(GenerationResult(list(req.prompt), [], "cancelled"), None)
                continue
            try:
                self.validate(req.prompt, req.params)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                if not isinstance(e, UserError):
                    log.exception("validating a request failed")
                self._finished(req, None, e)
                continue
            ready.append(req)
        return ready

    def _run(self, batch: list[BatchRequest]) -> None:
        if not batch:
            return
        done = [False] * len(batch)

        def on_token(i: int, token: int) -> bool:
            req = batch[i]
            if req.cancelled.is_set():
                return False
            try:
                keep = req.on_token(token)
            except Exception:  # a broken consumer must not stop the batch
                log.exception("token callback failed; cancelling its request")
                keep = False
            if keep is False:
                req.cancel()
                return False
            return True

        with self._lock:
            self._running = len(batch)
        try:
            results = self.engine.generate(
                [r.prompt for r in batch],
                [r.params for r in batch],
                on_token=on_token,
                constraints=[r.constraint for r in batch],
            )
            for i, (req, result) in enumerate(zip(batch, results, strict=True)):
                done[i] = True
                if result.error is not None:  # this request alone failed (e.g. sampling)
                    log.error("request failed: %s: %s", type(result.error).__name__, result.error)
                    self._finished(req, None, result.error)
                else:
                    self._finished(req, result, None)
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear about it
            if isinstance(e, PeerFailure):  # the job lost a rank: known, said in one line
                log.error("generate failed: %s", e)
            else:
                log.exception("generate failed")
            for i, req in enumerate(batch):
                if not done[i]:
                    self._finished(req, None, e)
        finally:
            with self._lock:
                self._running = 0

    def _finished(self, req: BatchRequest, result, error) -> None:
        try:
            req.on_done(result, error)
        except Exception:
            log.exception("done callback failed")

    def _drain_waiting(self) -> None:
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return
            if req is not None:
                self._finished(req, None, RuntimeError("server is shutting down"))
