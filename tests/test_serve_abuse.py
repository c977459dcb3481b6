"""``farm serve`` under abuse, as an attacker on this machine would try it: negative and huge sizes,
hostile JSON, slow and many clients, registries it must not contact, a loose state folder. A real
server on a loopback port each time; all traffic goes to 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent import protocol
from farm.api import BuildOptions
from farm.build import _History
from farm.platforms import parse_platform
from farm.serve.history import History
from tests import lab
from tests.servelab import Server, build_id, serving_local_node, start_server

pytestmark = pytest.mark.lab

MiB = 1024 * 1024
FILE = 0o100644
DIGEST_A = "sha256:" + "a" * 64


# --- helpers --------------------------------------------------------------------------------------


def call(
    server: Server, method: str, path: str, content: bytes | None = None, **json: object
) -> httpx.Response:
    return httpx.request(
        method,
        server.url + path,
        content=content,
        json=json or None,
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=60,
    )


def assert_refused(response: httpx.Response, status: int = 400) -> str:
    """A refusal as the API gives it: the status, and one line saying why."""
    assert response.status_code == status, response.text[:500]
    message = str(response.json()["error"]["message"])
    assert message
    assert "\n" not in message
    assert "Traceback" not in response.text
    return message


def assert_responsive(server: Server) -> None:
    """A normal request is answered, and within a second."""
    started = time.monotonic()
    reply = httpx.get(
        server.url + "/api/server", headers={"Authorization": f"Bearer {server.token}"}, timeout=1.0
    )
    assert reply.status_code == 200, reply.text
    assert time.monotonic() - started < 1.0


def stop_with_sigterm(server: Server) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        assert server.process.wait(20) == 0, server.log.read_text()[-3000:]
    finally:
        server.kill()


def kept(state: Path) -> list[str]:
    """Manifests and blobs in the server's store (what a refused upload must not leave)."""
    store = state / "store"
    return sorted(
        str(path.relative_to(store))
        for folder in ("contexts", "cas", "incoming")
        for path in (store / folder).rglob("*")
        if path.is_file()
    )


def blob(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest(*files: tuple[str, bytes]) -> tuple[str, list[list[object]]]:
    """A context of these files: its digest and its entries as the client sends them."""
    entries = [(name, FILE, len(data), blob(data), "") for name, data in files]
    return protocol.context_digest(entries), [list(entry) for entry in entries]


def frames(*files: bytes) -> bytes:
    return b"".join(protocol.encode("blob", digest=blob(data), size=len(data)) + data for data in files)


def sync_body(digest: str, entries_json: bytes) -> bytes:
    return b'{"context": "' + digest.encode() + b'", "entries": ' + entries_json + b"}"


def memory_kib(pid: int, field: str) -> int:
    """VmRSS or VmHWM (the peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


@contextlib.contextmanager
def more_open_files(wanted: int) -> Iterator[None]:
    """This test process may hold ``wanted`` sockets (the soft limit is often 1024; the suite runs
    as root, which may raise the hard one too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = hard if hard == resource.RLIM_INFINITY else max(hard, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), raised))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def half_sent(server: Server, count: int) -> list[socket.socket]:
    """Connections that send half a request line and stall, as a slowloris client does."""
    port = int(server.url.rsplit(":", 1)[1])
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /api/server HTT")
        opened.append(sock)
    return opened


def closed_by_server(sockets: list[socket.socket], seconds: float) -> int:
    """Wait up to ``seconds`` for the server to close these connections; return how many it did."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, sock)
    closed = 0
    deadline = time.monotonic() + seconds
    while closed < len(sockets) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
            ready: socket.socket = key.data
            try:
                data = ready.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                selector.unregister(ready)
                closed += 1
    selector.close()
    return closed


def log_lines(server: Server, text: str) -> list[str]:
    return [line for line in server.log.read_text(errors="replace").splitlines() if text in line]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, node_workdir: Path, registry: lab.Registry
) -> Iterator[Server]:
    with serving_local_node(
        tmp_path_factory.mktemp("abuse"), node_workdir, "--allow-registry", registry.host
    ) as running:
        yield running


# --- sizes and counts -----------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_negative_and_huge_sizes_are_refused_and_the_server_stays_up(
    tmp_path: Path, node_workdir: Path
) -> None:
    with serving_local_node(tmp_path, node_workdir) as server:
        digest, _ = manifest(("a", b"x"))
        too_many = b"[" + b",".join(b'["d%d",16877,0,"",""]' % n for n in range(500_001)) + b"]"
        for entries_json, expected in (
            (b'[["a", 33188, -1, "' + DIGEST_A.encode() + b'", ""]]', "size -1"),
            (
                b'[["a", 33188, 99999999999999999999, "' + DIGEST_A.encode() + b'", ""]]',
                "size 99999999999999999999",
            ),
            (b'[["a", 33188, 1e300, "' + DIGEST_A.encode() + b'", ""]]', "context entry #1"),
            (b'[["a", -1, 0, "", ""]]', "mode -1"),
            (b'[["a", 4294967296, 0, "", ""]]', "mode 4294967296"),
            (b'[["' + b"x" * 5000 + b'", 16877, 0, "", ""]]', "longer than 4096 bytes"),
            (b'[["d/' + b"y" * 300 + b'", 16877, 0, "", ""]]', "component longer than 255 bytes"),
            (too_many, "at most 500000 entries"),
        ):
            reply = call(server, "POST", "/api/contexts/sync", sync_body(digest, entries_json))
            assert expected in assert_refused(reply)
            assert_responsive(server)
        assert kept(server.state) == []

        data = b"one small file"
        digest, entries = manifest(("f", data))
        synced = call(server, "POST", "/api/contexts/sync", context=digest, entries=entries)
        assert synced.status_code == 200, synced.text
        assert synced.json()["missing"] == [blob(data)]
        for frame, expected in (
            (protocol.encode("blob", digest=blob(data), size=-1) + data, "a size of 0 or more"),
            (protocol.encode("blob", digest=blob(data), size=10**18) + data, "is not in context"),
            (protocol.encode("blob", digest=blob(data), size=True) + data, "a size of 0 or more"),
            (protocol.encode("blob", digest="sha256:../../x", size=1) + data, "a sha256 digest"),
            (protocol.encode("blob", digest=blob(data), size=len(data)) + data[:3], "ended inside blob"),
            (b'{"type": "blob", "pad": "' + b"p" * 200_000 + b'"}\n', "header line"),
        ):
            reply = call(server, "POST", f"/api/contexts/{digest}/blobs", frame)
            assert expected in assert_refused(reply)
            assert_responsive(server)
        assert not any(name.startswith(("cas/", "incoming/")) for name in kept(server.state))
        uploaded = call(server, "POST", f"/api/contexts/{digest}/blobs", frames(data))
        assert uploaded.json() == {"received": 1, "bytes": len(data), "complete": True}
        stop_with_sigterm(server)


@pytest.mark.timeout(120)
def test_malformed_manifests_are_refused_before_anything_is_kept(server: Server) -> None:
    digest, _ = manifest(("a", b"x"))
    before = kept(server.state)
    entry = '["{path}", {mode}, {size}, "{digest}", "{link}"]'

    def entries(*items: str) -> bytes:
        return ("[" + ",".join(items) + "]").encode()

    def one(
        path: str = "f", mode: int = FILE, size: int = 1, digest: str = DIGEST_A, link: str = ""
    ) -> bytes:
        return sync_body(
            digest_, entries(entry.format(path=path, mode=mode, size=size, digest=digest, link=link))
        )

    digest_ = digest
    file_ = entry.format(path="f", mode=FILE, size=1, digest=DIGEST_A, link="")
    for body, expected in (
        (b"not json", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "must be a JSON object"),
        (b'{"context": "' + digest.encode() + b'", "entries": ' + b"[" * 100_000, "context entry #1"),
        (b'{"context": "' + digest.encode() + b'"}', "lacks the context's entries"),
        (b'{"entries": []}', "lacks the context's digest"),
        (b'{"context": "sha256:nothex", "entries": []}', "not a context digest"),
        (b'{"context": 7, "entries": []}', "must be its digest"),
        (sync_body(digest, b"{}"), "the list of entries"),
        (sync_body(digest, b"[[],[],[]]"), "context entry #1"),
        (sync_body(digest, entries('["f", 33188, 1, "sha256:x"]')), "context entry #1"),
        (sync_body(digest, entries('["f", 33188, true, "' + DIGEST_A + '", ""]')), "context entry #1"),
        (one(digest="sha256:xyz"),
         "a file needs a sha256 digest"),
        (one(digest=""),
         "a file needs a sha256 digest"),
        (one(path="d", mode=0o40755, size=5, digest=""),
         "only files have a size"),
        (one(path="../f"),
         "'.', '..' or an empty part"),
        (one(path="/etc/f"),
         "absolute or empty path"),
        (sync_body(digest, entries(file_, file_)), "appears twice"),
        (one(path="l", mode=0o120777, size=0, digest="", link="../../etc"),
         "points outside the context"),
        (one(path="f\\u0000"),
         "absolute or empty path"),
        (one(path="f\\ud800"),
         "not valid Unicode"),
        (sync_body(digest, entries(file_)) [:-1] + b', "extra": 1}', "unexpected member"),
        (sync_body(digest, entries(file_)), "does not hash to"),
    ):  # fmt: skip
        reply = call(server, "POST", "/api/contexts/sync", body)
        assert expected in assert_refused(reply), body[:200]
    assert kept(server.state) == before
    # Small requests: their bodies are bounded to what they carry, and their fields checked.
    for path, body, expected in (
        ("/api/builds", b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        ("/api/builds", b"[[]," * (2 * MiB // 4) + b"[]]", "at most"),
        ("/api/builds", b'{"options": {}, "dockerfile": ["FROM x"]}', "must be a string"),
        ("/api/builds", b'{"options": {}, "surprise": 1}', "unexpected field"),
        ("/api/builds", json.dumps({"context": DIGEST_A, "options": {"platforms": "amd64"}}).encode(),
         "platforms must be a list"),
        ("/api/plans", json.dumps({"options": {"tags": ["a/b:1"], "platforms": ["x" * 10_000]}}).encode(),
         "malformed platform"),
        ("/api/plans", b'{"options": {"tags": 7}}', "bad build options"),
    ):  # fmt: skip
        reply = call(server, "POST", path, body)
        assert expected in assert_refused(reply, 413 if expected == "at most" else 400)
    assert_responsive(server)


# --- memory -----------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_48_mib_body_costs_a_small_multiple_of_itself_and_a_running_build_goes_on(
    tmp_path: Path, node_workdir: Path, registry: lab.Registry
) -> None:
    marker = f"farm-abuse-{uuid.uuid4().hex[:8]}"
    context = tmp_path / "slow"
    context.mkdir()
    # The build's own work takes a while; the attack comes while it runs.
    (context / "Dockerfile").write_text(
        f"FROM {registry.host}/library/busybox\nRUN echo started-{marker}; sleep 20; echo {marker}\n"
    )
    with serving_local_node(
        tmp_path, node_workdir, "--allow-registry", registry.host, "--max-builds", "1"
    ) as server:
        client = subprocess.Popen(
            [
                sys.executable, "-m", "farm", "build", "-t", f"{registry.host}/abuse/slow:1",
                "--no-cache", "--progress", "plain", str(context),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **server.env()},
        )  # fmt: skip
        assert client.stdout is not None
        output = []
        try:
            for line in client.stdout:
                output.append(line)
                if line.rstrip().endswith(f"] started-{marker}"):
                    break
            assert output, "farm build said nothing"
            assert output[-1].rstrip().endswith(f"] started-{marker}"), "".join(output)
            pid = server.process.pid
            resident = memory_kib(pid, "VmRSS")
            hostile = b"[]," * (48 * MiB // 3 - 1) + b"[]"
            digest, _ = manifest(("a", b"x"))
            started = time.monotonic()
            reply = call(server, "POST", "/api/contexts/sync", sync_body(digest, b"[" + hostile + b"]"))
            assert "context entry #1" in assert_refused(reply)
            assert time.monotonic() - started < 10
            assert_responsive(server)
            reply = call(server, "POST", "/api/builds", b"[" + hostile + b"]")
            assert "takes a body of at most" in assert_refused(reply, 413)
            assert_responsive(server)
            peak = memory_kib(pid, "VmHWM")
            # The body itself is 48 MiB; parsed as it was before, it cost 28 times that.
            assert peak - resident < 3 * 48 * 1024, (resident, peak)

            # Its platforms as any spelling names them, checked and kept normalised (the build
            # waits behind the running one: --max-builds 1).
            [running] = server.get("/api/builds").json()["builds"]
            options = BuildOptions(
                tags=(f"{registry.host}/abuse/spelled:1",),
                platforms=(parse_platform("linux/arm64"),),
            ).model_dump(mode="json")
            options["platforms"] = ["linux/arm64/v8", {"os": "linux", "architecture": "aarch64"}, "arm64"]
            queued = call(
                server, "POST", "/api/builds", submitter="abuse", context=running["context"], options=options,
                dockerfile=(context / "Dockerfile").read_text(),
            )  # fmt: skip
            assert queued.status_code == 201, queued.text
            waiting = server.get(f"/api/builds/{queued.json()['id']}").json()
            assert waiting["state"] == "queued"
            assert waiting["platforms"] == ["linux/arm64"]
            assert server.delete(f"/api/builds/{waiting['id']}").json()["state"] == "cancelled"

            rest, _ = client.communicate(timeout=240)
            output.append(rest)
        finally:
            client.kill()
            client.wait()
        text = "".join(output)
        assert client.returncode == 0, text
        assert server.get(f"/api/builds/{build_id(text)}").json()["state"] == "succeeded"


# --- slow and many clients --------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_thousand_slow_clients_neither_stall_others_nor_stay(tmp_path: Path, node_workdir: Path) -> None:
    with (
        more_open_files(1500),
        serving_local_node(tmp_path, node_workdir, "--header-timeout", "3s") as server,
    ):
        opened = time.monotonic()
        slow = half_sent(server, 1000)
        try:
            for _ in range(5):
                assert_responsive(server)
            closed = closed_by_server(slow, seconds=3 + 2 - (time.monotonic() - opened))
            assert closed == len(slow), f"{len(slow) - closed} slow connections still open"
        finally:
            for sock in slow:
                sock.close()
        assert_responsive(server)
        # One log line for a thousand closed connections, not a thousand.
        assert 1 <= len(log_lines(server, "sent no whole request within 3 s")) <= 2
        assert log_lines(server, "Too many open files") == []
        stop_with_sigterm(server)


@pytest.mark.timeout(120)
def test_at_the_connection_bound_idle_ones_make_room_and_busy_ones_get_503(
    tmp_path: Path, node_workdir: Path
) -> None:
    with serving_local_node(
        tmp_path, node_workdir, "--max-connections", "4", "--header-timeout", "60s"
    ) as server:
        idle = half_sent(server, 4)
        try:
            assert_responsive(server)  # the oldest idle connection made room
            assert closed_by_server(idle[:1], seconds=5) == 1
        finally:
            for sock in idle:
                sock.close()

        # Busy: each is sending a request body, slowly.
        port = int(server.url.rsplit(":", 1)[1])
        busy = []
        try:
            for _ in range(4):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(
                    b"POST /api/contexts/sync HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Authorization: Bearer " + server.token.encode() + b"\r\nContent-Length: 1000\r\n\r\n{"
                )
                busy.append(sock)

            def refused() -> bool:
                reply = httpx.get(
                    server.url + "/api/server", headers={"Authorization": f"Bearer {server.token}"}, timeout=5
                )
                return reply.status_code == 503

            lab.wait_until(refused, "a newcomer refused at the bound", seconds=10)
            started = time.monotonic()
            reply = httpx.get(server.url + "/api/server", timeout=5)
            assert time.monotonic() - started < 1.0
            assert "bound of 4 connections" in assert_refused(reply, 503)
        finally:
            for sock in busy:
                sock.close()

        def answered() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (
                    httpx.get(
                        server.url + "/api/server",
                        headers={"Authorization": f"Bearer {server.token}"},
                        timeout=1,
                    ).status_code
                    == 200
                )
            return False

        lab.wait_until(answered, "the server answering once the busy connections went", seconds=10)
        stop_with_sigterm(server)


# --- registries --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_build_naming_a_registry_not_allowed_is_refused(server: Server, registry: lab.Registry) -> None:
    options = {"tags": [f"{registry.host}/abuse/ok:1"], "platforms": ["linux/amd64"]}
    allowed_base = f"FROM {registry.host}/library/busybox\n"
    for changed, dockerfile, host in (
        ({"tags": ["127.0.0.1:1/abuse/elsewhere:1"]}, allowed_base, "127.0.0.1:1"),
        ({}, "FROM 127.0.0.1:2/library/busybox\n", "127.0.0.1:2"),
        ({}, "ARG BASE=localhost:3/x\nFROM $BASE AS one\nFROM one\n", "localhost:3"),
        ({}, "FROM busybox\n", "docker.io"),  # not given with --allow-registry: not the default either
        ({"insecure_registries": ["127.0.0.1:4"]}, allowed_base, "127.0.0.1:4"),
    ):
        reply = call(
            server, "POST", "/api/builds", submitter="abuse", context=DIGEST_A,
            options=options | changed, dockerfile=dockerfile,
        )  # fmt: skip
        message = assert_refused(reply)
        assert f"registry {host}" in message
        assert f"--allow-registry {host}" in message
    plan = call(server, "POST", "/api/plans", options=options | {"tags": ["127.0.0.1:1/abuse/x:1"]})
    assert "--allow-registry 127.0.0.1:1" in assert_refused(plan)
    assert server.get("/api/builds").json()["builds"] == []


@pytest.mark.timeout(60)
def test_plans_take_platforms_in_any_spelling(server: Server, registry: lab.Registry) -> None:
    options = {
        "tags": [f"{registry.host}/abuse/plan:1"],
        "platforms": ["linux/x86_64", "amd64", "linux/arm64/v8"],
    }
    reply = call(server, "POST", "/api/plans", options=options)
    assert reply.status_code == 200, reply.text
    assert [decision["platform"] for decision in reply.json()["decisions"]] == ["linux/amd64", "linux/arm64"]


# --- the store --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_uploads_without_a_build_stay_within_the_store_limit(tmp_path: Path, node_workdir: Path) -> None:
    limit = 1 * MiB
    with serving_local_node(tmp_path, node_workdir, "--store-limit", "1MiB") as server:
        blobs = server.state / "store" / "cas" / "sha256"
        for n in range(6):
            data = os.urandom(300_000) + bytes([n])
            digest, entries = manifest((f"f{n}", data))
            synced = call(server, "POST", "/api/contexts/sync", context=digest, entries=entries)
            assert synced.json()["missing"] == [blob(data)], synced.text
            uploaded = call(server, "POST", f"/api/contexts/{digest}/blobs", frames(data))
            assert uploaded.json()["complete"] is True, uploaded.text
            stored = sum(path.stat().st_size for path in blobs.iterdir())
            assert stored <= limit, f"{stored} bytes kept after upload {n}"
        # The newest survive: eviction takes the least recently used.
        assert (blobs / blob(data).removeprefix("sha256:")).exists()
        digest, entries = manifest(("big", os.urandom(600_000)), ("bigger", os.urandom(600_000)))
        reply = call(server, "POST", "/api/contexts/sync", context=digest, entries=entries)
        assert "more than the server's store holds" in assert_refused(reply)
        stop_with_sigterm(server)


# --- permissions ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_loose_state_folder_is_made_private_at_start(tmp_path: Path, node_workdir: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    History.open(state / "history.sqlite3").close()
    (state / "serve.lock").touch()
    (state / "drained.json").write_text("[]")
    (state / "store").mkdir()
    for path in (state / "history.sqlite3", state / "serve.lock", state / "drained.json"):
        path.chmod(0o644)
    (state / "store").chmod(0o755)
    inventory = lab.write_inventory(tmp_path / "inventory.yaml", workdir=str(node_workdir))
    server = start_server(state, inventory)
    try:

        def mode(path: Path) -> int:
            return stat.S_IMODE(path.stat().st_mode)

        assert mode(state) == 0o700
        for name in ("history.sqlite3", "history.sqlite3-wal", "history.sqlite3-shm", "serve.lock", "token"):
            assert mode(state / name) == 0o600, name
        assert mode(state / "drained.json") == 0o600
        for name in ("store", "store/cas", "store/contexts"):
            assert mode(state / name) == 0o700, name
    finally:
        stop_with_sigterm(server)


def test_the_clients_history_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "history.json"
    _History(path, {("key", parse_platform("linux/amd64")): "local"}).save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    _History.load(path).save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.timeout(60)
def test_the_host_network_is_refused_unless_the_operator_allows_it(
    server: Server, registry: lab.Registry
) -> None:
    options = {"tags": [f"{registry.host}/abuse/net:1"], "platforms": ["linux/amd64"], "network": "host"}
    message = assert_refused(call(server, "POST", "/api/plans", options=options))
    assert "--network host" in message
    assert call(server, "POST", "/api/plans", options=options | {"network": "default"}).status_code == 200
