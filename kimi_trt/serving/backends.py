"""Where the API server's tokens come from: the runtime in this process, or a Triton server.

Both backends take prompt token ids + SamplingParams (+ an optional OutputSpec, the
request's decoding constraint) and return a `TokenStream`, an async
iterator of generated ids that ends with `finish_reason` set ("stop", "length",
"cancelled") or raises the backend's error. `stream.cancel()` (client gone, stop string
seen) ends the request in the backend and frees its slot:
- `InProcessBackend`: an EngineBatcher on the runtime (rank 0 of a multi-rank job);
  concurrent requests join the runtime's generation loop as they arrive (continuous
  batching; `stats()` gives its running/waiting requests, KV blocks and prefix-cache hits). When the multi-rank job breaks (a peer
  killed, stopped or hung: the runtime's ControlChannel) every request fails with
  BackendUnavailable (HTTP 503), `health()` says why, and `on_fatal` lets the server stop.
- `TritonBackend`: one gRPC bidirectional stream per request (tritonclient.grpc.aio) to
  the repository's `kimi` model (torch executor) or `tensorrt_llm` model (TensorRT-LLM
  engines); cancelling the request cancels its gRPC call, which Triton passes on to the
  model. Tokenising, chat templates and tool parsing stay in the API server, so both
  backends behave the same; the OutputSpec travels as the `output_spec` JSON input and the
  `kimi` model builds the same constraint (the `tensorrt_llm` model cannot constrain).
Each backend's `health()` (None = ok, else the reason) is what `/health` reports: the
runtime's job state, or whether Triton calls the model ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from kimi_trt.chat.constraint import ConstraintFactory, OutputSpec
from kimi_trt.errors import UserError
from kimi_trt.runtime.comm import PeerFailure
from kimi_trt.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)
_END = object()
_F32_TINY = float(np.finfo(np.float32).tiny)


class BackendError(RuntimeError):
    """The backend failed a request for a reason that is not the client's fault."""


class BackendUnavailable(BackendError):
    """The backend can serve no request now (its multi-rank job broke): HTTP 503."""


class TokenStream:
    """Async iterator of one request's generated token ids (see the module docstring)."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.generated = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._on_cancel: Any = None
        self.cancelled = False

    # producer side (any thread)
    def push(self, token: int) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, int(token))

    def finish(self, reason: str | None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.finish_reason is None and self.error is None:
                self.finish_reason, self.error = reason, error
            self._queue.put_nowait(_END)

        self._loop.call_soon_threadsafe(_set)

    # consumer side (event loop)
    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later reads also end
            if self.error is not None:
                raise self.error
            raise StopAsyncIteration
        self.generated += 1
        return item

    def cancel(self) -> None:
        """Stop generating (idempotent); the iterator then ends with finish_reason "cancelled"."""
        if self.cancelled:
            return
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()


class InProcessBackend:
    """The runtime's Engine in this process, behind an EngineBatcher."""

    def __init__(self, engine, scheduling):
        from kimi_trt.serving.batcher import EngineBatcher

        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_input_len = engine.max_input_len
        self.batcher = EngineBatcher(engine, scheduling)
        self.description = "in-process runtime"
        self.constraints = ConstraintFactory(engine.tokenizer)
        self.supports_constraints = bool(getattr(engine, "supports_constraints", False))
        # called with (finish_reason, generated tokens) as the runtime ends each request
        self.observer: Callable[[str, int], None] | None = None
        # called once, from a runtime thread, when the multi-rank job breaks
        self.on_fatal: Callable[[BaseException], None] | None = None
        if engine.world_size > 1 and hasattr(engine, "on_failure"):
            engine.on_failure = self._engine_failed

    @property
    def failure(self) -> BaseException | None:
        """What broke the runtime's multi-rank job (engines of TensorRT-LLM's executors,
        which run their own ranks, report none)."""
        return getattr(self.engine, "failure", None)

    def _engine_failed(self, error: BaseException) -> None:
        if self.on_fatal is not None:
            self.on_fatal(error)
        else:
            log.error("the runtime's multi-rank job failed: %s", error)

    async def health(self) -> str | None:
        """None while requests can be served, else why not."""
        if self.failure is not None:
            return f"the runtime's multi-rank job failed: {self.failure}"
        if not self.batcher.alive:
            return "the batcher thread stopped"
        return None

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        if self.failure is not None:
            raise BackendUnavailable(f"the runtime's multi-rank job failed: {self.failure}")
        self.batcher.validate(prompt, params)

    def load(self) -> int:
        """Requests queued or generating (the queue-depth metric)."""
        return self.batcher.waiting + self.batcher.running

    def stats(self):
        """The runtime loop's LoopStats (None under static batching)."""
        return self.batcher.stats()

    def submit(
        self, prompt: list[int], params: SamplingParams, output: OutputSpec | None = None
    ) -> TokenStream:
        from kimi_trt.runtime.generate import GenerationRequest

        stream = TokenStream(len(prompt))
        constraint = self.constraints.build(output) if output is not None else None

        def on_token(token: int) -> bool:
            if stream.cancelled:
                return False
            stream.push(token)
            return True

        def on_done(result, error) -> None:
            if result is not None and self.observer is not None:
                self.observer(result.finish_reason or "stop", len(result.tokens))
            if error is not None and not isinstance(error, (UserError, BackendError)):
                broken = isinstance(error, PeerFailure) or self.failure is not None
                error = (BackendUnavailable if broken else BackendError)(str(error))
            stream.finish(result.finish_reason if result is not None else None, error)

        request = GenerationRequest(list(prompt), params, on_token, on_done, constraint)
        stream._on_cancel = request.cancel
        self.batcher.submit(request)
        return stream

    async def close(self) -> None:
        await asyncio.to_thread(self.batcher.close)


class TritonBackend:
    """A Triton server holding a repository made by `kimi-trt triton-repo`."""

    def __init__(self, url: str, summary, tokenizer, model: str | None = None):
        self.url = url.removeprefix("grpc://")
        self.summary = summary
        self.tokenizer = tokenizer
        self.max_input_len = summary.max_input_len
        self.model = model or ("kimi" if summary.kind == "torch" else "tensorrt_llm")
        # tensorrtllm_backend's C++ model batches (leading batch dim, stop_words_list); the
        # `kimi` interface (torch executor, and the llmapi repository's model) does not
        self.batched = summary.kind == "trtllm"
        self.description = f"Triton at {self.url}, model {self.model}"
        self.constraints = ConstraintFactory(tokenizer)  # checks specs; the model builds them
        self.supports_constraints = summary.kind == "torch"  # the kimi model on our runtime
        self._client = None
        self._active = 0

    def check(self) -> None:
        """UserError unless the server answers and the model is ready (call before serving)."""
        import tritonclient.grpc as grpcclient

        try:
            client = grpcclient.InferenceServerClient(self.url)
            ready = client.is_model_ready(self.model)
            client.close()
        except Exception as e:  # noqa: BLE001 - any transport error means "not reachable"
            raise UserError(f"Triton at {self.url} is not reachable: {e}") from None
        if not ready:
            raise UserError(f"Triton at {self.url}: model {self.model!r} is not ready")

    async def start(self) -> None:
        """Open the asyncio gRPC client (inside the server's event loop)."""
        import tritonclient.grpc.aio as grpcclient

        self._client = grpcclient.InferenceServerClient(self.url)

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise UserError("the prompt is empty")
        if len(prompt) > self.max_input_len:
            raise UserError(
                f"prompt has {len(prompt)} tokens; this engine accepts at most {self.max_input_len}"
            )

    def load(self) -> int:
        return self._active

    async def health(self) -> str | None:
        """None while Triton reports the model ready, else why not."""
        try:
            ready = await asyncio.wait_for(self._client.is_model_ready(self.model), 5)
        except Exception as e:  # noqa: BLE001 - any transport error means "not reachable"
            return f"Triton at {self.url} is not reachable: {e}"
        return None if ready else f"Triton at {self.url}: model {self.model!r} is not ready"

    def _inputs(
        self, prompt: list[int], params: SamplingParams, output: OutputSpec | None = None
    ) -> list:
        import tritonclient.grpc as grpcclient

        batched = self.batched
        stops = params.stop_token_ids
        if stops is None and self.tokenizer is not None:
            stops = tuple(self.tokenizer.eos_token_ids)
        values: list[tuple[str, np.ndarray]] = [
            ("input_ids", np.asarray(prompt, dtype=np.int32)),
            ("request_output_len", np.asarray([params.max_new_tokens], dtype=np.int32)),
            ("temperature", np.asarray([params.temperature], dtype=np.float32)),
            # float32 would round a tiny top_p to 0, which the model refuses; any top_p
            # below the best token's probability keeps just that token, as this does
            ("runtime_top_p", np.asarray([max(params.top_p, _F32_TINY)], dtype=np.float32)),
            ("runtime_top_k", np.asarray([params.top_k], dtype=np.int32)),
            ("streaming", np.asarray([True])),
        ]
        if params.seed is not None:
            values.append(("seed", np.asarray([params.seed], dtype=np.uint64)))
        if output is not None:
            values.append(("output_spec", np.asarray([output.to_json().encode()], dtype=object)))
        if batched:
            values.append(("input_lengths", np.asarray([len(prompt)], dtype=np.int32)))
            if stops:
                values.append(("end_id", np.asarray([stops[-1]], dtype=np.int32)))
                ids = np.asarray(stops, dtype=np.int32)
                offsets = np.arange(1, len(stops) + 1, dtype=np.int32)
                values.append(("stop_words_list", np.stack([ids, offsets])))
        elif stops:
            values.append(("stop_token_ids", np.asarray(stops, dtype=np.int32)))
        out = []
        for name, value in values:
            if batched:
                value = value[None]
            tensor = grpcclient.InferInput(name, list(value.shape), _triton_dtype(value))
            tensor.set_data_from_numpy(value)
            out.append(tensor)
        return out

    def submit(
        self, prompt: list[int], params: SamplingParams, output: OutputSpec | None = None
    ) -> TokenStream:
        stream = TokenStream(len(prompt))
        task = asyncio.get_running_loop().create_task(self._run(stream, prompt, params, output))
        stream._on_cancel = task.cancel
        return stream

    async def _run(
        self,
        stream: TokenStream,
        prompt: list[int],
        params: SamplingParams,
        output: OutputSpec | None,
    ) -> None:
        request = {"model_name": self.model, "inputs": self._inputs(prompt, params, output)}

        async def requests():
            yield request

        self._active += 1
        reason, produced = None, 0
        try:
            async for result, error in self._client.stream_infer(inputs_iterator=requests()):
                if error is not None:
                    raise _request_error(str(error))
                for token in result.as_numpy("output_ids").reshape(-1):
                    stream.push(int(token))
                    produced += 1
                if not self.batched:
                    reason = result.as_numpy("finish_reason").reshape(-1)[0].decode() or reason
            if reason is None:  # tensorrt_llm reports no reason: infer it from the length
                reason = "length" if produced >= params.max_new_tokens else "stop"
            stream.finish(reason)
        except asyncio.CancelledError:
            stream.finish("cancelled")
        except (UserError, BackendError) as e:
            stream.finish(None, e)
        except Exception as e:  # noqa: BLE001 - transport errors become a backend error
            stream.finish(None, BackendError(f"Triton request failed: {e}"))
        finally:
            self._active -= 1

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def _triton_dtype(value: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(value.dtype)


def _request_error(message: str) -> Exception:
    """Triton error text -> UserError for what our models reject as bad input."""
    internal = "internal error" in message.lower()
    return BackendError(message) if internal else UserError(message)
