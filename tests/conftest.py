from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import lab


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Registry]:
    """A real registry for this test session, seeded with the busybox base image."""
    with lab.running_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="session")
def docker() -> None:
    """A running dockerd, for checking results with a real client."""
    lab.require_docker()


@pytest.fixture(scope="session")
def node_workdir() -> Iterator[Path]:
    """One agent workdir shared by the session's builds, as a real node keeps its cache; the local
    node's agent runs as the build user, who owns it."""
    workdir = lab.build_user_dir("node")
    yield workdir
    lab.unmount_below(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def inventory(tmp_path: Path, node_workdir: Path) -> Path:
    return lab.write_inventory(tmp_path / "inventory.yaml", workdir=str(node_workdir))
