"""What keeps ``farm serve`` answering under abuse: a bound on connections, time limits on what
clients send, bounded request bodies, and logs that no flood of one error can fill.

    a connection opens ─► under ``max_connections``: aiohttp's handler, which must receive a whole
                          request head within ``header_timeout``; after each response the next
                          head gets as long (aiohttp's keep-alive timer, set to the same time)
                        ─► at the bound: the connection idle longest (no request in progress,
                          a slow or stalled head included) is closed to make room; if every one
                          has a request in progress, the newcomer is answered 503 at once
    a request body     ─► ``read_body``: refused past its endpoint's size, or once no byte has
                          come for ``body_timeout``
    a log record       ─► ``RepeatFilter``: one line per identical message per interval; the
                          next one that gets through says how many were left out

The connections are counted by wrapping aiohttp's protocol in ``_Tracked``, which sees them open
and close; which of them are busy is told by ``middleware`` (a request in progress).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from farm.errors import InputError, ServerError
from farm.serve.wire import error_to_json

__all__ = ["ConnectionGuard", "RepeatFilter", "read_body"]

log = logging.getLogger("farm.serve")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REFUSAL_LINGER = 1.0  # seconds a refused connection may take to send its request, so it reads the 503
_MAX_LINGERING = 64  # refused connections kept lingering at once; beyond, closed straight after the 503


@dataclass(eq=False)
class _Connection:
    handler: Any  # aiohttp's RequestHandler
    idle_since: float
    requests: int = 0  # begun on it
    busy: int = 0  # in progress on it
    deadline: asyncio.TimerHandle | None = field(default=None, repr=False)


class ConnectionGuard:
    """Client connections, counted and bounded: ``protocols`` makes the factory for
    ``loop.create_server``, ``middleware`` goes first in the application's middlewares."""

    def __init__(self, *, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._open: dict[Any, _Connection] = {}
        self._lingering = 0
        self.refused = 0  # answered 503: every connection had a request in progress
        self.evicted = 0  # closed to make room for a newcomer
        self.timed_out = 0  # closed: no whole request head within header_timeout

    @property
    def connections(self) -> int:
        return len(self._open)

    def protocols(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The protocol factory: ``server``'s handlers, each counted, or a refusal at the bound."""

        def protocol() -> asyncio.Protocol:
            if len(self._open) >= self.max_connections and not self._evict():
                self.refused += 1
                log.warning(
                    "refused a connection: all %d connections have a request in progress (--max-connections)",
                    self.max_connections,
                )
                return _Refused(self)
            return _Tracked(self, server())

        return protocol

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Mark the connection busy while its request is handled (outermost middleware)."""
        connection = self._open.get(request.protocol)
        if connection is None:
            return await handler(request)
        connection.requests += 1
        connection.busy += 1
        if connection.deadline is not None:
            connection.deadline.cancel()
            connection.deadline = None
        try:
            return await handler(request)
        finally:
            connection.busy -= 1
            connection.idle_since = time.monotonic()

    def _opened(self, tracked: _Tracked) -> None:
        connection = _Connection(tracked.inner, time.monotonic())
        loop = asyncio.get_running_loop()
        connection.deadline = loop.call_later(self.header_timeout, self._head_due, connection)
        self._open[tracked.inner] = connection

    def _closed(self, tracked: _Tracked) -> None:
        connection = self._open.pop(tracked.inner, None)
        if connection is not None and connection.deadline is not None:
            connection.deadline.cancel()

    def _head_due(self, connection: _Connection) -> None:
        connection.deadline = None
        if connection.requests == 0 and connection.handler in self._open:
            self.timed_out += 1
            log.warning(
                "closed a connection that sent no whole request within %g s (--header-timeout)",
                self.header_timeout,
            )
            connection.handler.force_close()

    def _evict(self) -> bool:
        """Close the connection idle longest to make room; False if every one is busy."""
        idle = [connection for connection in self._open.values() if not connection.busy]
        if not idle:
            return False
        oldest = min(idle, key=lambda connection: connection.idle_since)
        self.evicted += 1
        log.warning("closed an idle connection to make room for a new one (--max-connections)")
        self._open.pop(oldest.handler, None)
        if oldest.deadline is not None:
            oldest.deadline.cancel()
        oldest.handler.force_close()
        return True


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol as the transport sees it, with the guard told when it opens and closes."""

    def __init__(self, guard: ConnectionGuard, inner: Any) -> None:
        self.guard = guard
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.guard._opened(self)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard._closed(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Refused(asyncio.Protocol):
    """A connection beyond the bound: answered 503 at once, closed once its request is in (or soon)."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        error = ServerError(
            f"the farm server is at its bound of {self._guard.max_connections} connections, each with a"
            " request in progress",
            status=503,
            hint="try again in a moment",
        )
        body = json.dumps({"error": error_to_json(error)}).encode()
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        if self._guard._lingering >= _MAX_LINGERING:
            transport.close()
            return
        # Closing before the client's request is in would reset the connection, and with it the
        # answer it has not read yet: take its request (and drop it) first, a moment at most.
        self._guard._lingering += 1
        self._timer = asyncio.get_running_loop().call_later(_REFUSAL_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        self._tail = (self._tail + data)[-4:]
        if b"\r\n\r\n" in self._tail and self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._guard._lingering -= 1


async def read_body(request: web.Request, limit: int, idle_timeout: float) -> bytearray:
    """The request's body: at most ``limit`` bytes, each part within ``idle_timeout`` of the last."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(request, limit)
    body = bytearray()
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                chunk = await request.content.readany()
        except TimeoutError:
            raise InputError(f"the request body stalled: nothing came for {idle_timeout:g} s") from None
        except ConnectionError:
            raise InputError("the client went away while sending the request body") from None
        if not chunk:
            return body
        if len(body) + len(chunk) > limit:
            raise _too_large(request, limit)
        body += chunk


def _too_large(request: web.Request, limit: int) -> web.HTTPRequestEntityTooLarge:
    error = InputError(f"{request.method} {request.path} takes a body of at most {limit} bytes")
    return web.HTTPRequestEntityTooLarge(
        max_size=limit,
        actual_size=request.content_length or limit + 1,
        text=json.dumps({"error": error_to_json(error)}),
        content_type="application/json",
    )


class RepeatFilter(logging.Filter):
    """Let a warning or error through once per ``interval`` for each message; count the others.

    A flood of one message (a client hammering, the process out of file descriptors) costs a line
    per interval, and the next line says how many were left out since the last one.
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._seen: dict[tuple[str, int, str], list[float | int]] = {}  # key -> [when let through, left out]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        key = (record.name, record.levelno, message)
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        if len(self._seen) >= 1000:  # forget the messages that stopped coming
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
        self._seen[key] = [now, 0]
        if seen is not None and seen[1]:
            record.msg = (
                f"{message} ({int(seen[1])} more like it in the last {now - seen[0]:.0f} s not logged)"
            )
            record.args = ()
        return True
