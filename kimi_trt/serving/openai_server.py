"""`kimi-trt serve`: an OpenAI- (and Anthropic-) compatible HTTP API for an engine dir.

Endpoints: GET /health, /metrics (Prometheus), /v1/models; POST /v1/chat/completions,
/v1/completions, /v1/messages. Tokens come from the runtime in this process (requests
batched by an EngineBatcher; under mpirun rank 0 serves and the other ranks follow the
runtime's worker loop) or from a Triton server (`--triton HOST:PORT`, gRPC) holding the
repository `kimi-trt triton-repo` made for the same engine dir; `--triton auto` makes that
repository and starts the bundled tritonserver itself, for the life of the API server.

Errors use the caller's API style with the right status: 400 for invalid JSON, bad
parameters (strictly typed, unknown ones refused: schemas.py) and prompts longer than the
engine's max input; 404 for an unknown model;
413 for a body over --max-body-mb; 500 when the backend fails a request; 503 once the
backend cannot serve at all (a multi-rank job lost a rank: `/health` then says so too,
and the server exits non-zero after FAILURE_GRACE_S, ending the job). A client that
disconnects mid-stream cancels its request in the backend (the runtime frees its slot);
one that disconnects while still sending is logged in one line, not as an error.

The event loop only moves bytes: parsing, validation, chat-template rendering and
tokenizing run in a worker thread, so a large body never stalls `/health` or other
requests' streams.
Every refused request is logged in one line. Tool calls in "auto" mode are constrained by
default (`--no-constrain-tool-calls` leaves them to the model, parsed afterwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kimi_trt.errors import UserError
from kimi_trt.runtime.scheduling import DEFAULT_PREFILL_CHUNK, Scheduling
from kimi_trt.serving import anthropic_api, openai_api
from kimi_trt.serving.anthropic_schemas import AnthropicMessagesRequest
from kimi_trt.serving.backends import BackendError, BackendUnavailable
from kimi_trt.serving.metrics import ServerMetrics
from kimi_trt.serving.openai_api import ServerState
from kimi_trt.serving.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
    validation_error,
)
from kimi_trt.serving.transport import DEFAULT_MAX_BODY_MB, listen_socket, read_body

log = logging.getLogger("kimi_trt.serve")
DEFAULT_MODEL_NAME = "kimi-k2"
# After the backend broke: how long the server answers 503 before it stops.
FAILURE_GRACE_S = 2.0
# Counted for a client that went away before its request was read (nginx's convention).
CLIENT_CLOSED = 499


def _error_body(err: APIError, style: str) -> dict[str, Any]:
    return err.anthropic_body() if style == "anthropic" else err.openai_body()


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    if isinstance(exc, UserError):
        return APIError(400, str(exc))
    if isinstance(exc, BackendUnavailable):
        return APIError(503, f"the server cannot serve requests: {exc}", type="server_error")
    return APIError(500, f"generation failed: {exc}", type="server_error")


def _json_body(raw: bytes) -> dict[str, Any]:
    return parse_body(raw)


async def _guarded(stream: AsyncIterator[str], style: str) -> AsyncIterator[str]:
    """Turn a failure after the response started into an error event (and always close)."""
    async with contextlib.aclosing(stream):
        try:
            async for piece in stream:
                yield piece
        except (UserError, BackendError) as e:
            err = _as_api_error(e)
            if style == "anthropic":
                yield anthropic_api.event("error", {"error": err.anthropic_body()["error"]})
            else:
                yield openai_api.sse(err.openai_body())
                yield openai_api.sse("[DONE]")


class Endpoint:
    """One POST endpoint: parse, validate, build the generation, answer whole or streamed."""

    def __init__(self, name: str, schema, build, respond, stream: Callable, style: str):
        self.name, self.schema, self.build = name, schema, build
        self.respond, self.stream, self.style = respond, stream, style

    def prepare(self, state: ServerState, raw: bytes, received: float):
        """Body bytes -> (request, generation): JSON, validation, template, tokens (a thread)."""
        req = self.schema.model_validate(_json_body(raw))
        return req, self.build(state, req, received)

    async def __call__(self, state: ServerState, request):
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        from starlette.requests import ClientDisconnect

        received = time.monotonic()
        try:
            raw = await read_body(request, state.max_body_bytes)
            req, gen = await asyncio.to_thread(self.prepare, state, raw, received)
            if req.stream:
                state.metrics.count(self.name, 200)
                body = self.stream(state, gen, req)
                return StreamingResponse(
                    _guarded(body, self.style),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            result = await self.respond(state, gen)
        except ClientDisconnect:
            log.info("%s: the client disconnected while sending its request", self.name)
            state.metrics.count(self.name, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an API error body
            err = _as_api_error(exc)
            if err.status >= 500 and err.status != 503:
                log.exception("%s failed", self.name)
            else:
                log.warning("%s %d: %s", self.name, err.status, err.message[:300])
            state.metrics.count(self.name, err.status)
            return JSONResponse(_error_body(err, self.style), status_code=err.status)
        state.metrics.count(self.name, 200)
        return JSONResponse(result)


ENDPOINTS = {
    "/v1/chat/completions": Endpoint(
        "chat",
        ChatCompletionRequest,
        openai_api.build_chat,
        openai_api.chat_response,
        lambda s, g, r: openai_api.chat_stream(s, g, r.include_usage),
        "openai",
    ),
    "/v1/completions": Endpoint(
        "completions",
        CompletionRequest,
        openai_api.build_completion,
        openai_api.completion_response,
        lambda s, g, r: openai_api.completion_stream(s, g, r.include_usage),
        "openai",
    ),
    "/v1/messages": Endpoint(
        "messages",
        AnthropicMessagesRequest,
        anthropic_api.build_messages,
        anthropic_api.messages_response,
        lambda s, g, r: anthropic_api.messages_stream(s, g),
        "anthropic",
    ),
}


def create_app(state: ServerState, on_startup=None, on_shutdown=None):
    """The FastAPI app over `state` (startup/shutdown hooks: async callables)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if on_startup is not None:
            await on_startup()
        yield
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(title="kimi_trt", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        err = APIError(exc.status_code, str(exc.detail), code="not_found")
        return JSONResponse(err.openai_body(), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        problem = await state.backend.health()
        body = {"model": state.model_name, "backend": state.backend.description}
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "error": problem, **body}, 503)
        return {"status": "ok", **body}

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": state.model_name,
            "object": "model",
            "created": created,
            "owned_by": "kimi_trt",
            "max_model_len": state.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    def make_route(endpoint: Endpoint):
        async def route(request):  # a plain Starlette route: we parse the body ourselves
            return await endpoint(state, request)

        return route

    for path, endpoint in ENDPOINTS.items():
        app.add_route(path, make_route(endpoint), methods=["POST"], name=endpoint.name)
    return app


def _triton_backend(engine_dir, triton_url: str, triton_model: str | None):
    from kimi_trt.chat.tokenizer import KimiTokenizer
    from kimi_trt.serving.backends import TritonBackend
    from kimi_trt.serving.repo_spec import summarize_engine

    summary = summarize_engine(engine_dir)
    if summary.tokenizer_dir is None:
        raise UserError(f"{engine_dir}: no tiktoken.model; kimi-trt serve needs the tokenizer")
    tokenizer = KimiTokenizer.from_dir(summary.tokenizer_dir)
    backend = TritonBackend(triton_url, summary, tokenizer, triton_model)
    backend.check()
    return backend, summary.max_seq_len


@contextlib.contextmanager
def _own_triton(engine_dir, scheduling, max_batch_size: int | None):
    """`--triton auto`: a repository in a temp dir and the bundled tritonserver for it (leader
    mode for multi-rank engines), both gone when the API server stops. Yields the gRPC URL."""
    import shutil
    import tempfile

    from kimi_trt.serving.repo_spec import RepoOptions, summarize_engine
    from kimi_trt.serving.triton_repo import write_triton_repo
    from kimi_trt.serving.triton_server import TritonServer

    summary = summarize_engine(engine_dir)
    work = Path(tempfile.mkdtemp(prefix="kimi_trt_triton_"))
    try:
        opts = RepoOptions(scheduling=scheduling, triton_max_batch_size=max_batch_size)
        write_triton_repo(engine_dir, work / "repo", opts)
        server = TritonServer(
            work / "repo",
            engine_dir=engine_dir,
            world_size=summary.world_size,
            engine_kind=summary.kind,
            log_file=work / "tritonserver.log",
        )
        log.info("starting tritonserver (log: %s)", work / "tritonserver.log")
        with server.start(timeout=600):
            yield server.grpc_url
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stop_when_fatal(server, failures: list[BaseException]):
    """The backend's on_fatal: remember the error, answer 503 for FAILURE_GRACE_S, stop."""

    def on_fatal(error: BaseException) -> None:
        failures.append(error)
        log.error(
            "the backend failed (%s); answering 503 and stopping in %.0f s",
            error,
            FAILURE_GRACE_S,
        )
        timer = threading.Timer(FAILURE_GRACE_S, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()

    return on_fatal


def _run_app(backend, max_seq_len: int, model_name: str, options: dict[str, Any]) -> None:
    """Serve on options["socket"] until interrupted; re-raise the backend's fatal error."""
    import uvicorn

    if backend.tokenizer is None:
        raise UserError("the engine dir has no tiktoken.model; kimi-trt serve needs the tokenizer")
    host, port = options["host"], options["port"]
    metrics = ServerMetrics(backend.load, getattr(backend, "stats", None))
    if hasattr(backend, "observer"):
        backend.observer = metrics.backend_done
    state = ServerState(
        backend,
        model_name,
        metrics,
        max_seq_len,
        options["default_max_tokens"],
        int(options["max_body_mb"] * 2**20),
        options["constrain_tool_calls"],
    )
    if state.constrain_tool_calls and not backend.supports_constraints:
        log.warning("%s cannot constrain decoding: tool calls are parsed only", backend.description)

    async def startup():
        if hasattr(backend, "start"):
            await backend.start()
        log.info("serving %s on http://%s:%d (%s)", model_name, host, port, backend.description)

    async def shutdown():
        await backend.close()

    app = create_app(state, startup, shutdown)
    config = uvicorn.Config(
        app, log_level=options["log_level"], timeout_graceful_shutdown=5, host=host, port=port
    )
    server = uvicorn.Server(config)
    failures: list[BaseException] = []
    if hasattr(backend, "on_fatal"):
        backend.on_fatal = _stop_when_fatal(server, failures)
    server.run(sockets=[options["socket"]])
    if failures:
        raise failures[0]


def serve(
    engine_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    triton_url: str | None = None,
    triton_model: str | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    max_batch_size: int | None = None,
    batching: str = "continuous",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    prefix_cache: bool = True,
    batch_window_ms: float = 5.0,
    default_max_tokens: int = 1024,
    log_level: str = "info",
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    constrain_tool_calls: bool = True,
) -> None:
    """Run the API server until interrupted (every rank calls this under mpirun)."""
    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception so the
    # cleanups below (engine.shutdown for the other ranks, our own tritonserver) still run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if max_body_mb <= 0:
        raise UserError(f"--max-body-mb must be > 0, got {max_body_mb}")
    scheduling = Scheduling(batching, prefill_chunk, prefix_cache, batch_window_ms)
    options = {
        "host": host,
        "port": port,
        "default_max_tokens": default_max_tokens,
        "log_level": log_level,
        "max_body_mb": max_body_mb,
        "constrain_tool_calls": constrain_tool_calls,
    }
    if triton_url:
        options["socket"] = listen_socket(host, port)
        own = (
            _own_triton(engine_dir, scheduling, max_batch_size)
            if triton_url == "auto"
            else contextlib.nullcontext(triton_url)
        )
        with own as url:
            backend, max_seq_len = _triton_backend(engine_dir, url, triton_model)
            _run_app(backend, max_seq_len, model_name, options)
        return
    from kimi_trt.runtime.engine import load_engine
    from kimi_trt.runtime.failure import run_this_rank
    from kimi_trt.runtime.launch import detect_rank_info
    from kimi_trt.serving.backends import InProcessBackend

    def this_rank() -> int:
        if detect_rank_info().is_driver:  # the port first: a user error in a second
            options["socket"] = listen_socket(host, port)
        engine = load_engine(engine_dir, scheduling=scheduling, max_batch_size=max_batch_size)
        if not engine.is_driver:
            engine.worker_loop()  # ranks > 0 follow rank 0 until it shuts down
            return 0
        try:  # whatever happens on rank 0, release the other ranks
            backend = InProcessBackend(engine, scheduling)
            _run_app(backend, engine.max_seq_len, model_name, options)
        finally:
            engine.shutdown()
        return 0

    # multi-rank: one-line errors and os._exit (a rank's teardown must not fail the job)
    run_this_rank(this_rank)
