"""Failover with real faults on the SSH lab: a node lost mid-build, its platform built elsewhere."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import lab, sshlab
from tests.lab import processes_running

pytestmark = pytest.mark.lab


@pytest.fixture
def two(tmp_path: Path) -> Iterator[sshlab.SshLab]:
    with sshlab.ssh_lab(tmp_path, count=2) as running:
        yield running


@pytest.fixture
def lab_registry(tmp_path: Path, two: sshlab.SshLab) -> Iterator[lab.Registry]:
    with lab.running_registry(tmp_path / "registry", two.host_address) as registry:
        yield registry


def stuck_on(node: sshlab.SshNode, registry: lab.Registry, root: Path, marker: str) -> Path:
    """A context whose RUN hangs on ``node`` only (it looks for its own address, so it needs the
    node's network: ``start`` asks for ``--network host``) and passes elsewhere."""
    root.mkdir()
    (root / "Dockerfile").write_text(
        f"FROM {registry.host}/library/busybox\n"
        f"RUN if ip -4 addr | grep -q ' {node.address}/'; then echo started-{marker}; sleep 3600; "
        f"echo {marker}; fi; echo built\n"
    )
    return root


def start(
    registry: lab.Registry, inventory: Path, context: Path, tag: str, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "farm", "build", "-t", f"{registry.host}/{tag}",
            "--insecure-registry", registry.host, "--progress", "plain", "--network", "host",
            "--inventory", str(inventory), *extra, str(context),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def kill_agent(node: sshlab.SshNode) -> None:
    for line in processes_running(f"--workdir {node.workdir}"):  # the agent's own command line
        os.kill(int(line.split(":")[0]), signal.SIGKILL)


def kill_sshd(node: sshlab.SshNode) -> None:
    for pid in node.pids():  # every process of the node's sshd: the daemon and the sessions
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


FAULTS: dict[str, Callable[[sshlab.SshNode], None]] = {
    "agent-killed": kill_agent,
    "sshd-killed": kill_sshd,
    "link-cut": sshlab.SshNode.cut_link,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_node_lost_mid_build_hands_its_platform_to_another_node(
    tmp_path: Path, two: sshlab.SshLab, lab_registry: lab.Registry, fault: str
) -> None:
    first, second = two.nodes
    marker = f"farm-failover-{uuid.uuid4().hex[:8]}"
    inventory = two.write_inventory(tmp_path / "inventory.yaml", slots=1)
    context = stuck_on(first, lab_registry, tmp_path / "ctx", marker)
    metadata = tmp_path / "metadata.json"
    farm = start(lab_registry, inventory, context, "failover/x:1", "--platform", "linux/amd64",
                 "--metadata-file", str(metadata))  # fmt: skip
    try:
        assert farm.stdout is not None
        for line in farm.stdout:
            if line.rstrip().endswith(f"] started-{marker}"):
                break
        assert processes_running(marker), "the build runs on the first node"
        FAULTS[fault](first)
        output, _ = farm.communicate(timeout=180)
    finally:
        farm.kill()
        farm.wait()
    assert farm.returncode == 0, output
    assert "retrying" in output
    placed = json.loads(metadata.read_text())["farm.platforms"]["linux/amd64"]
    assert placed["node"] == second.name
    index = lab_registry.raw_manifest("failover/x:1")
    assert [m["digest"] for m in index["manifests"]] == [placed["digest"]]  # type: ignore[index]
    # Nothing of the lost attempt is left running on the first node.
    lab.wait_until(lambda: not processes_running(marker), "the lost attempt to be killed", 90)


def test_a_broken_dockerfile_is_not_retried_and_nothing_is_tagged(
    tmp_path: Path, two: sshlab.SshLab, lab_registry: lab.Registry
) -> None:
    inventory = two.write_inventory(tmp_path / "inventory.yaml", slots=1)
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {lab_registry.host}/library/busybox\nRUN exit 7\n")
    farm = start(lab_registry, inventory, context, "failover/broken:1", "--platform", "linux/amd64")
    output, _ = farm.communicate(timeout=180)
    assert farm.returncode == 1
    assert "retrying" not in output
    assert output.count("assigned:") == 1
    assert lab_registry.tags("failover/broken") == []


def test_a_node_out_of_disk_hands_its_platform_on(
    tmp_path: Path, two: sshlab.SshLab, lab_registry: lab.Registry
) -> None:
    first, second = two.nodes
    # The first node's workdir is a tiny file system, mounted where its sshd (and so its agent)
    # sees it: `ip netns exec` gave the node a mount namespace of its own.
    in_node = ["nsenter", "--target", str(first.sshd_pid), "--mount"]
    owner = pwd.getpwnam(lab.BUILD_USER)
    options = (
        f"size=24m,mode=0700,uid={owner.pw_uid},gid={owner.pw_gid}"  # the agent's user's, as a disk would be
    )
    subprocess.run([*in_node, "mount", "-t", "tmpfs", "-o", options, "tmpfs", first.workdir], check=True)
    try:
        inventory = two.write_inventory(tmp_path / "inventory.yaml", slots=1)
        context = tmp_path / "ctx"
        context.mkdir()
        (context / "Dockerfile").write_text(
            f"FROM {lab_registry.host}/library/busybox\nRUN dd if=/dev/zero of=/filler bs=1M count=40\n"
        )
        metadata = tmp_path / "metadata.json"
        farm = start(lab_registry, inventory, context, "failover/disk:1", "--platform", "linux/amd64",
                     "--metadata-file", str(metadata))  # fmt: skip
        output, _ = farm.communicate(timeout=300)
    finally:
        subprocess.run([*in_node, "umount", "--recursive", "--lazy", first.workdir], check=False)
    assert farm.returncode == 0, output
    assert "No space left on device" in output
    assert "retrying" in output
    assert json.loads(metadata.read_text())["farm.platforms"]["linux/amd64"]["node"] == second.name


def test_a_drained_node_takes_no_work(tmp_path: Path, two: sshlab.SshLab, lab_registry: lab.Registry) -> None:
    first, second = two.nodes
    inventory = two.write_inventory(tmp_path / "inventory.yaml", slots=4)
    state = tmp_path / "state"
    assert (
        lab.farm("nodes", "drain", first.name, "--inventory", str(inventory), "--state-dir", str(state)).code
        == 0
    )
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {lab_registry.host}/library/busybox\nRUN true\n")
    metadata = tmp_path / "metadata.json"
    run = lab.farm(
        "build", "-t", f"{lab_registry.host}/failover/drained:1", "--insecure-registry", lab_registry.host,
        "--platform", "linux/amd64,linux/arm64,linux/s390x", "--inventory", str(inventory),
        "--state-dir", str(state), "--metadata-file", str(metadata), str(context),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    placed = json.loads(metadata.read_text())["farm.platforms"]
    assert {entry["node"] for entry in placed.values()} == {second.name}


def test_emulation_denied_names_the_platform_and_who_could_have_served_it(
    tmp_path: Path, two: sshlab.SshLab, lab_registry: lab.Registry
) -> None:
    inventory = two.write_inventory(tmp_path / "inventory.yaml")
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {lab_registry.host}/library/busybox\n")
    run = lab.farm(
        "build", "-t", f"{lab_registry.host}/failover/denied:1", "--insecure-registry", lab_registry.host,
        "--platform", "linux/amd64,linux/s390x", "--emulation", "deny=linux/s390x",
        "--inventory", str(inventory), str(context),
    )  # fmt: skip
    assert run.code == 1
    assert "linux/s390x: no node runs it natively; emulation is denied for it" in run.stderr
    assert "node0" in run.stderr
    assert "--emulation allow=linux/s390x" in run.stderr
    assert lab_registry.tags("failover/denied") == []


def test_allow_partial_pushes_what_succeeded_and_exits_3(
    tmp_path: Path, two: sshlab.SshLab, lab_registry: lab.Registry
) -> None:
    inventory = two.write_inventory(tmp_path / "inventory.yaml")
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f'FROM {lab_registry.host}/library/busybox\nRUN [ "$(uname -m)" != s390x ]\n'
    )
    metadata = tmp_path / "metadata.json"
    run = lab.farm(
        "build", "-t", f"{lab_registry.host}/failover/partial:1", "--insecure-registry", lab_registry.host,
        "--platform", "linux/amd64,linux/s390x", "--allow-partial", "--inventory", str(inventory),
        "--metadata-file", str(metadata), str(context),
    )  # fmt: skip
    assert run.code == 3, run.stderr
    assert "linux/s390x" in run.stdout
    assert "MISSING" in run.stdout
    document = json.loads(metadata.read_text())
    assert list(document["farm.platforms"]) == ["linux/amd64"]
    assert "linux/s390x" in document["farm.missing"]
    index = lab_registry.raw_manifest("failover/partial:1")
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64"]  # type: ignore[index]


def test_the_registry_going_down_during_the_build_is_a_clear_error_with_nothing_tagged(
    tmp_path: Path, node_workdir: Path
) -> None:
    with lab.running_registry(tmp_path / "registry") as registry:
        marker = f"farm-registry-down-{uuid.uuid4().hex[:8]}"
        context = tmp_path / "ctx"
        context.mkdir()
        # The RUN outlasts taking the registry down, so the push meets a registry that is gone.
        (context / "Dockerfile").write_text(
            f"FROM {registry.host}/library/busybox\nRUN echo started-{marker}; sleep 8; echo {marker}\n"
        )
        inventory = lab.write_inventory(tmp_path / "inventory.yaml", workdir=str(node_workdir))
        farm = start(registry, inventory, context, "down/x:1", "--platform", "linux/amd64")
        try:
            assert farm.stdout is not None
            for line in farm.stdout:
                if line.rstrip().endswith(f"] started-{marker}"):
                    break
            registry.stop()
            output, _ = farm.communicate(timeout=180)
        finally:
            farm.kill()
            farm.wait()
    assert farm.returncode == 1
    assert "linux/amd64" in output
    assert f"{registry.host}" in output
    assert "Traceback" not in output
    assert not processes_running(marker)
