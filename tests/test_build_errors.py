"""Bad input and failing parts: a clear error, a non-zero exit, and nothing tagged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import lab

pytestmark = pytest.mark.lab


@pytest.fixture
def context(tmp_path: Path, registry: lab.Registry) -> Path:
    root = tmp_path / "ctx"
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {registry.host}/library/busybox\nRUN true\n")
    return root


def build(
    registry: lab.Registry, inventory: Path, context: Path, *extra: str, repo: str = "errors/x"
) -> lab.FarmRun:
    return lab.farm(
        "build", "-t", f"{registry.host}/{repo}:1", "--inventory", str(inventory), *extra, str(context)
    )


def test_unknown_platform_lists_the_valid_spellings(
    registry: lab.Registry, inventory: Path, context: Path
) -> None:
    run = build(registry, inventory, context, "--platform", "linux/amd64,linux/sparc")
    assert run.code == 2
    assert "unknown platform 'linux/sparc'" in run.stderr
    assert "valid platforms: linux/amd64, linux/arm64, linux/arm/v7" in run.stderr
    assert "Traceback" not in run.stderr
    assert registry.tags("errors/x") == []


@pytest.mark.parametrize("spelling", ["linux/", "linux//arm64", "linux/arm/v7/extra", ","])
def test_malformed_platform_is_an_input_error(
    registry: lab.Registry, inventory: Path, context: Path, spelling: str
) -> None:
    run = build(registry, inventory, context, "--platform", spelling)
    assert run.code == 2
    assert "platform" in run.stderr
    assert "valid platforms:" in run.stderr


def test_platform_no_node_can_build_says_what_the_inventory_can(
    tmp_path: Path, registry: lab.Registry, node_workdir: Path, context: Path
) -> None:
    inventory = lab.write_inventory(tmp_path / "inv.yaml", emulation=False, workdir=str(node_workdir))
    run = build(registry, inventory, context, "--platform", "linux/amd64,linux/s390x")
    assert run.code == 1
    assert "linux/s390x: no node runs it natively; local could emulate it but has emulation off" in run.stderr
    assert "set 'emulation: true' for a node" in run.stderr
    assert "assigned" not in run.stderr, "nothing is built when a platform can never be placed"
    assert registry.tags("errors/x") == []


def test_missing_context(registry: lab.Registry, inventory: Path, tmp_path: Path) -> None:
    run = build(registry, inventory, tmp_path / "nowhere")
    assert run.code == 2
    assert f"build context {tmp_path / 'nowhere'} does not exist" in run.stderr


def test_missing_dockerfile(registry: lab.Registry, inventory: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run = build(registry, inventory, tmp_path / "empty")
    assert run.code == 2
    assert "Dockerfile" in run.stderr
    assert "does not exist" in run.stderr
    assert "-f PATH" in run.stderr


def test_unreachable_registry(inventory: Path, context: Path) -> None:
    port = lab.free_port()
    run = lab.farm("build", "-t", f"127.0.0.1:{port}/errors/x:1", "--inventory", str(inventory), str(context))
    assert run.code == 1
    assert f"cannot reach registry 127.0.0.1:{port}" in run.stderr


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("Upper/Case:1", "invalid repository name"),
        ("registry.example/app:bad tag", "contains spaces"),
        ("registry.example/app:-dash", "invalid tag"),
        ("registry.example/app@sha256:abc", "invalid digest"),
    ],
)
def test_bad_tags_are_refused(inventory: Path, context: Path, tag: str, message: str) -> None:
    run = lab.farm("build", "-t", tag, "--inventory", str(inventory), str(context))
    assert run.code == 2
    assert message in run.stderr


def test_failing_build_names_the_platform_shows_its_log_and_tags_nothing(
    registry: lab.Registry, inventory: Path, tmp_path: Path
) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    (root / "Dockerfile").write_text(
        f"FROM {registry.host}/library/busybox\n"
        'RUN if [ "$(uname -m)" = s390x ]; then echo "no s390x support in this code" >&2; exit 3; fi\n'
    )
    run = build(registry, inventory, root, "--platform", "linux/amd64,linux/s390x", repo="errors/broken")
    assert run.code == 1
    assert "1 platform(s) failed: linux/s390x; nothing was tagged" in run.stderr
    assert "no s390x support in this code" in run.stderr
    assert registry.tags("errors/broken") == []


def test_bad_inventory_names_file_node_and_field(
    registry: lab.Registry, tmp_path: Path, context: Path
) -> None:
    inventory = tmp_path / "bad.yaml"
    inventory.write_text("nodes:\n  - name: pi\n    host: 192.0.2.1\n    slots: 0\n")
    run = build(registry, inventory, context)
    assert run.code == 2
    assert f"{inventory}: node 'pi': field slots: Input should be greater than or equal to 1" in run.stderr


def test_a_link_leaving_the_context_is_refused_before_anything_is_sent(
    registry: lab.Registry, inventory: Path, context: Path
) -> None:
    (context / "passwords").symlink_to("/etc/passwd")
    run = build(registry, inventory, context)
    assert run.code == 2
    assert "link 'passwords' points outside the context" in run.stderr
    assert "exclude it in .dockerignore" in run.stderr
