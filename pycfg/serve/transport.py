"""Connection-level bounds the ASGI server does not set by itself.

uvicorn (h11) already rejects malformed framing (a negative or non-numeric ``Content-Length``, broken chunked
encoding) with 400, decodes chunked bodies, bounds header sizes, closes idle keep-alive connections and answers
503 past ``limit_concurrency``; every connection is a coroutine, never a thread. Two bounds are added here:

- :class:`BodyLimit`: a body over ``max_bytes`` gets 413 (at once from its ``Content-Length``, or as soon as a
  chunked body passes the limit), and a body that stalls for ``read_timeout`` seconds gets 408;
- :class:`HeaderTimeoutH11Protocol`: a connection that has not sent a complete request head within
  ``header_timeout`` seconds (half-open or slow-loris clients) is closed, so such clients cannot hold
  connection slots for ever.
"""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413)


class BodyTimeout(HTTPException):
    def __init__(self) -> None:
        super().__init__(408)


class BodyLimit:
    """ASGI middleware: bounded request bodies (size and time between chunks)."""

    def __init__(self, app, max_bytes: int, read_timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            # h11 has already refused a Content-Length that is not a non-negative integer
            if name == b"content-length" and int(value) > self.max_bytes:
                await _send_error(send, 413, "The request body is too large.")
                return
        received = 0
        complete = False

        async def limited_receive():
            nonlocal received, complete
            if complete:  # later receives only wait for the client to disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that send no complete request head in time.

    Every ``header_timeout`` seconds a connection is looked at: if no new request started since the last look
    and none is running, it is closed. A request that is running (a long generation) is never cut.
    """

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeout(cls, seconds: float) -> type["HeaderTimeoutH11Protocol"]:
        return type(cls.__name__, (cls,), {"header_timeout": float(seconds)})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._look, None)

    def _look(self, cycle_at_last_look) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.cycle is cycle_at_last_look:
            self.transport.close()
            return
        self._header_timer = self.loop.call_later(self.header_timeout, self._look, self.cycle)

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)
