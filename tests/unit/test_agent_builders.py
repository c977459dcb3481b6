"""The agent's builder backends: storage probed once per workdir, what reaches the builder and how."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.builders import (
    BuildSpec,
    _builder_environment,
    _common_build_flags,
    storage_command,
    storage_driver,
)


def test_concurrent_first_builds_agree_on_one_storage_driver(tmp_path: Path) -> None:
    # Every slot of a fresh node asks at once: each must get the answer, none may trip over the
    # others' probe (a shared probe folder and answer file once failed one build in the batch).
    askers = 8
    start = threading.Barrier(askers)

    def ask() -> str:
        start.wait()
        return storage_driver(str(tmp_path))

    with ThreadPoolExecutor(askers) as pool:
        answers = list(pool.map(lambda _: ask(), range(askers)))
    assert len(set(answers)) == 1
    assert answers[0] in {"overlay", "vfs"}
    assert (tmp_path / "storage" / "driver").read_text() == answers[0]
    assert not (tmp_path / "storage" / ".overlay-probe").exists()
    assert storage_command("buildah", str(tmp_path))[-2:] == ["--storage-driver", answers[0]]


def spec(tmp_path: Path, **fields: Any) -> BuildSpec:
    values: dict[str, Any] = {
        "builder": "buildah",
        "workdir": str(tmp_path),
        "build_dir": str(tmp_path / "build"),
        "platform": "linux/amd64",
        "dockerfile": "FROM scratch\n",
        "build_args": {},
        "target": "",
        "insecure_registries": [],
    }
    return BuildSpec(**(values | fields))


@pytest.mark.parametrize(
    "host",
    [
        'evil"\ninsecure = true\n[[registry]]\nlocation = "x',
        "host with spaces",
        "registry.lab:5000/repo",
        "",
        "-flag",
    ],
)
def test_a_registry_host_that_could_add_settings_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="is not a registry host"):
        spec(tmp_path, insecure_registries=[host])


@pytest.mark.parametrize("host", ["localhost:5000", "127.0.0.1:40781", "registry.lab", "[::1]:5000"])
def test_registry_hosts_are_taken_as_they_are(tmp_path: Path, host: str) -> None:
    assert spec(tmp_path, insecure_registries=[host]).insecure_registries == [host]


def test_build_argument_values_reach_the_builder_through_its_environment_only(tmp_path: Path) -> None:
    built = spec(tmp_path, build_args={"TOKEN": "s3cret-value", "HTTP_PROXY": "http://proxy:3128"})
    flags = _common_build_flags(built, "iid")
    assert "s3cret-value" not in " ".join(flags)
    assert flags[flags.index("TOKEN") - 1] == "--build-arg"
    env = _builder_environment(built)
    assert env["TOKEN"] == "s3cret-value"
    assert env["HTTP_PROXY"] == "http://proxy:3128"


@pytest.mark.parametrize(("field", "value"), [("isolation", "none"), ("network", "bridge")])
def test_unknown_isolation_and_network_are_refused(tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"unknown {field}"):
        spec(tmp_path, **{field: value})
