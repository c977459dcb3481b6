"""``farm serve`` and ``farm build --server`` on real parts: the server as a real process on a free
loopback port, builds on the local node (buildah, QEMU), a real registry, SIGKILL and restart."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from farm.api import BuildOptions
from farm.platforms import parse_platform
from tests import lab
from tests.lab import processes_running
from tests.servelab import Server, build_id, serving_local_node, small_context, start_server

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, node_workdir: Path, registry: lab.Registry
) -> Iterator[Server]:
    with serving_local_node(
        tmp_path_factory.mktemp("serve"), node_workdir, "--allow-registry", registry.host
    ) as running:
        yield running


# --- the token --------------------------------------------------------------------------------


def test_the_api_refuses_requests_without_the_token_or_with_a_wrong_one(server: Server) -> None:
    assert (server.state / "token").stat().st_mode & 0o777 == 0o600
    for path in ("/api/server", "/api/builds", "/api/nodes", "/metrics"):
        bare = httpx.get(server.url + path)
        assert bare.status_code == 401, path
        assert bare.headers["WWW-Authenticate"].startswith("Bearer")
        assert bare.json()["error"]["message"] == "the farm server needs its token"
        wrong = httpx.get(server.url + path, headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401, path
        assert wrong.json()["error"]["message"] == "the farm server refused the token"
    for method, path in (
        ("POST", "/api/builds"),
        ("POST", "/api/nodes/local/drain"),
        ("DELETE", "/api/builds/x"),
    ):
        assert httpx.request(method, server.url + path).status_code == 401
    # A cookie is a GET-only credential: it changes nothing.
    cookies = {"farm_token": server.token}
    assert httpx.post(server.url + "/api/nodes/local/drain", cookies=cookies).status_code == 401
    assert server.get("/api/server").status_code == 200


def test_farm_build_with_a_wrong_token_says_so_and_exits_1(
    tmp_path: Path, server: Server, registry: lab.Registry
) -> None:
    run = lab.farm(
        "build", "-t", f"{registry.host}/serve/refused:1", str(small_context(tmp_path / "ctx", registry)),
        env={**server.env(), "FARM_SERVER_TOKEN": "wrong-token-of-some-length"},
    )  # fmt: skip
    assert run.code == 1, run.stderr
    assert "error: the farm server refused the token" in run.stderr


def test_the_status_page_takes_the_token_once_then_a_cookie(server: Server) -> None:
    assert httpx.get(server.url + "/").status_code == 401
    with httpx.Client(base_url=server.url, follow_redirects=True) as browser:
        first = browser.get("/", params={"token": server.token})
        assert first.status_code == 200  # redirected to /, the token now in a cookie
        assert first.url.params.get("token") is None
        assert 'http-equiv="refresh"' in first.text
        assert 'data-node="local"' in first.text
        assert browser.get("/").status_code == 200


# --- builds -----------------------------------------------------------------------------------


def test_build_on_the_server_for_two_platforms_then_again_without_uploading(
    tmp_path: Path, server: Server, registry: lab.Registry
) -> None:
    context = small_context(tmp_path / "ctx", registry, text=f"hello {uuid.uuid4()}")
    tag = f"{registry.host}/serve/two:1"
    metadata = tmp_path / "metadata.json"
    run = lab.farm(
        "build", "-t", tag, "--platform", "linux/amd64,linux/arm64", "--progress", "plain",
        "--metadata-file", str(metadata), str(context),
        env=server.env(),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert "sent 3 files" in run.stderr  # Dockerfile, greeting.txt, sub/data.bin
    assert "[linux/arm64 local] building: emulated" in run.stderr  # the same renderer as a local build
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["PLATFORM", "NODE", "MODE", "SECONDS", "DIGEST"]
    assert lines[1].split()[:3] == ["linux/amd64", "local", "native"]
    assert lines[2].split()[:3] == ["linux/arm64", "local", "emulated"]
    index = registry.raw_manifest("serve/two:1")
    listed = [entry["platform"] for entry in index["manifests"]]  # type: ignore[attr-defined]
    assert listed == [{"architecture": "amd64", "os": "linux"}, {"architecture": "arm64", "os": "linux"}]
    assert lines[-1] == f"pushed {tag}@{json.loads(metadata.read_text())['containerimage.digest']}"

    uploaded = server.metrics()[("farm_upload_bytes_received_total", ())]
    again = lab.farm(
        "build", "-t", f"{registry.host}/serve/two:2", "--platform", "linux/amd64,linux/arm64",
        "--progress", "plain", str(context),
        env=server.env(),
    )  # fmt: skip
    assert again.code == 0, again.stderr
    assert "sent 0 of 3 files, 0 bytes" in again.stderr
    assert server.metrics()[("farm_upload_bytes_received_total", ())] == uploaded

    status = server.get(f"/api/builds/{build_id(run.stderr)}").json()
    assert status["state"] == "succeeded"
    assert status["submitter"] == "tests"
    assert [(p["platform"], p["node"], p["mode"], p["state"]) for p in status["platform_results"]] == [
        ("linux/amd64", "local", "native", "success"),
        ("linux/arm64", "local", "emulated", "success"),
    ]


def test_metrics_count_builds_by_platform_mode_and_result(
    tmp_path: Path, server: Server, registry: lab.Registry
) -> None:
    context = small_context(tmp_path / "ctx", registry, text=str(uuid.uuid4()))
    run = lab.farm(
        "build", "-t", f"{registry.host}/serve/metrics:1", "--platform", "linux/amd64,linux/arm64",
        "--no-cache", str(context), env=server.env(),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    metrics = server.metrics()
    native = (("mode", "native"), ("platform", "linux/amd64"), ("result", "success"))
    emulated = (("mode", "emulated"), ("platform", "linux/arm64"), ("result", "success"))
    assert metrics[("farm_builds_finished_total", native)] >= 1
    assert metrics[("farm_builds_finished_total", emulated)] >= 1
    assert (
        metrics[("farm_build_duration_seconds_count", (("mode", "emulated"), ("platform", "linux/arm64")))]
        >= 1
    )
    assert (
        metrics[
            ("farm_emulation_fallbacks_total", (("platform", "linux/arm64"), ("reason", "no_native_node")))
        ]
        >= 1
    )
    assert metrics[("farm_index_pushes_total", (("result", "success"),))] >= 1
    assert metrics[("farm_queue_wait_seconds_count", ())] >= 1
    assert metrics[("farm_nodes", (("platform", "linux/amd64"), ("state", "up")))] == 1
    assert metrics[("farm_node_slots", (("node", "local"),))] == 8
    assert metrics[("farm_node_busy_slots", (("node", "local"),))] == 0
    assert metrics[("farm_node_heartbeat_age_seconds", (("node", "local"),))] < 60
    assert metrics[("farm_queue_length", ())] == 0
    assert metrics[("farm_builds_running", ())] == 0
    assert metrics[("farm_build_info", (("version", "0.1.0"),))] == 1
    assert metrics[("farm_context_bytes_sent_total", ())] > 0

    # One file more: the node is sent that file only, and the rest of the context counts as skipped.
    (context / "more.txt").write_text("x" * 1000)
    again = lab.farm("build", "-t", f"{registry.host}/serve/metrics:2", "--platform", "linux/amd64",
                     str(context), env=server.env())  # fmt: skip
    assert again.code == 0, again.stderr
    after = server.metrics()
    sent, skipped = ("farm_context_bytes_sent_total", ()), ("farm_context_bytes_skipped_total", ())
    assert after[sent] - metrics[sent] == 1000
    assert after[skipped] - metrics[skipped] == sum(
        path.stat().st_size for path in context.rglob("*") if path.is_file() and path.name != "more.txt"
    )


def test_a_context_the_node_evicted_since_is_sent_again(
    tmp_path: Path, server: Server, registry: lab.Registry, node_workdir: Path
) -> None:
    """The node has evicted the files of a context sent to it before: the next build sends them
    again."""
    context = small_context(tmp_path / "ctx", registry, text=str(uuid.uuid4()))
    build = ["build", "--platform", "linux/amd64", "--no-cache", "--progress", "plain", str(context)]
    first = lab.farm(*build, "-t", f"{registry.host}/serve/evicted:1", env=server.env())
    assert first.code == 0, first.stderr
    blobs = [path for path in node_workdir.rglob("cas/sha256/*") if path.is_file()]
    assert blobs
    for blob in blobs:  # as the store's LRU eviction would, for another build's room
        blob.unlink()
    second = lab.farm(*build, "-t", f"{registry.host}/serve/evicted:2", env=server.env())
    assert second.code == 0, second.stderr
    files = len([path for path in context.rglob("*") if path.is_file()])
    assert f"syncing: sent {files} files" in second.stderr


def test_a_failing_build_exits_as_a_local_one_does(
    tmp_path: Path, server: Server, registry: lab.Registry
) -> None:
    context = tmp_path / "broken"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {registry.host}/library/busybox\nRUN exit 7\n")
    remote = lab.farm("build", "-t", f"{registry.host}/serve/broken:1", str(context), env=server.env())
    local = lab.farm(
        "build", "-t", f"{registry.host}/serve/broken:1", "--inventory", str(server.inventory), str(context)
    )
    assert remote.code == local.code == 1

    def summary(stderr: str) -> list[str]:
        return [line for line in stderr.splitlines() if line.startswith(("error:", "  linux/amd64:"))]

    assert summary(remote.stderr) == summary(local.stderr)
    assert "error: 1 platform(s) failed: linux/amd64; nothing was tagged" in remote.stderr
    assert registry.tags("serve/broken") == []

    bad_tag = lab.farm("build", "-t", "UPPER/case:1", str(context), env=server.env())
    assert bad_tag.code == 2, bad_tag.stderr
    missing = lab.farm(
        "build", "-t", f"{registry.host}/serve/x:1", str(tmp_path / "nowhere"), env=server.env()
    )
    assert missing.code == 2
    assert "does not exist" in missing.stderr


def test_dry_run_asks_the_server(tmp_path: Path, server: Server, registry: lab.Registry) -> None:
    run = lab.farm(
        "build", "--dry-run", "-t", f"{registry.host}/serve/plan:1", "--platform", "linux/amd64,linux/s390x",
        "--emulation", "deny=linux/s390x", str(small_context(tmp_path / "ctx", registry)),
        env=server.env(),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert re.search(r"linux/amd64\s+native\s+local", run.stdout)
    assert re.search(r"linux/s390x\s+FAILS", run.stdout)


def test_ctrl_c_cancels_the_build_on_the_server(
    tmp_path: Path, server: Server, registry: lab.Registry
) -> None:
    marker = f"farm-serve-cancel-{uuid.uuid4().hex[:8]}"
    context = tmp_path / "slow"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {registry.host}/library/busybox\nRUN echo started-{marker}; sleep 3600; echo {marker}\n"
    )
    client = subprocess.Popen(
        [
            sys.executable, "-m", "farm", "build", "-t", f"{registry.host}/serve/cancel:1",
            "--platform", "linux/amd64,linux/arm64", "--progress", "plain", str(context),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **server.env()},
    )  # fmt: skip
    assert client.stdout is not None
    output = []
    try:
        started = set()
        for line in client.stdout:
            output.append(line)
            if line.rstrip().endswith(f"] started-{marker}"):
                started.add(line.split("]")[0])
                if len(started) == 2:
                    break
        assert len(started) == 2, "".join(output)
        client.send_signal(signal.SIGINT)
        rest, _ = client.communicate(timeout=120)
        output.append(rest)
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 130, "".join(output)
    lab.wait_until(lambda: not processes_running(marker), "the builders to be killed", seconds=30)
    status = server.get(f"/api/builds/{build_id(''.join(output))}").json()
    assert status["state"] == "cancelled"
    assert {p["state"] for p in status["platform_results"]} == {"cancelled"}
    assert registry.tags("serve/cancel") == []


def test_a_build_cancelled_by_another_client_exits_130_there_and_in_the_history(
    tmp_path: Path, server: Server, registry: lab.Registry
) -> None:
    marker = f"farm-serve-cancelled-{uuid.uuid4().hex[:8]}"
    context = tmp_path / "slow"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {registry.host}/library/busybox\nRUN echo started-{marker}; sleep 3600\n"
    )
    client = subprocess.Popen(
        [
            sys.executable, "-m", "farm", "build", "-t", f"{registry.host}/serve/cancelled:1",
            "--platform", "linux/amd64", "--progress", "plain", str(context),
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
        build = build_id("".join(output))
        assert server.delete(f"/api/builds/{build}?by=bob").json()["exit_code"] == 130
        rest, _ = client.communicate(timeout=120)
        output.append(rest)
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 130, "".join(output)
    assert f"error: build {build} was cancelled by bob" in "".join(output)
    status = server.get(f"/api/builds/{build}").json()
    assert (status["state"], status["exit_code"]) == ("cancelled", 130)
    lab.wait_until(lambda: not processes_running(marker), "the builder to be killed", seconds=30)
    assert registry.tags("serve/cancelled") == []


def test_the_queue_is_fair_between_submitters(
    tmp_path: Path, registry: lab.Registry, node_workdir: Path
) -> None:
    """One build at a time: a second submitter's build goes before the first one's next builds."""
    marker = f"farm-serve-fair-{uuid.uuid4().hex[:8]}"
    context = tmp_path / "slow"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {registry.host}/library/busybox\nRUN echo started-{marker}; sleep 3600\n"
    )
    inventory = lab.write_inventory(tmp_path / "inventory.yaml", workdir=str(node_workdir))
    server = start_server(
        tmp_path / "state", inventory, "--max-builds", "1", "--allow-registry", registry.host
    )
    running = subprocess.Popen(
        [
            sys.executable, "-m", "farm", "build", "-t", f"{registry.host}/serve/fair:0",
            "--progress", "plain", str(context),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **server.env(), "FARM_SUBMITTER": "ci"},
    )  # fmt: skip
    assert running.stdout is not None
    try:
        output = []
        for line in running.stdout:
            output.append(line)
            if line.rstrip().endswith(f"] started-{marker}"):
                break
        assert output[-1].rstrip().endswith(f"] started-{marker}"), "".join(output)
        # The context is on the server now: submit through the API as any client may.
        [first] = server.get("/api/builds").json()["builds"]

        def submit(submitter: str, n: int) -> str:
            options = BuildOptions(
                tags=(f"{registry.host}/serve/fair:{n}",),
                platforms=(parse_platform("linux/amd64"),),
            ).model_dump(mode="json")
            reply = httpx.post(
                server.url + "/api/builds",
                headers={"Authorization": f"Bearer {server.token}"},
                json={
                    "submitter": submitter,
                    "context": first["context"],
                    "options": options,
                    "dockerfile": f"FROM {registry.host}/library/busybox\n",
                },
            )
            assert reply.status_code == 201, reply.text
            return str(reply.json()["id"])

        ci = [submit("ci", n) for n in (1, 2, 3)]
        alice = submit("alice", 4)
        positions = {build: server.get(f"/api/builds/{build}").json()["position"] for build in [*ci, alice]}
        assert positions == {ci[0]: 0, alice: 1, ci[1]: 2, ci[2]: 3}
        assert server.metrics()[("farm_queue_length", ())] == 4
        assert server.metrics()[("farm_builds_running", ())] == 1
        for build in [*ci, alice]:
            assert server.delete(f"/api/builds/{build}").json()["state"] == "cancelled"
        running.send_signal(signal.SIGINT)
        running.communicate(timeout=120)
    finally:
        running.kill()
        running.wait()
        server.process.terminate()
        server.process.wait(60)
    lab.wait_until(lambda: not processes_running(marker), "the builders to be killed", seconds=30)


def test_draining_a_node_through_the_api(server: Server) -> None:
    drained = server.post("/api/nodes/local/drain")
    assert drained.status_code == 200, drained.text
    assert drained.json()["state"] == "draining"
    assert "local" in (server.state / "drained.json").read_text()
    assert server.metrics()[("farm_nodes", (("platform", "linux/amd64"), ("state", "draining")))] == 1
    undrained = server.post("/api/nodes/local/undrain")
    assert undrained.json()["state"] == "up"
    assert server.post("/api/nodes/nowhere/drain").status_code == 404


# --- crashes and the state folder ---------------------------------------------------------------


def test_a_server_killed_mid_build_keeps_its_history_and_marks_the_build(
    tmp_path: Path, registry: lab.Registry, node_workdir: Path
) -> None:
    state = tmp_path / "state"
    inventory = lab.write_inventory(tmp_path / "inventory.yaml", workdir=str(node_workdir))
    first = start_server(state, inventory, "--allow-registry", registry.host)
    marker = f"farm-serve-kill-{uuid.uuid4().hex[:8]}"
    try:
        done = lab.farm(
            "build", "-t", f"{registry.host}/serve/before:1", str(small_context(tmp_path / "ctx", registry)),
            env=first.env(),
        )  # fmt: skip
        assert done.code == 0, done.stderr
        context = tmp_path / "slow"
        context.mkdir()
        (context / "Dockerfile").write_text(
            f"FROM {registry.host}/library/busybox\nRUN echo started-{marker}; sleep 3600\n"
        )
        client = subprocess.Popen(
            [
                sys.executable, "-m", "farm", "build", "-t", f"{registry.host}/serve/killed:1",
                "--progress", "plain", str(context),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **first.env()},
        )  # fmt: skip
        assert client.stdout is not None
        output = []
        for line in client.stdout:
            output.append(line)
            if line.rstrip().endswith(f"] started-{marker}"):
                break
        first.kill()  # SIGKILL: no chance to tidy up
        rest, _ = client.communicate(timeout=120)
        output.append(rest)
    finally:
        first.kill()
    text = "".join(output)
    assert client.returncode == 1, text
    assert "lost the farm server" in text
    # The agent noticed its coordinator gone and killed the build.
    lab.wait_until(lambda: not processes_running(marker), "the builders to be killed", seconds=30)

    second = start_server(state, inventory, "--allow-registry", registry.host)
    try:
        killed = second.get(f"/api/builds/{build_id(text)}").json()
        assert killed["state"] == "failed"
        assert killed["error"] == "the server stopped while it ran"
        assert [(p["platform"], p["node"], p["mode"], p["state"]) for p in killed["platform_results"]] == [
            ("linux/amd64", "local", "native", "failure")
        ]
        before = second.get(f"/api/builds/{build_id(done.stderr)}").json()
        assert before["state"] == "succeeded"
        assert before["index_digest"]
        assert before["index_digest"] in done.stdout
        assert len(second.get("/api/builds").json()["builds"]) == 2
        stream = second.get(f"/api/builds/{build_id(text)}/events")
        assert stream.json()["error"]["message"] == "the server stopped while it ran"
        # And it builds again.
        after = lab.farm(
            "build", "-t", f"{registry.host}/serve/after:1", str(tmp_path / "ctx"), env=second.env()
        )
        assert after.code == 0, after.stderr
    finally:
        second.process.terminate()
        second.process.wait(60)
    assert second.process.returncode == 0, second.log.read_text()


def test_an_unusable_state_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = lab.farm("serve", "--listen", "127.0.0.1:0", "--state-dir", str(blocker / "state"))
    assert run.code == 2
    assert f"error: the state folder {blocker / 'state'} is unusable: Not a directory" in run.stderr
    assert "hint: pass --state-dir" in run.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "history.sqlite3").write_text("this is not a database, only text of some length" * 100)
    run = lab.farm("serve", "--listen", "127.0.0.1:0", "--state-dir", str(broken))
    assert run.code == 2
    assert f"error: cannot use the build history {broken / 'history.sqlite3'}" in run.stderr


def test_two_servers_never_share_a_state_folder(server: Server) -> None:
    run = lab.farm("serve", "--listen", "127.0.0.1:0", "--state-dir", str(server.state))
    assert run.code == 2
    assert "another farm serve is using the state folder" in run.stderr
