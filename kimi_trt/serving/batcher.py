"""Feed concurrent requests to a rank-0 engine from one thread: continuous or static batching.

Why: servers receive requests one by one on other threads, while an engine is driven by
one thread. `EngineBatcher` owns the engine and runs a thread that
- continuous (the torch executor's engine, default): hands every newly submitted request
  to the engine's generation loop and runs one `step()` at a time, so a request joins
  the running batch at the next step (runtime/generate.py: prefill packed with decode,
  chunked prompts, prefix cache);
- static (Scheduling.batching "static", and engines without a step API: TensorRT-LLM's executors
  batch in flight on their own side): waits for a request, collects for `window_s`, and
  runs one `generate` over the collection (`batch_window_ms`); requests arriving meanwhile wait for the next
  call. Kept as the "before" of bench/serve.py and for those engines.

Cancellation: `GenerationRequest.cancel()` (client gone) ends the request at the next
step (or token) and frees its seat and blocks.

One request never fails another: each is validated alone before it joins, its callbacks'
exceptions end only it, and a failure while the runtime samples it ends only it (finish
reason "error"). Only a failure of a whole step (the engine or the multi-rank job broke)
fails the requests in the engine. Callbacks run on the batcher thread and must be quick
(hand tokens to another thread).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from kimi_trt.errors import UserError
from kimi_trt.runtime.comm import PeerFailure
from kimi_trt.runtime.generate import GenerationRequest, GenerationResult
from kimi_trt.runtime.scheduling import Scheduling

log = logging.getLogger(__name__)


class EngineBatcher:
    """Owns a rank-0 Engine; `submit` from any thread, `close` to stop."""

    def __init__(self, engine, scheduling: Scheduling):
        self.engine = engine
        self.continuous = scheduling.batching == "continuous" and hasattr(engine, "step")
        if self.continuous:
            _ = engine.loop  # made (KV pools allocated) here, before any thread reads stats()
        self.window_s = scheduling.batch_window_ms / 1000.0
        self.max_requests = max(1, 4 * engine.max_batch_size)
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._in_engine = 0  # static: requests of the running generate call
        self._closed = False
        target = self._serve_continuous if self.continuous else self._serve_batches
        self._thread = threading.Thread(target=target, name="kimi-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet generating."""
        queued = self._queue.qsize()
        return queued + self.engine.stats().waiting if self.continuous else queued

    @property
    def running(self) -> int:
        """Requests generating now."""
        return self.engine.stats().running if self.continuous else self._in_engine

    @property
    def alive(self) -> bool:
        """The batcher thread is running (False after close or if it died)."""
        return self._thread.is_alive()

    def stats(self):
        """The engine loop's LoopStats (continuous batching), else None."""
        return self.engine.stats() if self.continuous else None

    def validate(self, prompt: list[int], params) -> None:
        """Raise UserError if the engine cannot run this request (too long, bad ids...)."""
        self.engine.validate_prompts([prompt], [params])

    def submit(self, request: GenerationRequest) -> None:
        if self._closed:
            raise RuntimeError("EngineBatcher is closed")
        self._queue.put(request)

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the requests in the engine, fail the waiting ones, stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- continuous ------------------------------------------------------------------
    def _serve_continuous(self) -> None:
        stopping = False
        while not stopping or self.engine.loop.busy:
            if not stopping:
                idle = not self.engine.loop.busy
                stopping = self._take_new(block=idle)
            try:
                self.engine.step()
            except BaseException as e:  # noqa: BLE001 - every request in the loop hears of it
                self._log_failure(e)
                self.engine.loop.fail_all(e)  # (a failed forward step has done so already)
        self._drain_waiting()

    def _take_new(self, block: bool) -> bool:
        """Hand queued requests to the engine (waiting for one when `block`); True on close."""
        while True:
            try:
                req = self._queue.get(block=block)
            except queue.Empty:
                return False
            block = False
            if req is None:
                return True
            if req.cancelled.is_set():
                _finished(req, _cancelled_result(req), None)
                continue
            try:
                self.engine.submit(req)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                if not isinstance(e, UserError):
                    log.exception("submitting a request failed")
                _finished(req, None, e)

    # ---- static ----------------------------------------------------------------------
    def _serve_batches(self) -> None:
        while (batch := self._collect()) is not None:
            self._run(self._admit(batch))
        self._drain_waiting()

    def _collect(self) -> list[GenerationRequest] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_requests:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # keep the stop signal for the loop
                break
            batch.append(item)
        return batch

    def _admit(self, batch: list[GenerationRequest]) -> list[GenerationRequest]:
        ready = []
        for req in batch:
            if req.cancelled.is_set():
                _finished(req, _cancelled_result(req), None)
                continue
            try:
                self.validate(req.prompt, req.params)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                if not isinstance(e, UserError):
                    log.exception("validating a request failed")
                _finished(req, None, e)
                continue
            ready.append(req)
        return ready

    def _run(self, batch: list[GenerationRequest]) -> None:
        if not batch:
            return
        done = [False] * len(batch)

        def on_token(i: int, token: int) -> bool:
            req = batch[i]
            if req.cancelled.is_set():
                return False
            if req.on_token(token) is False:
                req.cancel()
                return False
            return True

        self._in_engine = len(batch)
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
                    _finished(req, None, result.error)
                else:
                    _finished(req, result, None)
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear about it
            self._log_failure(e)
            for i, req in enumerate(batch):
                if not done[i]:
                    _finished(req, None, e)
        finally:
            self._in_engine = 0

    # ---- both ------------------------------------------------------------------------
    @staticmethod
    def _log_failure(e: BaseException) -> None:
        if isinstance(e, PeerFailure):  # the job lost a rank: known, said in one line
            log.error("generation failed: %s", e)
        else:
            log.exception("generation failed")

    def _drain_waiting(self) -> None:
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return
            if req is not None:
                _finished(req, None, RuntimeError("server is shutting down"))


def _cancelled_result(req: GenerationRequest) -> GenerationResult:
    return GenerationResult(list(req.prompt), [], "cancelled")


def _finished(req: GenerationRequest, result, error) -> None:
    if req.on_done is None:
        return
    try:
        req.on_done(result, error)
    except Exception:  # noqa: BLE001 - a broken consumer must not stop the batcher
        log.exception("done callback failed")
