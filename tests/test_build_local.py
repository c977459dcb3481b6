"""``farm build`` end to end on the local node: real buildah/docker, QEMU, registry and clients."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests import lab
from tests.lab import hello_context

pytestmark = pytest.mark.lab

UNAME = {
    "linux/amd64": "x86_64",
    "linux/arm64": "aarch64",
    "linux/arm/v7": "armv7l",
    "linux/s390x": "s390x",
    "linux/ppc64le": "ppc64le",
}


def write_context(root: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(textwrap.dedent(dockerfile))
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_hello_for_four_platforms_runs_as_each_in_docker(
    tmp_path: Path, registry: lab.Registry, docker: None, inventory: Path
) -> None:
    platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/s390x"]
    tag = f"{registry.host}/examples/hello:four"
    metadata = tmp_path / "metadata.json"
    run = lab.farm(
        "build", "-t", tag, "--platform", ",".join(platforms), "--progress", "plain",
        "--inventory", str(inventory), "--metadata-file", str(metadata),
        str(hello_context(tmp_path, registry)),
    )  # fmt: skip
    assert run.code == 0, run.stderr

    index = registry.raw_manifest("examples/hello:four")
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    listed = [entry["platform"] for entry in index["manifests"]]  # type: ignore[attr-defined]
    assert listed == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
        {"architecture": "arm", "os": "linux", "variant": "v7"},
        {"architecture": "s390x", "os": "linux"},
    ]
    for platform in platforms:
        uname = UNAME[platform]
        assert lab.docker_run(tag, platform) == f"hello from {uname} (built as {platform} on {uname})"

    document = json.loads(metadata.read_text())
    assert document["image.name"] == tag
    assert document["containerimage.digest"] == run.stdout.split("@")[-1].strip()
    for platform in platforms:
        entry = document["farm.platforms"][platform]
        assert entry["node"] == "local"
        assert entry["mode"] == ("native" if platform == "linux/amd64" else "emulated")
        assert entry["seconds"] > 0
        assert entry["digest"] in json.dumps(index)


def test_docker_builder_gives_a_docker_manifest_list(
    tmp_path: Path, registry: lab.Registry, docker: None
) -> None:
    # dockerd's socket is root's: a docker node's agent is root-equivalent, so the inventory says root.
    inventory = lab.write_inventory(
        tmp_path / "inventory.yaml", builder="docker", user="root", workdir=str(tmp_path / "node")
    )
    tag = f"{registry.host}/examples/hello:docker"
    run = lab.farm(
        "build", "-t", tag, "--platform", "linux/arm64,linux/amd64", "--progress", "plain",
        "--inventory", str(inventory), str(hello_context(tmp_path, registry)),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    index = registry.raw_manifest("examples/hello:docker")
    assert index["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert lab.docker_run(tag, "linux/arm64") == "hello from aarch64 (built as linux/arm64 on aarch64)"


def test_build_platform_stage_runs_natively_and_the_rest_as_the_target(
    tmp_path: Path, registry: lab.Registry, docker: None, inventory: Path
) -> None:
    base = f"{registry.host}/library/busybox"
    context = write_context(
        tmp_path / "ctx",
        f"""\
        FROM --platform=$BUILDPLATFORM {base} AS tools
        ARG TARGETARCH
        RUN echo "tools ran on $(uname -m) for $TARGETARCH" > /tools.txt

        FROM {base}
        ARG TARGETPLATFORM
        ARG BUILDPLATFORM
        COPY --from=tools /tools.txt /tools.txt
        RUN echo "final ran on $(uname -m), $TARGETPLATFORM from $BUILDPLATFORM" > /final.txt
        CMD cat /tools.txt /final.txt
        """,
    )
    tag = f"{registry.host}/checks/cross:1"
    run = lab.farm(
        "build", "-t", tag, "--platform", "linux/ppc64le", "--inventory", str(inventory), str(context)
    )
    assert run.code == 0, run.stderr
    assert lab.docker_run(tag, "linux/ppc64le").splitlines() == [
        "tools ran on x86_64 for ppc64le",
        "final ran on ppc64le, linux/ppc64le from linux/amd64",
    ]


@pytest.mark.parametrize("builder", ["docker", "buildah"])
def test_a_base_pulled_for_another_platform_cannot_leak_into_the_image(
    tmp_path: Path, registry: lab.Registry, docker: None, node_workdir: Path, builder: str
) -> None:
    """Builders reuse a base of the same name pulled for another platform (docker's classic
    builder does, silently: an "s390x" build from a local amd64 busybox is an amd64 image).
    farm pins every base to its per-platform digest, so the name cannot be reused."""
    base = f"{registry.host}/library/busybox:latest"
    if builder == "docker":
        lab.run(["docker", "pull", "--platform", "linux/amd64", base])
        inventory = lab.write_inventory(
            tmp_path / "inventory.yaml", builder=builder, user="root", workdir=str(tmp_path / "node")
        )
    else:
        # Into the very store the node's agent builds with, as the user it builds as.
        store = lab.build_user_store(node_workdir)
        lab.run([*store, "pull", "--tls-verify=false", "--platform", "linux/amd64", base])
        inventory = lab.write_inventory(
            tmp_path / "inventory.yaml", builder=builder, workdir=str(node_workdir)
        )
    context = write_context(tmp_path / "ctx", f"FROM {base}\nRUN uname -m > /built-on\nCMD cat /built-on\n")
    tag = f"{registry.host}/checks/no-leak:{builder}"
    run = lab.farm(
        "build", "-t", tag, "--platform", "linux/s390x", "--inventory", str(inventory), str(context)
    )
    assert run.code == 0, run.stderr
    assert lab.docker_run(tag, "linux/s390x") == "s390x"


def test_an_image_holding_another_architecture_is_refused_and_nothing_tagged(
    tmp_path: Path, registry: lab.Registry, inventory: Path
) -> None:
    base = f"{registry.host}/library/busybox"
    context = write_context(
        tmp_path / "ctx",
        f"""\
        FROM --platform=linux/amd64 {base} AS amd64
        FROM {base}
        COPY --from=amd64 /bin/busybox /opt/busybox-amd64
        """,
    )
    run = lab.farm(
        "build", "-t", f"{registry.host}/checks/mixed:1", "--platform", "linux/arm64",
        "--inventory", str(inventory), str(context),
    )  # fmt: skip
    assert run.code == 1
    assert "linux/arm64" in run.stderr
    assert "1 amd64 (e.g. /opt/busybox-amd64)" in run.stderr
    assert registry.tags("checks/mixed") == []


def test_context_keeps_modes_links_empty_folders_and_names_and_honours_dockerignore(
    tmp_path: Path, registry: lab.Registry, docker: None, inventory: Path
) -> None:
    context = write_context(
        tmp_path / "ctx",
        f"""\
        FROM {registry.host}/library/busybox
        COPY . /ctx
        RUN cd /ctx && find . -mindepth 1 | sort | while read -r p; do \\
              printf '%s %s' "$p" "$(stat -c %a "$p")"; [ -L "$p" ] && printf ' -> %s' "$(readlink "$p")"; \\
              echo; done > /listing
        CMD cat /listing
        """,
        {
            "run.sh": "#!/bin/sh\n",
            "secret.key": "no",
            "logs/build.log": "no",
            "keep/notes.txt": "yes",
            "grüße/日本.txt": "yes",
            ".dockerignore": "*.key\nlogs\n**/*.tmp\n",
            "keep/scratch.tmp": "no",
        },
    )
    os.chmod(context / "run.sh", 0o750)
    os.chmod(context / "keep" / "notes.txt", 0o600)
    (context / "empty").mkdir(mode=0o705)
    os.chmod(context / "empty", 0o705)
    os.symlink("keep/notes.txt", context / "link")
    tag = f"{registry.host}/checks/context:1"
    run = lab.farm(
        "build", "-t", tag, "--platform", "linux/amd64", "--inventory", str(inventory), str(context)
    )
    assert run.code == 0, run.stderr
    listing = set(lab.docker_run(tag, "linux/amd64").splitlines())
    assert {
        "./run.sh 750",
        "./keep/notes.txt 600",
        "./empty 705",
        "./link 777 -> keep/notes.txt",
        "./grüße/日本.txt 644",
    } <= listing
    assert not any(word in line for line in listing for word in ("secret.key", "logs", "scratch.tmp"))


def test_build_args_and_target_reach_the_build(
    tmp_path: Path, registry: lab.Registry, docker: None, inventory: Path
) -> None:
    context = write_context(
        tmp_path / "ctx",
        f"""\
        ARG BASE={registry.host}/library/busybox
        FROM $BASE AS first
        ARG GREETING=unset
        RUN echo "$GREETING" > /greeting
        CMD cat /greeting

        FROM first AS second
        RUN echo never > /greeting
        """,
    )
    tag = f"{registry.host}/checks/args:1"
    run = lab.farm(
        "build", "-t", tag, "--platform", "linux/arm64", "--build-arg", "GREETING=moin",
        "--target", "first", "--inventory", str(inventory), str(context),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    assert lab.docker_run(tag, "linux/arm64") == "moin"


def test_an_unchanged_rebuild_reuses_every_image_and_no_cache_builds_again(
    tmp_path: Path, registry: lab.Registry, inventory: Path
) -> None:
    context = hello_context(tmp_path, registry)
    tag = f"{registry.host}/checks/noop:1"
    build = ["build", "-t", tag, "--platform", "linux/amd64,linux/arm64", "--progress", "plain",
             "--inventory", str(inventory), str(context)]  # fmt: skip
    first = lab.farm(*build)
    assert first.code == 0, first.stderr
    assert first.stderr.count("] assigned:") == 2

    again = lab.farm(*build)
    assert again.code == 0, again.stderr
    assert "] assigned:" not in again.stderr
    assert again.stderr.count("unchanged since an earlier build: reused") == 2
    assert again.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]  # the same index

    (context / "hello.sh").write_text('#!/bin/sh\necho "changed"\n')
    changed = lab.farm(*build)
    assert changed.code == 0, changed.stderr
    assert changed.stderr.count("] assigned:") == 2

    forced = lab.farm(*build, "--no-cache")
    assert forced.code == 0, forced.stderr
    assert forced.stderr.count("] assigned:") == 2


def test_dry_run_explains_a_mixed_native_and_emulated_plan_and_builds_nothing(
    tmp_path: Path, registry: lab.Registry, inventory: Path
) -> None:
    run = lab.farm(
        "build", "--dry-run", "-t", f"{registry.host}/checks/dry:1", "--platform",
        "linux/amd64,linux/arm64,linux/s390x", "--emulation", "deny=linux/s390x",
        "--inventory", str(inventory), str(hello_context(tmp_path, registry)),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["linux/amd64", "native", "local"]
    assert "local runs linux/amd64 natively" in lines[0]
    assert lines[1].split()[:3] == ["linux/arm64", "emulated", "local"]
    assert "emulates linux/arm64 with QEMU: no node runs it natively" in lines[1]
    assert lines[2].split()[:2] == ["linux/s390x", "FAILS"]
    assert "emulation is denied for it" in lines[2]
    assert registry.tags("checks/dry") == []
