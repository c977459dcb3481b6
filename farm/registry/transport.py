"""The HTTP transport under the registry client: TLS set-up and retries of transient failures.

TLS is set up at the first https request (loading the trust store is most of a plain-HTTP
client's set-up), once per process and CA file.

Retries wrap the transport, *under* authentication (as ggcr stacks them): a retried request keeps
the Authorization header the auth flow put on it, and a 401 is never retried here.

What is retried:
 - connection failures (nothing was sent): always;
 - a connection dropped or timing out after the request went out: for idempotent methods only
   (GET, HEAD, PUT, DELETE, OPTIONS), since a POST or PATCH may have taken effect;
 - the answers ``RetryPolicy.statuses`` (408, 429, 500, 502, 503, 504).
A request whose body is a stream is sent once: it cannot be replayed. Waits grow exponentially
with full jitter (a random wait up to ``base_delay * 2**n``, at most ``max_delay``), never less
than a ``Retry-After`` (seconds or an HTTP date), and stop after ``attempts`` tries or when the
next wait would end beyond ``total_seconds`` after the first try. The response or error that ends
the retries says so (``retry_note``).

The decision (``decide``) is a pure function of the attempt; the transport feeds it the time, so
tests inject a clock and a ``sleep`` and never wait.
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx

from farm.errors import InputError

__all__ = [
    "Attempt",
    "Decision",
    "RetryPolicy",
    "RetryTransport",
    "build_transport",
    "decide",
    "is_replayable",
    "parse_retry_after",
    "retry_note",
    "tls_verification",
]

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_NOTE = "farm.retry"
# Failures after the request may have gone out.
_SENT_FAILURES = (
    httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.WriteTimeout,
)  # fmt: skip


@dataclass(frozen=True)
class RetryPolicy:
    # A dataclass, not a pydantic model: only code makes one, and so farm imagetools never
    # imports pydantic.
    attempts: int = 5  # tries in all, the first included
    total_seconds: float = 60.0  # no wait ends later after the first try
    base_delay: float = 0.5  # the first wait is at most this
    max_delay: float = 10.0  # no backoff wait is longer (Retry-After may be)
    statuses: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.total_seconds <= 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"{self}: at least one attempt, a positive total_seconds, no negative delay")


@dataclass(frozen=True)
class Attempt:
    """What happened to one try, as ``decide`` needs it."""

    number: int  # 1 for the first try
    elapsed: float  # seconds from the first try's start to now
    method: str
    replayable: bool
    status: int | None = None  # the answer, or None if the exchange failed
    error: httpx.TransportError | None = None
    retry_after: float | None = None  # seconds


@dataclass(frozen=True)
class Decision:
    delay: float | None  # wait this long and try again; None: stop here
    reason: str = ""  # why not, for the final error ("" if the failure was not retryable at all)


def decide(policy: RetryPolicy, attempt: Attempt, rand: float) -> Decision:
    """Whether and when to try again; ``rand`` in [0, 1) draws the jitter."""
    if attempt.status is not None:
        if attempt.status not in policy.statuses:
            return Decision(None)
    elif not _transient(attempt.error, attempt.method):
        return Decision(None)
    tried = f"{attempt.number} attempt{'s' if attempt.number > 1 else ''}"
    if not attempt.replayable:
        return Decision(None, "not retried: the request body is a stream and cannot be sent again")
    if attempt.number >= policy.attempts:
        return Decision(None, f"gave up after {tried} in {attempt.elapsed:.1f} s")
    backoff = rand * min(policy.max_delay, policy.base_delay * 2 ** (attempt.number - 1))
    delay = max(backoff, attempt.retry_after or 0.0)
    if attempt.elapsed + delay > policy.total_seconds:
        if attempt.retry_after is not None and attempt.retry_after >= backoff:
            return Decision(
                None,
                f"gave up after {tried}: the registry asked to wait {attempt.retry_after:.0f} s, "
                f"beyond farm's {policy.total_seconds:.0f} s retry budget",
            )
        return Decision(None, f"gave up after {tried} in {attempt.elapsed:.1f} s")
    return Decision(delay)


def _transient(error: httpx.TransportError | None, method: str) -> bool:
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return True  # the request never went out
    return isinstance(error, _SENT_FAILURES) and method.upper() in _IDEMPOTENT


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` in seconds from ``now`` (a Unix time): delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(0.0, when.timestamp() - now)


def retry_note(response: httpx.Response) -> str:
    """Why the retry layer let this answer through after retrying ("" if it did not retry)."""
    note = response.extensions.get(_NOTE)
    return note if isinstance(note, str) else ""


class RetryTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._inner = inner
        self._policy = policy or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock
        self._rand = rand

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        replayable = is_replayable(request)
        started = self._clock()
        number = 0
        while True:
            number += 1
            try:
                response = await self._inner.handle_async_request(request)
            except httpx.TransportError as exc:
                attempt = Attempt(number, self._clock() - started, request.method, replayable, error=exc)
                decision = decide(self._policy, attempt, self._rand())
                if decision.delay is None:
                    if not decision.reason:
                        raise
                    message = f"{exc or type(exc).__name__} ({decision.reason})"
                    raise type(exc)(message, request=request) from exc
                await self._sleep(decision.delay)
                continue
            retry_after = parse_retry_after(response.headers.get("retry-after"), self._wall_clock())
            elapsed = self._clock() - started
            attempt = Attempt(
                number, elapsed, request.method, replayable, response.status_code, retry_after=retry_after
            )
            decision = decide(self._policy, attempt, self._rand())
            if decision.delay is None:
                if decision.reason:
                    response.extensions[_NOTE] = decision.reason
                return response
            await response.aclose()
            await self._sleep(decision.delay)

    async def aclose(self) -> None:
        await self._inner.aclose()


def tls_verification(ca_file: str | Path | None) -> ssl.SSLContext:
    """What httpx's ``verify`` gets: the default trust store, plus ``ca_file`` if given.

    Made once per process and CA file: loading the trust store takes ~20 ms, which a server
    running many short builds would otherwise pay on its event loop for every one.
    """
    return _tls_context(None if ca_file is None else str(ca_file))


@functools.cache
def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise InputError(f"CA file {ca_file} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise InputError(f"CA file {ca_file} is not a PEM certificate bundle: {exc}") from None


class _LazyTlsTransport(httpx.AsyncBaseTransport):
    """httpx's transport, one for each scheme; the https one is made by the first https request."""

    def __init__(self, ca_file: str | Path | None) -> None:
        self._ca_file = ca_file
        # For http:// only. httpx gives every transport a TLS context; this one trusts no
        # certificate, so TLS through it would fail, never go unverified.
        self._plain = httpx.AsyncHTTPTransport(verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        self._tls: httpx.AsyncHTTPTransport | None = None
        if ca_file is not None:
            self._tls_transport()  # a CA file that does not load is an error where it is given

    def _tls_transport(self) -> httpx.AsyncHTTPTransport:
        if self._tls is None:
            self._tls = httpx.AsyncHTTPTransport(verify=tls_verification(self._ca_file))
        return self._tls

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self._tls_transport() if request.url.scheme == "https" else self._plain
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._plain.aclose()
        if self._tls is not None:
            await self._tls.aclose()


def build_transport(
    *,
    ca_file: str | Path | None = None,
    retry: RetryPolicy | None = None,
    inner: httpx.AsyncBaseTransport | None = None,
) -> RetryTransport:
    """The registry client's transport: httpx's (with ``ca_file`` trusted) under retries."""
    if inner is not None and ca_file is not None:
        raise ValueError("give either a transport or a CA file: the CA file configures farm's own transport")
    return RetryTransport(inner or _LazyTlsTransport(ca_file), retry)


def is_replayable(request: httpx.Request) -> bool:
    """Whether the request's body is in memory (or absent), so it can be sent again."""
    try:
        request.content  # noqa: B018 - raises for a body that is a stream not read yet
    except httpx.RequestNotRead:
        return False
    return True
