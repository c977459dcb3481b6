"""``farm build`` pins every image a Dockerfile pulls, not only FROM: ``COPY --from=IMAGE`` and
``RUN --mount=from=IMAGE`` too (issue 11). Same trap as the FROM test in test_build_local.py: an
amd64 image of the same name already in the builder's store must not end up in an s390x image."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests import lab

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("builder", ["docker", "buildah"])
def test_images_named_by_copy_from_and_mounts_cannot_leak_another_platform(
    tmp_path: Path, registry: lab.Registry, docker: None, node_workdir: Path, builder: str
) -> None:
    image = f"{registry.host}/library/busybox:latest"
    if builder == "docker":
        lab.run(["docker", "pull", "--platform", "linux/amd64", image])
        inventory = lab.write_inventory(
            tmp_path / "inventory.yaml", builder=builder, user="root", workdir=str(tmp_path / "node")
        )
        mounted = ""  # docker's classic builder has no RUN --mount
    else:
        store = lab.build_user_store(node_workdir)
        lab.run([*store, "pull", "--tls-verify=false", "--platform", "linux/amd64", image])
        inventory = lab.write_inventory(
            tmp_path / "inventory.yaml", builder=builder, workdir=str(node_workdir)
        )
        mounted = (
            f"RUN --mount=type=bind,from={image},source=/bin,target=/m"
            " mkdir /mounted && cp /m/busybox /mounted/\n"
        )
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        textwrap.dedent(f"""\
            FROM scratch
            COPY --from={image} /bin/busybox /copied/busybox
            FROM {image}
            COPY --from=0 /copied /copied
            """)
        + mounted
    )
    tag = f"{registry.host}/checks/pins:{builder}"
    run = lab.farm(
        "build", "-t", tag, "--platform", "linux/s390x", "--inventory", str(inventory), str(context)
    )
    # farm verifies every ELF executable in the image's layers: an amd64 busybox anywhere fails it.
    assert run.code == 0, run.stderr
    assert lab.docker_run(tag, "linux/s390x", "/copied/busybox", "uname", "-m") == "s390x"
    if mounted:
        assert lab.docker_run(tag, "linux/s390x", "/mounted/busybox", "uname", "-m") == "s390x"
