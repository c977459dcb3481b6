"""Stopping a build stops it everywhere: no builder left running, no build folder, no tag."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests import lab

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopping_farm_mid_build_leaves_nothing_behind(
    tmp_path: Path, registry: lab.Registry, inventory: Path, node_workdir: Path, signum: int
) -> None:
    marker = f"farm-cancel-{uuid.uuid4().hex[:8]}"
    context = tmp_path / "ctx"
    context.mkdir()
    # The RUN shell stays alive for its last command, and its command line carries the marker.
    (context / "Dockerfile").write_text(
        f"FROM {registry.host}/library/busybox\nRUN echo started-{marker}; sleep 3600; echo {marker}\n"
    )
    farm = subprocess.Popen(
        [
            sys.executable, "-m", "farm", "build", "-t", f"{registry.host}/cancel/x:1",
            "--platform", "linux/amd64,linux/arm64", "--progress", "plain",
            "--inventory", str(inventory), str(context),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert farm.stdout is not None
    try:
        started = set()
        for line in farm.stdout:
            # The echo's own output, not the builder's "STEP 2/2: RUN echo ..." line.
            if line.rstrip().endswith(f"] started-{marker}"):
                started.add(line.split("]")[0])
                if len(started) == 2:
                    break
        assert len(started) == 2, "both builds should have reached their RUN step"
        assert lab.processes_running(marker)
        farm.send_signal(signum)
        farm.communicate(timeout=60)
    finally:
        farm.kill()
        farm.wait()
    assert farm.returncode != 0

    # The agents notice (stdin closed, or the coordinator gone) and kill each build's process group.
    lab.wait_until(lambda: not lab.processes_running(marker), "the builders to be killed", seconds=30)
    lab.wait_until(lambda: not lab.processes_running(str(node_workdir)), "the agents to exit", seconds=30)
    assert list((node_workdir / "builds").iterdir()) == []
    assert registry.tags("cancel/x") == []
