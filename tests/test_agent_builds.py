"""The agent's builds on the local node, end to end: an agent killed outright (SIGKILL: nothing of
its own runs after) leaves no builder, RUN step, network helper or mount behind, and the next build
clears the container it left in the store; an exported image keeps its base image's layer blobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import lab

pytestmark = pytest.mark.lab


def agents(workdir: Path) -> list[int]:
    """The pids of the agents running in ``workdir`` (stage one execs them from a memfd)."""
    return [
        int(line.split(":", 1)[0])
        for line in lab.processes_running(str(workdir))
        if "/proc/self/fd/" in line and f"--workdir {workdir}" in line
    ]


def mounts_below(path: Path) -> list[str]:
    found = []
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            found += [line for line in mountinfo.read_text().splitlines() if str(path) in line]
        except OSError:  # a process that ended while we looked
            continue
    return found


@pytest.fixture
def own_workdir() -> Iterator[Path]:
    """A node workdir of this test's own: a killed agent leaves its build folder behind, which
    other tests of the session's shared workdir would find."""
    workdir = lab.build_user_dir("killed")
    yield workdir
    lab.unmount_below(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.timeout(300)
def test_an_agent_killed_mid_build_leaves_nothing_running_and_its_container_is_cleared_next(
    tmp_path: Path, registry: lab.Registry, own_workdir: Path
) -> None:
    node_workdir = own_workdir
    inventory = lab.write_inventory(tmp_path / "inventory.yaml", workdir=str(node_workdir))
    marker = f"farm-agent-killed-{uuid.uuid4().hex[:8]}"
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {registry.host}/library/busybox\n{lab.stuck_run(marker)}\n")
    farm = lab.start_farm(
        "build", "-t", f"{registry.host}/agent/killed:1", "--platform", "linux/arm64", "--progress", "plain",
        "--inventory", str(inventory), str(context),
    )  # fmt: skip
    try:
        lab.wait_started(farm, marker)
        assert lab.processes_running(marker)
        (agent,) = agents(node_workdir)
        os.kill(agent, signal.SIGKILL)
        farm.communicate(timeout=120)
    finally:
        farm.kill()
        farm.wait()
    assert farm.returncode != 0
    # The kernel ends the builder (its parent-death signal), then the PID namespace's first process
    # (its own), and with it everything in the namespace: the RUN step, slirp4netns, the holder.
    lab.wait_until(lambda: not lab.processes_running(marker), "the RUN step to be killed", seconds=30)
    lab.wait_until(
        lambda: not lab.processes_running(str(node_workdir)), "the builder and helpers to end", seconds=30
    )
    assert mounts_below(node_workdir) == []
    store = lab.build_user_store(node_workdir)
    left = subprocess.run([*store, "containers", "--quiet"], capture_output=True, text=True, check=True)
    assert left.stdout.split(), "the killed build should have left its working container"

    # The next build on the node, alone there, clears it.
    (context / "Dockerfile").write_text(f"FROM {registry.host}/library/busybox\nRUN echo {marker}\n")
    again = lab.farm(
        "build", "-t", f"{registry.host}/agent/killed:2", "--platform", "linux/arm64",
        "--progress", "plain", "--inventory", str(inventory), str(context),
    )  # fmt: skip
    assert again.code == 0, again.stderr
    left = subprocess.run([*store, "containers", "--quiet"], capture_output=True, text=True, check=True)
    assert left.stdout.split() == []


@pytest.mark.timeout(300)
def test_an_exported_image_keeps_its_base_image_s_layer_blobs(
    tmp_path: Path, registry: lab.Registry, inventory: Path
) -> None:
    context = lab.hello_context(tmp_path, registry)
    platforms = {"linux/amd64": ("amd64", ""), "linux/arm/v7": ("arm", "v7")}
    run = lab.farm(
        "build", "-t", f"{registry.host}/agent/reuse:1", "--platform", ",".join(platforms),
        "--progress", "plain", "--inventory", str(inventory), str(context),
    )  # fmt: skip
    assert run.code == 0, run.stderr

    def children(reference: str) -> dict[tuple[str, str], dict[str, object]]:
        index = registry.raw_manifest(reference)
        repository = reference.split(":")[0]
        found = {}
        for child in index["manifests"]:  # type: ignore[attr-defined]
            platform = child["platform"]
            found[(platform["architecture"], platform.get("variant", ""))] = registry.raw_manifest(
                f"{repository}@{child['digest']}"
            )
        return found

    base = children("library/busybox:latest")
    built = children("agent/reuse:1")
    for wanted in platforms.values():
        base_layers = base[wanted]["layers"]
        layers = built[wanted]["layers"]
        assert isinstance(base_layers, list)
        assert isinstance(layers, list)
        # The base's layers, as the very blobs the base image is made of; then the build's own.
        blobs = [(layer["digest"], layer["size"]) for layer in layers]
        assert blobs[: len(base_layers)] == [(layer["digest"], layer["size"]) for layer in base_layers], (
            json.dumps(layers, indent=1)
        )
        assert len(blobs) > len(base_layers)
