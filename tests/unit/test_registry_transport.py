"""farm.registry.transport: retry decisions and the retrying transport, with an injected clock."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from farm.errors import InputError
from farm.registry.transport import (
    Attempt,
    Decision,
    RetryPolicy,
    RetryTransport,
    build_transport,
    decide,
    is_replayable,
    parse_retry_after,
    retry_note,
    tls_verification,
)
from tests.certs import self_signed

POLICY = RetryPolicy()


def attempt(number: int = 1, elapsed: float = 0.0, **fields: object) -> Attempt:
    values: dict[str, object] = {"method": "GET", "replayable": True, "status": 503} | fields
    return Attempt(number, elapsed, **values)  # type: ignore[arg-type]


# -- decide -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(status: int) -> None:
    assert decide(POLICY, attempt(status=status), 0.5).delay == 0.25


@pytest.mark.parametrize("status", [200, 201, 400, 401, 403, 404, 409, 413, 501])
def test_other_statuses_are_not(status: int) -> None:
    assert decide(POLICY, attempt(status=status), 0.5) == Decision(None)


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    assert [decide(POLICY, attempt(n), 0.999).delay for n in (1, 2, 3, 4)] == pytest.approx(
        [0.4995, 0.999, 1.998, 3.996]
    )
    assert decide(POLICY, attempt(1), 0.0).delay == 0.0
    capped = RetryPolicy(attempts=20, base_delay=1, max_delay=3)
    assert decide(capped, attempt(10), 0.5).delay == 1.5


def test_retry_after_is_a_floor() -> None:
    assert decide(POLICY, attempt(status=429, retry_after=7.0), 0.5).delay == 7.0
    assert decide(POLICY, attempt(4, status=429, retry_after=0.1), 1.0).delay == 4.0


def test_attempts_are_bounded() -> None:
    decision = decide(POLICY, attempt(5, elapsed=3.21), 0.5)
    assert decision == Decision(None, "gave up after 5 attempts in 3.2 s")
    assert decide(RetryPolicy(attempts=1), attempt(1), 0.5) == Decision(
        None, "gave up after 1 attempt in 0.0 s"
    )


def test_total_time_is_bounded() -> None:
    policy = RetryPolicy(total_seconds=10)
    assert decide(policy, attempt(2, elapsed=9.0), 0.5).delay == 0.5
    assert decide(policy, attempt(2, elapsed=9.9), 0.5) == Decision(None, "gave up after 2 attempts in 9.9 s")


def test_a_retry_after_beyond_the_budget_gives_up_at_once_and_says_so() -> None:
    decision = decide(POLICY, attempt(status=429, retry_after=3600.0), 0.5)
    assert decision == Decision(
        None, "gave up after 1 attempt: the registry asked to wait 3600 s, beyond farm's 60 s retry budget"
    )


def test_a_stream_is_never_retried() -> None:
    decision = decide(POLICY, attempt(status=503, replayable=False), 0.5)
    assert decision == Decision(None, "not retried: the request body is a stream and cannot be sent again")


def _error(kind: type[httpx.TransportError]) -> httpx.TransportError:
    return kind("boom")


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH"])
@pytest.mark.parametrize("kind", [httpx.ConnectError, httpx.ConnectTimeout])
def test_connection_failures_are_retried_for_every_method(
    kind: type[httpx.TransportError], method: str
) -> None:
    assert decide(POLICY, attempt(status=None, error=_error(kind), method=method), 0.5).delay == 0.25


@pytest.mark.parametrize(
    "kind",
    [httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.WriteTimeout],
)
def test_failures_after_sending_are_retried_for_idempotent_methods_only(
    kind: type[httpx.TransportError],
) -> None:
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        assert decide(POLICY, attempt(status=None, error=_error(kind), method=method), 0.5).delay == 0.25
    for method in ("POST", "PATCH"):
        assert decide(POLICY, attempt(status=None, error=_error(kind), method=method), 0.5) == Decision(None)


@pytest.mark.parametrize("kind", [httpx.PoolTimeout, httpx.LocalProtocolError, httpx.UnsupportedProtocol])
def test_local_failures_are_not_retried(kind: type[httpx.TransportError]) -> None:
    assert decide(POLICY, attempt(status=None, error=_error(kind)), 0.5) == Decision(None)


# -- Retry-After --------------------------------------------------------------------------------


NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (" 0 ", 0.0),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        (format_datetime(datetime(2025, 1, 2, 3, 4, 35, tzinfo=UTC), usegmt=True), 30.0),
        ("Thu, 02 Jan 2025 03:04:35 GMT", 30.0),
        ("Thu, 02 Jan 2025 03:00:00 GMT", 0.0),  # in the past: now
        ("Thursday, 02-Jan-25 03:04:35 GMT", 30.0),  # RFC 850 form: recipients must accept it
        ("Thu, 02 Jan 2025 03:04:35 -0000", None),  # no zone: not an HTTP date
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


# -- The transport ------------------------------------------------------------------------------


class Timeline:
    """An injected clock whose sleeps only move time on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scripted(
    *outcomes: int | Exception | Callable[[httpx.Request], httpx.Response],
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering each request with the next outcome (the last repeats)."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method not in ("GET", "HEAD"):
            request.read()
        outcome = outcomes[min(len(seen), len(outcomes)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        if callable(outcome):
            return outcome(request)
        return httpx.Response(outcome, content=f"status {outcome}".encode())

    return httpx.MockTransport(handle), seen


def transport(inner: httpx.MockTransport, timeline: Timeline, policy: RetryPolicy = POLICY) -> RetryTransport:
    return RetryTransport(
        inner,
        policy,
        sleep=timeline.sleep,
        clock=timeline.clock,
        wall_clock=lambda: NOW + timeline.now,
        rand=lambda: 0.5,
    )


async def send(t: RetryTransport, request: httpx.Request) -> httpx.Response:
    async with httpx.AsyncClient(transport=t) as client:
        return await client.send(request)


def test_retries_until_success() -> None:
    timeline = Timeline()
    inner, seen = scripted(503, 502, 200)
    response = asyncio.run(
        send(transport(inner, timeline), httpx.Request("PUT", "http://r/v2/x", content=b"{}"))
    )
    assert response.status_code == 200
    assert [r.content for r in seen] == [b"{}"] * 3
    assert timeline.sleeps == [0.25, 0.5]
    assert retry_note(response) == ""


def test_honours_retry_after_seconds_and_dates() -> None:
    timeline = Timeline()
    date = format_datetime(datetime.fromtimestamp(NOW + 20, UTC), usegmt=True)
    inner, _ = scripted(
        lambda _: httpx.Response(429, headers={"Retry-After": "3"}),
        lambda _: httpx.Response(503, headers={"Retry-After": date}),
        200,
    )
    response = asyncio.run(send(transport(inner, timeline), httpx.Request("GET", "http://r/v2/")))
    assert response.status_code == 200
    assert timeline.sleeps == [3.0, 17.0]  # the date is 20 s after the start, 3 s have passed


def test_gives_up_with_the_last_answer_and_a_note() -> None:
    timeline = Timeline()
    inner, seen = scripted(503)
    response = asyncio.run(send(transport(inner, timeline), httpx.Request("GET", "http://r/v2/x")))
    assert response.status_code == 503
    assert response.text == "status 503"
    assert len(seen) == 5
    assert retry_note(response) == "gave up after 5 attempts in 3.8 s"
    assert timeline.sleeps == [0.25, 0.5, 1.0, 2.0]


def test_stops_within_the_time_budget() -> None:
    timeline = Timeline()
    inner, seen = scripted(503)
    policy = RetryPolicy(attempts=100, base_delay=4, max_delay=4, total_seconds=10)
    response = asyncio.run(send(transport(inner, timeline, policy), httpx.Request("GET", "http://r/v2/x")))
    assert len(seen) == 6  # waits of 2 s each; the sixth would end after 10 s
    assert timeline.now <= 10
    assert retry_note(response) == "gave up after 6 attempts in 10.0 s"


def test_connection_failures_are_retried_then_reported_with_the_count() -> None:
    timeline = Timeline()
    inner, seen = scripted(httpx.ConnectError("connection refused"))
    request = httpx.Request("GET", "http://r/v2/")
    with pytest.raises(httpx.ConnectError) as caught:
        asyncio.run(send(transport(inner, timeline), request))
    assert str(caught.value) == "connection refused (gave up after 5 attempts in 3.8 s)"
    assert caught.value.request is request
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert len(seen) == 5


def test_a_dropped_connection_then_success() -> None:
    timeline = Timeline()
    inner, seen = scripted(httpx.RemoteProtocolError("Server disconnected"), 200)
    response = asyncio.run(send(transport(inner, timeline), httpx.Request("HEAD", "http://r/v2/x")))
    assert response.status_code == 200
    assert len(seen) == 2


def test_a_post_is_not_resent_after_a_dropped_connection() -> None:
    timeline = Timeline()
    inner, seen = scripted(httpx.ReadError("reset"), 202)
    with pytest.raises(httpx.ReadError, match=r"^reset$"):
        asyncio.run(send(transport(inner, timeline), httpx.Request("POST", "http://r/v2/x/blobs/uploads/")))
    assert len(seen) == 1


async def _chunks() -> AsyncIterator[bytes]:
    yield b"layer"


def test_a_streamed_body_is_sent_once() -> None:
    timeline = Timeline()
    inner, seen = scripted(503, 201)
    request = httpx.Request("PUT", "http://r/v2/x/blobs/uploads/1", content=_chunks())
    assert not is_replayable(request)
    response = asyncio.run(send(transport(inner, timeline), request))
    assert response.status_code == 503
    assert len(seen) == 1
    assert retry_note(response) == "not retried: the request body is a stream and cannot be sent again"


def test_success_at_first_is_passed_through_untouched() -> None:
    timeline = Timeline()
    inner, _ = scripted(404)
    response = asyncio.run(send(transport(inner, timeline), httpx.Request("GET", "http://r/v2/x")))
    assert response.status_code == 404
    assert retry_note(response) == ""
    assert timeline.sleeps == []


# -- TLS ----------------------------------------------------------------------------------------


def test_tls_is_verified_by_default_and_a_ca_file_adds_to_it(tmp_path: Path) -> None:
    default = tls_verification(None)
    assert default.verify_mode == ssl.CERT_REQUIRED
    assert default.check_hostname
    assert tls_verification(None) is default, "the trust store is loaded once per process"
    ca = _self_signed(tmp_path)
    context = tls_verification(ca)
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_bad_ca_files_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        tls_verification(tmp_path / "none.pem")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(InputError, match="is not a PEM certificate bundle"):
        tls_verification(tmp_path / "junk.pem")


def test_a_transport_and_a_ca_file_do_not_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either a transport or a CA file"):
        build_transport(ca_file=tmp_path / "ca.pem", inner=httpx.MockTransport(lambda r: httpx.Response(200)))


def _self_signed(tmp_path: Path) -> Path:
    return self_signed(tmp_path, "farm test CA").cert_path


def test_tls_is_set_up_by_the_first_https_request(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str | Path | None] = []

    def counted(ca_file: str | Path | None) -> ssl.SSLContext:
        asked.append(ca_file)
        return tls_verification(ca_file)

    monkeypatch.setattr("farm.registry.transport.tls_verification", counted)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # a request, or a TLS ClientHello that gets no TLS answer
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def exchange() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = build_transport(retry=RetryPolicy(attempts=1))
        async with server, httpx.AsyncClient(transport=transport) as client:
            assert (await client.get(f"http://127.0.0.1:{port}/v2/")).status_code == 200
            assert asked == [], "plain HTTP never loads the trust store"
            with pytest.raises(httpx.ConnectError):
                await client.get(f"https://127.0.0.1:{port}/v2/")
            assert asked == [None]

    asyncio.run(exchange())


def test_a_retry_policy_makes_sense() -> None:
    for wrong in ({"attempts": 0}, {"total_seconds": 0}, {"base_delay": -1}, {"max_delay": -1}):
        with pytest.raises(ValueError, match="at least one attempt"):
            RetryPolicy(**wrong)  # type: ignore[arg-type]
