"""One node pool for the life of ``farm serve``, on real parts: the server as a real process, SSH
nodes with real sshds on the SSH lab, builds submitted by ``farm build --server``, real faults.

Its SSH connections (one per node) outlive every build: counted in the nodes' own sshd logs
("Accepted publickey", one line per authenticated connection), a build after the first makes none.
Its health is every build's: a node that one build quarantined is avoided by the next until a
probe of it passes, and the status API shows what the builds see.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import lab, sshlab
from tests.lab import processes_running
from tests.servelab import Server, start_server

pytestmark = pytest.mark.lab


@pytest.fixture
def two(tmp_path: Path) -> Iterator[sshlab.SshLab]:
    with sshlab.ssh_lab(tmp_path, count=2) as running:
        yield running


@pytest.fixture
def lab_registry(tmp_path: Path, two: sshlab.SshLab) -> Iterator[lab.Registry]:
    with lab.running_registry(tmp_path / "registry", two.host_address) as registry:
        yield registry


@pytest.fixture
def server(tmp_path: Path, two: sshlab.SshLab, lab_registry: lab.Registry) -> Iterator[Server]:
    """``farm serve`` over the lab's two SSH nodes, one slot each, probing every 2 s."""
    inventory = two.write_inventory(tmp_path / "inventory.yaml", slots=1)
    running = start_server(
        tmp_path / "state", inventory, "--allow-registry", lab_registry.host, "--allow-host-network"
    )
    try:
        yield running
    finally:
        running.stop()


def handshakes(node: sshlab.SshNode) -> int:
    """SSH connections the node's sshd has authenticated since it started."""
    return node.log.read_text(errors="replace").count("Accepted publickey")


def node_states(server: Server) -> dict[str, str]:
    return {node["name"]: node["state"] for node in server.get("/api/nodes").json()["nodes"]}


def context(root: Path, registry: lab.Registry, run: str) -> Path:
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {registry.host}/library/busybox\nRUN {run}\n")
    return root


def build_command(server: Server, registry: lab.Registry, root: Path, tag: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "farm", "build", "-t", f"{registry.host}/{tag}", "--insecure-registry",
        registry.host, "--platform", "linux/amd64", "--progress", "plain", *extra, str(root),
    ]  # fmt: skip


def build(server: Server, registry: lab.Registry, root: Path, tag: str) -> lab.FarmRun:
    done = subprocess.run(
        build_command(server, registry, root, tag),
        capture_output=True, text=True, timeout=300, env={**os.environ, **server.env()},
    )  # fmt: skip
    return lab.FarmRun(done.returncode, done.stdout, done.stderr)


def assigned(output: str) -> list[str]:
    """The nodes the build's platform was assigned to, in order."""
    return re.findall(r"\[linux/amd64 (\S+)\] assigned:", output)


@pytest.mark.timeout(600)
def test_after_warm_up_a_build_on_farm_serve_makes_no_ssh_handshake(
    tmp_path: Path, two: sshlab.SshLab, lab_registry: lab.Registry, server: Server
) -> None:
    lab.wait_until(lambda: set(node_states(server).values()) == {"up"}, "both nodes probed up", 60)
    first = build(server, lab_registry, context(tmp_path / "one", lab_registry, "echo one"), "pool/one:1")
    assert first.code == 0, first.stderr
    warm = [handshakes(node) for node in two.nodes]
    assert all(count >= 1 for count in warm), warm  # the server connected to each node once at least
    started = time.monotonic()
    second = build(server, lab_registry, context(tmp_path / "two", lab_registry, "echo two"), "pool/two:1")
    assert second.code == 0, second.stderr
    assert "building: native" in second.stderr  # built on a node, not reused
    time.sleep(max(0.0, 4.0 - (time.monotonic() - started)))  # and a probe round or two besides
    assert [handshakes(node) for node in two.nodes] == warm


def kill_agents(node: sshlab.SshNode) -> None:
    """SIGKILL every agent running on ``node`` (its command line names its workdir)."""
    for line in processes_running(f"--workdir {node.workdir}"):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)


@pytest.mark.timeout(600)
def test_a_node_one_build_quarantined_is_avoided_by_the_next_until_its_probe_passes(
    tmp_path: Path, two: sshlab.SshLab, lab_registry: lab.Registry, server: Server
) -> None:
    first, second = two.nodes
    lab.wait_until(lambda: set(node_states(server).values()) == {"up"}, "both nodes probed up", 60)
    # Build A hangs in its RUN step on the first node only (it looks for the node's address on
    # the host network), and passes on the second.
    marker = f"farm-pool-{uuid.uuid4().hex[:8]}"
    hang = f"if ip -4 addr | grep -q ' {first.address}/'; then echo started-{marker}; sleep 3600; fi"
    stuck = context(tmp_path / "a", lab_registry, f"{hang}; echo built")
    a = subprocess.Popen(
        build_command(server, lab_registry, stuck, "pool/a:1", "--network", "host"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **server.env()},
    )  # fmt: skip
    try:
        assert a.stdout is not None
        output = []
        for line in a.stdout:
            output.append(line)
            if line.rstrip().endswith(f"] started-{marker}"):
                break
        assert assigned("".join(output)) == [first.name], "".join(output)
        kill_agents(first)  # a node fault: build A goes on on the second node
        rest, _ = a.communicate(timeout=240)
        output.append(rest)
    finally:
        a.kill()
        a.wait()
    assert a.returncode == 0, "".join(output)
    assert assigned("".join(output)) == [first.name, second.name]
    assert node_states(server) == {first.name: "quarantined", second.name: "up"}

    # Build B: the first node is first in the inventory and idle, but quarantined: B goes to the
    # second without waiting, and the first is not probed before its backoff is over.
    b = build(server, lab_registry, context(tmp_path / "b", lab_registry, "echo b"), "pool/b:1")
    assert b.code == 0, b.stderr
    assert assigned(b.stderr) == [second.name]
    assert node_states(server)[first.name] == "quarantined"

    # Once its probe passes (30 s after the fault, within a probe interval), it takes work again.
    lab.wait_until(lambda: node_states(server)[first.name] == "up", "the first node's probe to pass", 90)
    c = build(server, lab_registry, context(tmp_path / "c", lab_registry, "echo c"), "pool/c:1")
    assert c.code == 0, c.stderr
    assert assigned(c.stderr) == [first.name]
    lab.wait_until(lambda: not processes_running(marker), "build A's lost attempt to be killed", 90)
