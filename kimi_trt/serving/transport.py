"""HTTP plumbing of `kimi-trt serve`: the bounded request-body read and the listening socket.

Why a body limit: without one a client can make the server hold (and then parse, render
and tokenize) any number of bytes - a 40 MB body took 5.6 s of event-loop time and 1-2
GB of memory. `read_body` refuses a body over the limit with 413: at once when its
Content-Length says so, else as soon as the streamed bytes pass it; either way the rest
of the upload is read and dropped (up to DRAIN_LIMIT), so an HTTP/1.1 client that is
still sending sees the 413 instead of a reset connection.

Why bind first: `serve` binds its port before it loads the engine, so a port in use (or
a host that does not resolve) is a one-line user error in a second - not a failure after
minutes of loading, nor uvicorn's exit code 3 (reserved for a missing capability).
"""

from __future__ import annotations

import os
import socket

from kimi_trt.errors import UserError
from kimi_trt.serving.schemas import APIError

DEFAULT_MAX_BODY_MB = 16.0
# Past this many bytes an oversized upload is not drained any more: the connection closes.
DRAIN_LIMIT = 256 * 2**20


def too_large(size: int, limit: int, exact: bool) -> APIError:
    amount = f"{size} bytes" if exact else f"more than {limit} bytes"
    return APIError(
        413,
        f"The request body ({amount}) exceeds this server's limit of {limit} bytes "
        "(kimi-trt serve --max-body-mb)",
        code="request_too_large",
    )


def _declared_length(request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


async def _drain(stream, received: int) -> None:
    """Read and drop the rest of an oversized upload (bounded by DRAIN_LIMIT)."""
    async for chunk in stream:
        received += len(chunk)
        if received > DRAIN_LIMIT:
            return


async def read_body(request, limit: int) -> bytes:
    """The whole body, or APIError 413 past `limit` bytes. A client that goes away while
    sending raises starlette's ClientDisconnect (the caller answers nobody)."""
    declared = _declared_length(request)
    stream = request.stream()
    if declared is not None and declared > limit:
        if declared <= DRAIN_LIMIT:
            await _drain(stream, 0)
        raise too_large(declared, limit, exact=True)
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _drain(stream, size)
            raise too_large(size, limit, exact=False)
        chunks.append(chunk)
    return b"".join(chunks)


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port for uvicorn; UserError naming what went wrong."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock
