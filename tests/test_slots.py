"""Node slots are held by the agent on the node: two coordinators never overload it."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests import lab
from tests.lab import processes_running

pytestmark = pytest.mark.lab


def start_build(registry: lab.Registry, inventory: Path, context: Path, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "farm", "build", "-t", f"{registry.host}/slots/{tag}",
            "--platform", "linux/amd64", "--progress", "plain", "--inventory", str(inventory), str(context),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for_line(process: subprocess.Popen[str], ending: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if line.rstrip().endswith(ending):
            return
    raise AssertionError(f"the build ended without printing {ending!r}")


def test_two_coordinators_share_a_single_slot_node(
    tmp_path: Path, registry: lab.Registry, node_workdir: Path
) -> None:
    # Two separate `farm build` processes, as from two machines, on one node with one slot.
    inventory = lab.write_inventory(tmp_path / "inventory.yaml", slots=1, workdir=str(node_workdir))
    marker = f"farm-slot-{uuid.uuid4().hex[:8]}"
    first_context = tmp_path / "first"
    first_context.mkdir()
    (first_context / "Dockerfile").write_text(
        f"FROM {registry.host}/library/busybox\nRUN echo started-{marker}; sleep 3600; echo {marker}\n"
    )
    second_context = tmp_path / "second"
    second_context.mkdir()
    (second_context / "Dockerfile").write_text(f"FROM {registry.host}/library/busybox\nRUN echo second-ran\n")

    first = start_build(registry, inventory, first_context, "first:1")
    second = None
    try:
        wait_for_line(first, f"] started-{marker}")
        second = start_build(registry, inventory, second_context, "second:1")
        wait_for_line(second, "every build slot of this node is taken; waiting for one")
        assert processes_running(marker), "the first build still holds the slot"

        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
        output, _ = second.communicate(timeout=300)
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
                process.wait()
    assert second.returncode == 0, output
    assert "] second-ran" in output
    assert registry.tags("slots/second") == ["1"]
    assert registry.tags("slots/first") == []
