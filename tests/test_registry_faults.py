"""Transient registry failures: a fault-injecting proxy between farm's client and a real registry
answers 503s, 429s with Retry-After, or drops connections, for the first N matching requests."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from farm.errors import RegistryError
from farm.index import children_of
from farm.registry.client import RegistryClient
from farm.registry.credentials import Credentials, StaticCredentials
from farm.registry.name import Reference, parse_reference
from farm.registry.transport import RetryPolicy
from tests import authlab, lab

pytestmark = pytest.mark.lab

T = TypeVar("T")
FAST = RetryPolicy(attempts=4, base_delay=0.02, max_delay=0.1, total_seconds=20)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@dataclass
class Fault:
    method: str  # "*" for any
    path_part: str  # matches when the path contains it
    times: int  # how many matching requests get it; -1: all of them
    status: int = 0  # 0: drop the connection without an answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Seen:
    method: str
    path: str
    outcome: int | str  # the status sent back, or "dropped"
    authorized: bool


class FaultProxy:
    """A plain-HTTP proxy to ``upstream`` that misbehaves as told (``inject``)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.log: list[Seen] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.host = f"127.0.0.1:{self._httpd.server_address[1]}"

    def inject(self, method: str, path_part: str, times: int, status: int = 0, **fields: Any) -> None:
        self.faults.append(Fault(method, path_part, times, status, **fields))

    def seen(self, method: str, path_part: str = "") -> list[Seen]:
        return [s for s in self.log if s.method == method and path_part in s.path]

    def fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times != 0 and fault.method in ("*", method) and fault.path_part in path:
                    fault.times -= 1 if fault.times > 0 else 0
                    return fault
        return None

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultProxy]:
        thread = threading.Thread(target=self._httpd.serve_forever, name="fault-proxy", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()
            thread.join(10)


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size + 2)[:size]
                    if size == 0:
                        return body
                    body += chunk
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def handle_any(self) -> None:
            body = self.read_body()
            authorized = "Authorization" in self.headers
            fault = proxy.fault_for(self.command, self.path)
            if fault is not None and fault.status == 0:
                proxy.log.append(Seen(self.command, self.path, "dropped", authorized))
                self.close_connection = True
                return
            if fault is not None:
                proxy.log.append(Seen(self.command, self.path, fault.status, authorized))
                self.send_response(fault.status)
                for name, value in fault.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(fault.body)))
                self.end_headers()
                self.wfile.write(fault.body)
                return
            upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length"}
            }
            upstream.request(self.command, self.path, body=body if body else None, headers=headers)
            answer = upstream.getresponse()
            content = answer.read()
            upstream.close()
            proxy.log.append(Seen(self.command, self.path, answer.status, authorized))
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in _HOP_BY_HOP | {"content-length"}:
                    self.send_header(name, value)
            length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(content))
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = handle_any

    return Handler


@pytest.fixture
def proxy(registry: lab.Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host).running() as running:
        yield running


def busybox(proxy: FaultProxy) -> Reference:
    return parse_reference(f"{proxy.host}/library/busybox:latest")


def test_503s_then_success(proxy: FaultProxy) -> None:
    proxy.inject("PUT", "/manifests/", 2, 503, body=b"busy")
    ref = busybox(proxy)

    async def copy_index() -> str:
        async with RegistryClient(retry=FAST) as client:
            manifest = await client.get_manifest(ref)
            return await client.put_manifest(ref.with_tag("faults-503"), manifest.raw, manifest.media_type)

    digest = run(copy_index())
    assert [s.outcome for s in proxy.seen("PUT")] == [503, 503, 201]
    assert proxy.seen("GET", "/manifests/")[0].outcome == 200
    assert digest.startswith("sha256:")


def test_429_retry_after_is_waited_for(proxy: FaultProxy) -> None:
    proxy.inject(
        "GET",
        "/manifests/",
        1,
        429,
        headers={"Retry-After": "1"},
        body=b'{"errors":[{"code":"TOOMANYREQUESTS"}]}',
    )

    async def fetch() -> float:
        async with RegistryClient(retry=FAST) as client:
            started = time.monotonic()
            await client.get_manifest(busybox(proxy))
            return time.monotonic() - started

    assert run(fetch()) >= 1.0
    assert [s.outcome for s in proxy.seen("GET", "/manifests/")] == [429, 200]


def test_dropped_connections_are_retried(proxy: FaultProxy) -> None:
    proxy.inject("*", "/manifests/", 2)

    async def fetch() -> None:
        async with RegistryClient(retry=FAST) as client:
            assert await client.head_manifest(busybox(proxy)) is not None
            await client.get_manifest(busybox(proxy))

    run(fetch())
    assert [(s.method, s.outcome) for s in proxy.log if "/manifests/" in s.path] == [
        ("HEAD", "dropped"),
        ("HEAD", "dropped"),
        ("HEAD", 200),
        ("GET", 200),
    ]


def test_a_request_failing_for_good_reports_request_status_and_answer(proxy: FaultProxy) -> None:
    body = b'{"errors":[{"code":"UNAVAILABLE","message":"down for maintenance"}]}'
    proxy.inject("PUT", "/manifests/", -1, 503, body=body)
    ref = busybox(proxy)

    async def copy_index() -> None:
        async with RegistryClient(retry=FAST) as client:
            manifest = await client.get_manifest(ref)
            await client.put_manifest(ref.with_tag("faults-down"), manifest.raw, manifest.media_type)

    with pytest.raises(RegistryError) as caught:
        run(copy_index())
    error = caught.value
    url = f"http://{proxy.host}/v2/library/busybox/manifests/faults-down"
    assert error.status == 503
    assert error.request == f"PUT {url}"
    tagged = ref.with_tag("faults-down")
    assert error.message.startswith(
        f"cannot push {tagged}: PUT {url} answered HTTP 503 (gave up after 4 attempts in "
    )
    assert error.message.endswith(body.decode())
    assert len(proxy.seen("PUT")) == 4


def test_a_retry_after_beyond_the_budget_is_not_waited_for(proxy: FaultProxy) -> None:
    proxy.inject("GET", "/manifests/", -1, 429, headers={"Retry-After": "3600"}, body=b"slow down")

    async def fetch() -> None:
        async with RegistryClient(retry=FAST) as client:
            await client.get_manifest(busybox(proxy))

    started = time.monotonic()
    with pytest.raises(RegistryError) as caught:
        run(fetch())
    assert time.monotonic() - started < 5
    assert caught.value.status == 429
    assert "the registry asked to wait 3600 s, beyond farm's 20 s retry budget" in caught.value.message
    assert len(proxy.seen("GET", "/manifests/")) == 1


def test_a_streamed_upload_is_sent_once(proxy: FaultProxy) -> None:
    ref = busybox(proxy)
    target = parse_reference(f"{proxy.host}/faults/copy:1")

    async def layer() -> tuple[str, int]:
        async with RegistryClient(retry=FAST) as client:
            child = children_of((await client.get_manifest(ref)).json())[0]
            described = (await client.get_manifest(ref.with_digest(child.digest))).json()["layers"][0]
            return described["digest"], described["size"]

    digest, size = run(layer())
    proxy.inject("PUT", "/blobs/uploads/", 1, 503, body=b"try later")

    async def copy() -> None:
        async with RegistryClient(retry=FAST) as client:
            await client.copy_blob(target, digest, size, ref)

    with pytest.raises(RegistryError) as caught:
        run(copy())
    assert caught.value.status == 503
    assert "not retried: the request body is a stream and cannot be sent again" in caught.value.message
    assert len(proxy.seen("PUT", "/blobs/uploads/")) == 1

    run(copy())  # the fault is spent: the same copy now goes through
    assert proxy.seen("PUT", "/blobs/uploads/")[-1].outcome == 201


def test_an_unreachable_registry_is_given_up_on_in_bounded_time() -> None:
    port = lab.free_port()
    ref = parse_reference(f"127.0.0.1:{port}/x/y:1")

    async def ping() -> None:
        async with RegistryClient(retry=RetryPolicy(attempts=3, base_delay=0.05)) as client:
            await client.ping(ref)

    started = time.monotonic()
    with pytest.raises(RegistryError) as caught:
        run(ping())
    assert time.monotonic() - started < 5
    assert caught.value.message.startswith(f"cannot reach registry 127.0.0.1:{port}: ")
    assert "(gave up after 3 attempts in " in caught.value.message
    assert caught.value.request == f"GET http://127.0.0.1:{port}/v2/"


def test_retries_happen_under_auth(tmp_path: Path) -> None:
    config = authlab.htpasswd_config(tmp_path, {"alice": "pw"})
    with lab.running_registry(tmp_path / "registry", seed=False, extra_config=config) as registry:
        authlab.seed_busybox(registry, "alice", "pw")
        with FaultProxy(registry.host).running() as faulty:
            faulty.inject("PUT", "/manifests/", 2, 502)
            ref = busybox(faulty)
            credentials = StaticCredentials({faulty.host: Credentials("alice", "pw")})

            async def copy_index() -> None:
                async with RegistryClient(credentials=credentials, retry=FAST) as client:
                    manifest = await client.get_manifest(ref)
                    await client.put_manifest(ref.with_tag("under-auth"), manifest.raw, manifest.media_type)

            run(copy_index())
    # The retried PUTs carry the credentials the auth layer put on them once.
    assert [(s.outcome, s.authorized) for s in faulty.seen("PUT")] == [(502, True), (502, True), (201, True)]
    assert [(s.outcome, s.authorized) for s in faulty.seen("GET", "/manifests/")] == [
        (401, False),
        (200, True),
    ]
