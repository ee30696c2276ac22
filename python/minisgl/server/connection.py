"""The client's connection below the routes. `HttpProtocol`: a bounded kernel send buffer (with
autotuning a client that reads nothing parks megabytes there and our sends never block, so
--stall-timeout could not fire) and JSON on uvicorn's own 400. `Gate`: Host / Origin checks
against DNS rebinding and cross-site requests (no Origin, i.e. not a browser, passes).
`until_hangup`, `Stream`: a client's hang-up aborts its requests, queued or streaming."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import h11
from fastapi import Request
from fastapi.responses import StreamingResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from minisgl.args import ServerArgs

from .generation import ApiError, Generation
from .responses import error_body

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpProtocol(H11Protocol):
    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        transport.set_write_buffer_limits(high=16 * 1024)
        super().connection_made(transport)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body(400, f"invalid HTTP request: {msg}")).encode()
        head = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=head), h11.Data(data=body)):
            self.transport.write(self.conn.send(event))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


class Stalled(BaseException):
    """A send to a client that read nothing for --stall-timeout s (a BaseException, so that
    Starlette's handlers let it through to the middleware, which drops the connection)."""


def _host(value: str) -> str:
    """'host[:port]' or '[v6]:port' -> the lowercase host, without brackets."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1 : v.find("]")]
    return v if v.count(":") > 1 else v.rsplit(":", 1)[0]  # a bare IPv6 address has no port


class Gate:
    def __init__(self, args: ServerArgs) -> None:
        loopback = args.host in ("127.0.0.1", "localhost", "::1")
        hosts = args.allowed_hosts or ("localhost,127.0.0.1,::1" if loopback else "*")
        self.hosts = {_host(h) for h in hosts.split(",") if h.strip()}
        origins = (args.allowed_origins or "").split(",")
        self.origins = {o.strip().lower().rstrip("/") for o in origins if o.strip()}

    def refusal(self, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        """(status, message) for a request that must not reach the app, else None."""
        host = _host(headers.get(b"host", b"").decode("latin-1"))
        if "*" not in self.hosts and host not in self.hosts:
            return 400, f"Host {host!r} is not allowed (--allowed-hosts)"
        origin = headers.get(b"origin", b"").decode("latin-1")
        if self.origins:
            ok = "*" in self.origins or origin.lower().rstrip("/") in self.origins
        else:
            ok = "*" in self.hosts or (urlsplit(origin).hostname or "") in self.hosts
        if origin and not ok:
            return 403, f"Origin {origin!r} is not allowed (--allowed-origins)"
        return None


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_hangup(gen: Generation, work: Any, hangup: asyncio.Future) -> None:
    """Run `work` unless the client hangs up first (then abort and answer 499)."""
    task = asyncio.ensure_future(work)
    try:
        if not hangup.done():  # else `work` must not even start
            await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()  # client gone (or we were cancelled): abort in the scheduler
            gen.abort()
    if not task.done() or task.cancelled():
        raise ApiError(499, "client disconnected")
    task.result()  # raises the ApiError of a failed request


class Stream(StreamingResponse):
    """SSE response that aborts its generation however it ends, even when the client left
    before the first chunk (then the body iterator never starts, so its `finally` never runs)."""

    def __init__(self, body: Any, on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
