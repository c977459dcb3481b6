"""The SSH lab (tests/sshlab.py) works with real clients: OpenSSH ssh, curl, farm's inventory loader."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.inventory import load_inventory
from tests import lab, sshlab

pytestmark = pytest.mark.lab


@pytest.fixture
def three(tmp_path: Path) -> Iterator[sshlab.SshLab]:
    with sshlab.ssh_lab(tmp_path, count=3) as running:
        yield running


@pytest.fixture(scope="session")
def arm64_box() -> Path:
    """The arm64 root file system; built by deploy/lab/arm64-box.sh on first use, then cached."""
    return sshlab.ensure_arm64_box()


def test_openssh_runs_commands_on_each_node(three: sshlab.SshLab) -> None:
    assert [node.name for node in three.nodes] == ["node0", "node1", "node2"]
    assert len({node.address for node in three.nodes}) == 3
    for node in three.nodes:
        done = node.ssh(
            "hostname", "&&", "echo", f"hello-{node.index}", "&&", "ip", "-4", "-o", "addr", "show", "eth0"
        )
        hostname, echoed, address = done.stdout.splitlines()
        assert hostname == node.name
        assert echoed == f"hello-{node.index}"
        assert f"inet {node.address}/24" in address  # the session runs in the node's namespace
    known = three.known_hosts.read_text().splitlines()
    assert known == [node.known_hosts_line for node in three.nodes]
    assert all(
        line.startswith(f"{node.address} ssh-ed25519 AAAA")
        for line, node in zip(known, three.nodes, strict=True)
    )


def test_inventory_entries_load_as_farm_inventory(three: sshlab.SshLab, tmp_path: Path) -> None:
    inventory = load_inventory(three.write_inventory(tmp_path / "inventory.yaml", slots=2))
    assert [spec.name for spec in inventory.nodes] == ["node0", "node1", "node2"]
    for spec, node in zip(inventory.nodes, three.nodes, strict=True):
        assert (spec.host, spec.port, spec.user) == (node.address, 22, lab.BUILD_USER)
        assert spec.identity_file == three.client_key
        assert spec.known_hosts == three.known_hosts
        assert spec.workdir == node.workdir
        assert Path(node.workdir).is_dir()
    assert len({spec.workdir for spec in inventory.nodes}) == 3


def test_cut_link_makes_a_node_unreachable_until_restored(three: sshlab.SshLab) -> None:
    node, other = three.nodes[1], three.nodes[2]
    node.cut_link()
    assert not node.link_up
    started = time.monotonic()
    done = node.ssh("true", check=False, connect_timeout=3, timeout=30)
    assert done.returncode == 255, done.stderr
    assert time.monotonic() - started < 15
    assert other.ssh("echo", "still-here").stdout.strip() == "still-here"
    node.restore_link()
    assert node.link_up
    assert node.ssh("echo", "back", connect_timeout=3).stdout.strip() == "back"


def test_a_changed_host_key_is_refused(three: sshlab.SshLab, tmp_path: Path) -> None:
    node = three.nodes[0]
    old_known_hosts = tmp_path / "old_known_hosts"
    old_known_hosts.write_text(three.known_hosts.read_text())
    old_line = node.known_hosts_line
    new_line = node.change_host_key()
    assert new_line != old_line
    assert new_line.startswith(f"{node.address} ssh-ed25519 ")
    done = node.ssh("true", check=False, known_hosts=old_known_hosts)
    assert done.returncode == 255
    assert "Host key verification failed" in done.stderr
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in done.stderr
    # The other nodes' keys did not change; once the client learns the new key, it connects.
    assert three.nodes[1].ssh("true", known_hosts=old_known_hosts).returncode == 0
    three.write_known_hosts()
    assert node.ssh("echo", "ok").stdout.strip() == "ok"


def test_a_registry_on_the_host_address_answers_nodes(three: sshlab.SshLab, tmp_path: Path) -> None:
    with lab.running_registry(tmp_path / "registry", three.host_address) as registry:
        assert registry.host.startswith(f"{three.host_address}:")
        for node in three.nodes:
            done = node.run(["curl", "-fsS", "-w", " %{http_code}", f"http://{registry.host}/v2/"])
            assert done.stdout.strip() == "{} 200"
        # Over SSH too: the node's own processes reach it, and the seeded base image is there.
        tags = three.nodes[0].ssh("curl", "-fsS", f"http://{registry.host}/v2/library/busybox/tags/list")
        assert '"latest"' in tags.stdout
        # Nothing else is reachable from a node: it has no default route.
        assert "default" not in three.nodes[0].run(["ip", "route"]).stdout


def test_teardown_removes_processes_namespaces_and_links(tmp_path: Path) -> None:
    with sshlab.ssh_lab(tmp_path, count=2) as running:
        lab_id = running.id
        pids = [pid for node in running.nodes for pid in node.pids()]
        assert len(pids) == 2  # one listening sshd per node
        session = subprocess.Popen(running.nodes[0].ssh_argv("sleep", "600"), stdin=subprocess.DEVNULL)
        lab.wait_until(lambda: len(running.nodes[0].pids()) > 1, "an SSH session on node0")
        assert len(sshlab.lab_devices(lab_id)) == 5  # bridge, 2 veths, 2 namespaces
    assert session.wait(30) != 0  # the session's processes were killed with the node
    assert sshlab.lab_devices(lab_id) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not (sshlab.STATE_DIR / f"{lab_id}.json").exists()


def test_leftovers_of_a_crashed_run_are_cleaned_up(tmp_path: Path) -> None:
    # A lab owned by a process that is then SIGKILLed, so it never tears down.
    script = (
        "import sys; from pathlib import Path; from tests import sshlab\n"
        f"lab = sshlab.SshLab(Path({str(tmp_path / 'crashed')!r}))\n"
        "lab._open(); lab.add_nodes(2)\n"
        "print(lab.id, *[p for n in lab.nodes for p in n.pids()], flush=True)\n"
        "sys.stdin.read()\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=lab.REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    lab_id, *pid_texts = owner.stdout.readline().split()
    pids = [int(pid) for pid in pid_texts]
    assert len(sshlab.lab_devices(lab_id)) == 5
    assert lab_id not in " ".join(sshlab.cleanup_leftovers())  # its owner is alive: left alone
    owner.kill()
    owner.wait(10)
    removed = sshlab.cleanup_leftovers()
    assert sorted(name for name in removed if lab_id in name) == sorted(
        [f"farm-{lab_id}-0", f"farm-{lab_id}-1", f"fv-{lab_id}-0", f"fv-{lab_id}-1", f"farmbr-{lab_id}"]
    )
    assert sshlab.lab_devices(lab_id) == []
    lab.wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), "the old sshd exiting")


@pytest.mark.timeout(900)  # builds the arm64 box on first use (minutes under QEMU)
def test_an_arm64_box_node_is_an_aarch64_machine(arm64_box: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    with sshlab.ssh_lab(tmp_path, count=1, arm64=1, box=arm64_box) as running:
        startup = time.monotonic() - started
        node = running.node("arm64-1")
        assert node.arch == "aarch64"
        assert node.workdir == "/var/lib/farm"
        done = node.ssh(
            "uname -m; python3 -c 'import platform; print(platform.machine())'; hostname; buildah --version",
            timeout=300,
        )
        machine, python_machine, hostname, buildah = done.stdout.splitlines()
        assert (machine, python_machine, hostname) == ("aarch64", "aarch64", "arm64-1")
        assert buildah.startswith("buildah version ")
        # The agent's workdir is the node's own folder: written in the box, seen on the host.
        node.ssh("echo", "from-the-box", ">", "/var/lib/farm/marker", timeout=120)
        assert (node.host_workdir / "marker").read_text() == "from-the-box\n"
        # The x86_64 node of the same lab is unaffected.
        assert running.node("node0").ssh("uname", "-m").stdout.strip() == os.uname().machine
        print(f"lab with an arm64 node up in {startup:.1f} s")
    # The box's mounts lived in the node's private mount namespace: nothing is left on the host.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(arm64_box) not in mounts
    assert not (arm64_box / "var/lib/farm/marker").exists()  # the cached box was not written to
