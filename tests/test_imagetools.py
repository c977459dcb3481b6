"""``farm imagetools create|inspect`` and ``farm build --append``, against the real registry.

Images are made the way builders push them: blobs by monolithic upload (POST, then PUT with the
digest) and manifests PUT by digest, here with httpx straight against the registry. Their
manifests are serialised unusually (keys unsorted, indent 3, a trailing newline), so any
re-serialisation on farm's side would change a digest and show. Every index farm pushes is read
back as the registry serves it and, when it is an OCI index, checked against the image-spec's
own JSON schema.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from farm.registry.client import RegistryClient
from farm.registry.name import parse_reference
from farm.stitch import push_index, resolve_source
from tests import lab
from tests.lab import hello_context
from tests.oci import assert_valid_oci_index, assert_valid_oci_manifest

pytestmark = pytest.mark.lab

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IN_TOTO = "application/vnd.in-toto+json"
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
UNKNOWN = {"architecture": "unknown", "os": "unknown"}
MIB = 1024 * 1024


# --- the registry, spoken to directly --------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Pushed:
    """A manifest (image, attestation or index) as it was PUT: its exact bytes."""

    host: str
    repository: str
    media_type: str
    raw: bytes

    @property
    def digest(self) -> str:
        return sha256(self.raw)

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def ref(self) -> str:
        return f"{self.host}/{self.repository}@{self.digest}"

    def json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.raw)
        return document


def get_manifest(registry: lab.Registry, repository: str, reference: str) -> httpx.Response:
    response = httpx.get(
        registry.url(f"/v2/{repository}/manifests/{reference}"), headers={"Accept": ACCEPT}, timeout=30
    )
    assert response.status_code == 200, f"{repository}:{reference}: {response.text}"
    return response


def has_manifest(registry: lab.Registry, repository: str, digest: str) -> bool:
    response = httpx.head(registry.url(f"/v2/{repository}/manifests/{digest}"), headers={"Accept": ACCEPT})
    assert response.status_code in (200, 404), response
    return response.status_code == 200


def get_blob(registry: lab.Registry, repository: str, digest: str) -> bytes:
    response = httpx.get(registry.url(f"/v2/{repository}/blobs/{digest}"), follow_redirects=True, timeout=30)
    assert response.status_code == 200, response.text
    assert sha256(response.content) == digest
    return response.content


def push_blob(registry: lab.Registry, repository: str, data: bytes) -> dict[str, Any]:
    """Upload ``data`` into ``repository`` (POST, then PUT with the digest); its digest and size."""
    digest = sha256(data)
    started = httpx.post(registry.url(f"/v2/{repository}/blobs/uploads/"))
    assert started.status_code == 202, started.text
    location = started.url.join(started.headers["location"]).copy_merge_params({"digest": digest})
    done = httpx.put(location, content=data, headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert done.status_code == 201, done.text
    return {"digest": digest, "size": len(data)}


def push_manifest(registry: lab.Registry, repository: str, raw: bytes, media_type: str) -> Pushed:
    pushed = Pushed(registry.host, repository, media_type, raw)
    response = httpx.put(
        registry.url(f"/v2/{repository}/manifests/{pushed.digest}"),
        content=raw,
        headers={"Content-Type": media_type},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    assert response.headers["docker-content-digest"] == pushed.digest
    return pushed


def platform_json(platform: str) -> dict[str, str]:
    os, architecture, *variant = platform.split("/")
    return {"architecture": architecture, "os": os, **({"variant": variant[0]} if variant else {})}


def busybox_digest(registry: lab.Registry, platform: str) -> str:
    """The digest of the seeded busybox index's child for ``platform``."""
    index = get_manifest(registry, "library/busybox", "latest").json()
    (digest,) = [
        entry["digest"] for entry in index["manifests"] if entry["platform"] == platform_json(platform)
    ]
    return str(digest)


def push_image(
    registry: lab.Registry,
    repository: str,
    platform: str,
    *,
    note: str,
    claims: str | None = None,
    docker: bool = False,
    base: lab.Registry | None = None,
) -> Pushed:
    """A new image in ``repository``: busybox's ``platform`` layer under a config of its own.

    The config carries ``note`` as a label, so every image has a digest of its own, and says it is
    for ``claims`` (default: ``platform``). With ``docker``, the manifest is Docker's v2 schema 2.
    busybox comes from ``base`` (default: ``registry``).
    """
    base = base or registry
    source = get_manifest(base, "library/busybox", busybox_digest(base, platform)).json()
    config = json.loads(get_blob(base, "library/busybox", source["config"]["digest"]))
    config.pop("variant", None)
    config.update({key: value for key, value in platform_json(claims or platform).items()})
    config["config"]["Labels"] = {"org.example.note": note}
    layers = [
        {
            "mediaType": DOCKER_LAYER if docker else layer["mediaType"],
            **push_blob(registry, repository, get_blob(base, "library/busybox", layer["digest"])),
        }
        for layer in source["layers"]
    ]
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            **push_blob(registry, repository, json.dumps(config).encode()),
        },
        "layers": layers,
    }
    if not docker:
        assert_valid_oci_manifest(manifest)
    return push_manifest(registry, repository, (json.dumps(manifest, indent=3) + "\n").encode(), media_type)


def push_buildkit_index(
    registry: lab.Registry, repository: str, image: Pushed, platform: str
) -> tuple[Pushed, Pushed]:
    """What BuildKit pushes by digest for one platform with provenance on: an index holding the
    image and its attestation manifest (OCI artifact form). Returns the index and the attestation."""
    empty = push_blob(registry, repository, b"{}")
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://slsa.dev/provenance/v0.2",
        "subject": [{"name": "_", "digest": {"sha256": image.digest.removeprefix("sha256:")}}],
        "predicate": {"builder": {"id": f"https://example.com/test/{repository}"}},
    }
    attestation = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.docker.attestation.manifest.v1+json",
        "config": {"mediaType": OCI_EMPTY, **empty, "data": "e30="},
        "layers": [
            {
                "mediaType": IN_TOTO,
                **push_blob(registry, repository, json.dumps(statement).encode()),
                "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"},
            }
        ],
        "subject": {"mediaType": image.media_type, "digest": image.digest, "size": image.size},
    }
    assert_valid_oci_manifest(attestation)
    pushed_attestation = push_manifest(registry, repository, json.dumps(attestation).encode(), OCI_MANIFEST)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": image.media_type,
                "digest": image.digest,
                "size": image.size,
                "platform": platform_json(platform),
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": pushed_attestation.digest,
                "size": pushed_attestation.size,
                "annotations": {
                    "vnd.docker.reference.digest": image.digest,
                    "vnd.docker.reference.type": "attestation-manifest",
                },
                "platform": UNKNOWN,
            },
        ],
    }
    assert_valid_oci_index(index)
    return push_manifest(registry, repository, json.dumps(index).encode(), OCI_INDEX), pushed_attestation


def read_index(registry: lab.Registry, repository: str, tag: str) -> dict[str, Any]:
    """The index under ``tag`` as the registry serves it: served as the type it declares, valid by
    the image-spec's schema if it is an OCI index, and with every child in the repository."""
    response = get_manifest(registry, repository, tag)
    document: dict[str, Any] = response.json()
    assert response.headers["content-type"] == document["mediaType"]
    assert document["mediaType"] in (OCI_INDEX, DOCKER_LIST)
    if document["mediaType"] == OCI_INDEX:
        assert_valid_oci_index(document)
    for entry in document["manifests"]:  # every child is in the repository, as described
        child = get_manifest(registry, repository, entry["digest"])
        assert len(child.content) == entry["size"]
        assert child.headers["content-type"] == entry["mediaType"]
    return document


def same_json(first: object, second: object) -> bool:
    """Equal as JSON text, key order included: a descriptor kept byte for byte."""
    return json.dumps(first) == json.dumps(second)


def layer_link(registry: lab.Registry, repository: str, digest: str) -> Path:
    """Where distribution records that ``repository`` holds the blob ``digest``."""
    hex_digest = digest.removeprefix("sha256:")
    return (
        registry.data
        / "docker/registry/v2/repositories"
        / repository
        / "_layers/sha256"
        / hex_digest
        / "link"
    )


# --- farm, run as a user runs it --------------------------------------------------------------


def create(*args: str) -> lab.FarmRun:
    return lab.farm("imagetools", "create", *args)


def pushed_digest(run: lab.FarmRun) -> str:
    """The index digest ``farm imagetools create`` reports (one ``pushed TAG@DIGEST`` per tag)."""
    digests = {line.rsplit("@", 1)[1] for line in run.stdout.splitlines() if line.startswith("pushed ")}
    assert len(digests) == 1, run.stdout
    return digests.pop()


def farm_bytes(*args: str) -> bytes:
    """farm's standard output as bytes, untouched by any decoding."""
    done = subprocess.run([sys.executable, "-m", "farm", *args], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


# --- 1. children in another repository -------------------------------------------------------


def test_children_in_another_repository_are_mounted_into_the_target_and_run(
    registry: lab.Registry, docker: None
) -> None:
    machines = {"linux/amd64": "x86_64", "linux/arm64": "aarch64", "linux/arm/v7": "armv7l"}
    digests = [busybox_digest(registry, platform) for platform in machines]
    for platform, digest in zip(machines, digests, strict=True):
        lab.run(
            [
                "skopeo", "copy", "--quiet", "--preserve-digests",
                "--src-tls-verify=false", "--dest-tls-verify=false",
                f"docker://{registry.host}/library/busybox@{digest}",
                f"docker://{registry.host}/mount/src:{platform.replace('/', '-')}",
            ]
        )  # fmt: skip
    tag = f"{registry.host}/mount/dst:1"

    run = create("-t", tag, *(f"{registry.host}/mount/src@{digest}" for digest in digests))

    assert run.code == 0, run.stderr
    index = read_index(registry, "mount/dst", "1")
    assert pushed_digest(run) == sha256(get_manifest(registry, "mount/dst", "1").content)
    assert [entry["digest"] for entry in index["manifests"]] == digests
    assert [entry["platform"] for entry in index["manifests"]] == [platform_json(p) for p in machines]
    assert registry.raw_manifest("mount/dst:1") == index  # a real client reads it
    for digest in digests:
        assert has_manifest(registry, "mount/dst", digest)
        child = get_manifest(registry, "mount/dst", digest).json()
        for blob in [child["config"], *child["layers"]]:
            assert layer_link(registry, "mount/dst", blob["digest"]).read_text() == blob["digest"]
    # Every blob was mounted from mount/src: an upload would have opened a session under _uploads.
    assert not (registry.data / "docker/registry/v2/repositories/mount/dst/_uploads").exists()
    for platform, machine in machines.items():
        assert lab.docker_run(tag, platform, "uname", "-m") == machine


def test_each_manifest_config_and_layer_is_read_once_and_each_blob_mounted_once(
    registry: lab.Registry,
) -> None:
    """Three images in another repository, two sharing a layer (busybox's arm/v6, also under an
    arm/v5 config): what resolving read is not read again, the shared layer is mounted once and
    scanned once, and nothing is asked for twice."""
    images = (
        push_image(registry, "once/src", "linux/arm/v6", note="once"),
        push_image(registry, "once/src", "linux/arm/v6", claims="linux/arm/v5", note="once"),
        push_image(registry, "once/src", "linux/amd64", note="once"),
    )
    blobs = {blob["digest"] for image in images for blob in [image.json()["config"], *image.json()["layers"]]}
    assert len(blobs) == 5  # three configs, two layers
    recording = lab.Recording()

    async def stitch() -> None:
        async with RegistryClient(transport=recording) as client:
            sources = await asyncio.gather(*(resolve_source(client, parse_reference(i.ref)) for i in images))
            await push_index(client, [parse_reference(f"{registry.host}/once/dst:1")], sources)

    asyncio.run(stitch())

    source, target = "/v2/once/src", "/v2/once/dst"
    assert sorted((method, path) for method, path, _, _ in recording.exchanges) == sorted(
        [
            *(("GET", f"{source}/manifests/{image.digest}") for image in images),
            *(("GET", f"{source}/blobs/{digest}") for digest in blobs),  # configs; layers to scan
            *(("POST", f"{target}/blobs/uploads/") for _ in blobs),  # a mount each
            *(("PUT", f"{target}/manifests/{image.digest}") for image in images),
            ("HEAD", f"{target}/manifests/1"),
            ("PUT", f"{target}/manifests/1"),
        ]
    )
    index = read_index(registry, "once/dst", "1")
    assert [entry["digest"] for entry in index["manifests"]] == [image.digest for image in images]


# --- 2. manifests are copied as their original bytes -----------------------------------------


def test_child_manifests_reach_every_target_repository_as_their_original_bytes(
    registry: lab.Registry,
) -> None:
    oci = push_image(registry, "bytes/src", "linux/arm64", note="bytes")
    docker = push_image(registry, "bytes/src", "linux/amd64", note="bytes", docker=True)

    targets = [("bytes/dst", "1"), ("bytes/other", "2"), ("bytes/src", "all")]  # the last holds them already

    run = create(
        *(f"--tag={registry.host}/{repository}:{tag}" for repository, tag in targets), oci.ref, docker.ref
    )

    assert run.code == 0, run.stderr
    for repository, tag in targets:
        index = read_index(registry, repository, tag)
        assert index["mediaType"] == OCI_INDEX  # one OCI child makes the index OCI
        assert index["manifests"] == [
            {"mediaType": image.media_type, "digest": image.digest, "size": image.size, "platform": platform}
            for image, platform in (
                (oci, platform_json("linux/arm64")),
                (docker, platform_json("linux/amd64")),
            )
        ]
        for image in (oci, docker):
            copied = get_manifest(registry, repository, image.digest)
            assert copied.content == image.raw
            assert copied.headers["content-type"] == image.media_type
            assert copied.headers["docker-content-digest"] == image.digest


def test_children_on_another_registry_are_uploaded_as_their_original_bytes(
    tmp_path: Path, registry: lab.Registry
) -> None:
    """No mount across registries: every blob is read from the source and uploaded."""
    with lab.running_registry(tmp_path / "other", seed=False) as other:
        image = push_image(other, "far/src", "linux/arm/v7", note="far", base=registry)

        run = create("-t", f"{registry.host}/far/dst:1", image.ref)

        assert run.code == 0, run.stderr
    (entry,) = read_index(registry, "far/dst", "1")["manifests"]
    assert entry["digest"] == image.digest
    assert get_manifest(registry, "far/dst", image.digest).content == image.raw
    for blob in [image.json()["config"], *image.json()["layers"]]:
        assert layer_link(registry, "far/dst", blob["digest"]).read_text() == blob["digest"]
        assert get_blob(registry, "far/dst", blob["digest"])  # whole, and hashing to its digest
    # The upload sessions left their folder (which a mount, as in the test above, never makes).
    assert (registry.data / "docker/registry/v2/repositories/far/dst/_uploads").is_dir()


# --- 3. attestations kept --------------------------------------------------------------------


def test_attestations_are_flattened_in_after_the_images_and_leave_with_their_image(
    registry: lab.Registry,
) -> None:
    source = "att/src"
    amd64 = push_image(registry, source, "linux/amd64", note="att-1")
    arm64 = push_image(registry, source, "linux/arm64", note="att-1")
    amd64_index, amd64_attestation = push_buildkit_index(registry, source, amd64, "linux/amd64")
    arm64_index, arm64_attestation = push_buildkit_index(registry, source, arm64, "linux/arm64")
    declared = {
        entry["digest"]: entry for index in (amd64_index, arm64_index) for entry in index.json()["manifests"]
    }
    tag = f"{registry.host}/att/dst:1"

    run = create("-t", tag, amd64_index.ref, arm64_index.ref)

    assert run.code == 0, run.stderr
    first = read_index(registry, "att/dst", "1")["manifests"]
    order = [amd64, arm64, amd64_attestation, arm64_attestation]
    assert [entry["digest"] for entry in first] == [manifest.digest for manifest in order]
    assert all(entry["mediaType"] == OCI_MANIFEST for entry in first)  # flattened: no nested index
    assert all(same_json(entry, declared[entry["digest"]]) for entry in first)  # as BuildKit declared them
    for attestation, image in ((first[2], amd64), (first[3], arm64)):
        assert attestation["platform"] == UNKNOWN
        assert attestation["annotations"] == {
            "vnd.docker.reference.digest": image.digest,
            "vnd.docker.reference.type": "attestation-manifest",
        }
    for manifest in order:
        assert get_manifest(registry, "att/dst", manifest.digest).content == manifest.raw
    for attestation in (amd64_attestation, arm64_attestation):
        for blob in [attestation.json()["config"], *attestation.json()["layers"]]:
            assert layer_link(registry, "att/dst", blob["digest"]).exists()

    # A new amd64 image (no attestation): the old amd64 image and its attestation go.
    amd64_new = push_image(registry, source, "linux/amd64", note="att-2")
    run = create("--append", "-t", tag, amd64_new.ref)

    assert run.code == 0, run.stderr
    second = read_index(registry, "att/dst", "1")["manifests"]
    assert [entry["digest"] for entry in second] == [arm64.digest, amd64_new.digest, arm64_attestation.digest]
    assert same_json(second[0], first[1])
    assert same_json(second[2], first[3])
    assert second[1] == {
        "mediaType": OCI_MANIFEST,
        "digest": amd64_new.digest,
        "size": amd64_new.size,
        "platform": platform_json("linux/amd64"),
    }

    # A new arm64 image with its attestation (a BuildKit index): the old pair goes, the new pair
    # comes, and the amd64 image farm described itself stays as it was.
    arm64_new = push_image(registry, source, "linux/arm64", note="att-2")
    arm64_new_index, arm64_new_attestation = push_buildkit_index(registry, source, arm64_new, "linux/arm64")
    run = create("--append", "-t", tag, arm64_new_index.ref)

    assert run.code == 0, run.stderr
    third = read_index(registry, "att/dst", "1")["manifests"]
    assert [entry["digest"] for entry in third] == [
        amd64_new.digest,
        arm64_new.digest,
        arm64_new_attestation.digest,
    ]
    assert same_json(third[0], second[1])
    assert third[2]["annotations"]["vnd.docker.reference.digest"] == arm64_new.digest
    assert (
        get_manifest(registry, "att/dst", arm64_new_attestation.digest).content == arm64_new_attestation.raw
    )


# --- 4. --append keeps the untouched platforms byte for byte ---------------------------------


def test_imagetools_append_replaces_one_platform_and_keeps_the_others_byte_for_byte(
    registry: lab.Registry,
) -> None:
    platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    sources = [f"{registry.host}/library/busybox@{busybox_digest(registry, p)}" for p in platforms]
    tag = f"{registry.host}/keep/dst:1"
    run = create("-t", tag, *sources)
    assert run.code == 0, run.stderr
    before = read_index(registry, "keep/dst", "1")["manifests"]

    arm64 = push_image(registry, "keep/src", "linux/arm64", note="keep")
    run = create("--append", "-t", tag, arm64.ref)

    assert run.code == 0, run.stderr
    after = read_index(registry, "keep/dst", "1")["manifests"]
    assert [entry["platform"] for entry in after] == [
        platform_json(p) for p in ("linux/amd64", "linux/arm/v7", "linux/arm64")
    ]
    assert same_json(after[0], before[0])
    assert same_json(after[1], before[2])
    assert after[2]["digest"] == arm64.digest != before[1]["digest"]

    # --append onto a tag that holds nothing yet makes a new index.
    run = create("--append", "-t", f"{registry.host}/keep/fresh:1", arm64.ref)
    assert run.code == 0, run.stderr
    assert [entry["digest"] for entry in read_index(registry, "keep/fresh", "1")["manifests"]] == [
        arm64.digest
    ]


def test_build_append_rebuilds_one_platform_and_keeps_the_others_byte_for_byte(
    tmp_path: Path, registry: lab.Registry, docker: None, inventory: Path
) -> None:
    context = hello_context(tmp_path, registry)
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "COPY nonce /etc/hello/nonce\n")
    (context / "nonce").write_text("first\n")
    tag = f"{registry.host}/append/hello:1"
    run = lab.farm(
        "build", "-t", tag, "--platform", "linux/amd64,linux/arm64,linux/arm/v7",
        "--inventory", str(inventory), str(context),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    before = {
        json.dumps(entry["platform"]): entry
        for entry in read_index(registry, "append/hello", "1")["manifests"]
    }

    (context / "nonce").write_text("second\n")
    run = lab.farm(
        "build", "-t", tag, "--platform", "linux/amd64", "--append",
        "--annotation", "org.example.rebuilt=linux/amd64", "--inventory", str(inventory), str(context),
    )  # fmt: skip

    assert run.code == 0, run.stderr
    index = read_index(registry, "append/hello", "1")
    assert index["mediaType"] == OCI_INDEX
    assert index["annotations"] == {"org.example.rebuilt": "linux/amd64"}
    after = {json.dumps(entry["platform"]): entry for entry in index["manifests"]}
    assert len(index["manifests"]) == 3
    for kept in ("linux/arm64", "linux/arm/v7"):
        key = json.dumps(platform_json(kept))
        assert same_json(after[key], before[key])
    amd64 = json.dumps(platform_json("linux/amd64"))
    assert after[amd64]["digest"] != before[amd64]["digest"]
    assert lab.docker_run(tag, "linux/amd64", "cat", "/etc/hello/nonce") == "second"
    assert lab.docker_run(tag, "linux/arm64", "cat", "/etc/hello/nonce") == "first"


# --- 5. refusals, and annotations ------------------------------------------------------------


@pytest.mark.parametrize("first", ["index", "image"])
def test_two_images_of_one_platform_are_refused_and_nothing_is_tagged(
    registry: lab.Registry, first: str
) -> None:
    busybox_amd64 = busybox_digest(registry, "linux/amd64")
    other = push_image(registry, f"dup/src-{first}", "linux/amd64", note=f"dup-{first}")
    source = f"{registry.host}/library/busybox" + (":latest" if first == "index" else f"@{busybox_amd64}")

    run = create("-t", f"{registry.host}/dup/dst-{first}:1", source, other.ref)

    assert run.code == 1, run.stderr
    assert "two images for linux/amd64" in run.stderr
    assert busybox_amd64 in run.stderr
    assert other.digest in run.stderr
    assert registry.tags(f"dup/dst-{first}") == []
    assert not has_manifest(registry, f"dup/dst-{first}", other.digest)  # refused before any copy


def test_an_index_over_four_mebibytes_is_refused_and_nothing_is_tagged(registry: lab.Registry) -> None:
    image = push_image(registry, "big/src", "linux/amd64", note="big")
    # The registry itself takes no manifest over 4 MiB, and one command-line argument holds at
    # most 128 KiB (all of them 2 MiB): so 3 MiB come in a source index's descriptor annotation,
    # the rest from --annotation.
    bulky = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.digest,
                "size": image.size,
                "platform": platform_json("linux/amd64"),
                "annotations": {"org.example.filler": "x" * 3 * MIB},
            }
        ],
    }
    source = push_manifest(registry, "big/src", json.dumps(bulky).encode(), OCI_INDEX)
    extra = [f"--annotation=org.example.a{n}={'y' * 100_000}" for n in range(12)]

    run = create("-t", f"{registry.host}/big/dst:1", *extra, source.ref)

    assert run.code == 1, run.stderr
    assert str(4 * MIB) in run.stderr
    assert registry.tags("big/dst") == []
    assert not has_manifest(registry, "big/dst", image.digest)  # refused before any copy

    # Without the extra annotations it fits, so the size alone was refused.
    run = create("-t", f"{registry.host}/big/dst:fits", source.ref)
    assert run.code == 0, run.stderr
    assert read_index(registry, "big/dst", "fits")["manifests"] == bulky["manifests"]


def test_annotations_land_in_the_index_and_make_it_oci(registry: lab.Registry) -> None:
    amd64 = push_image(registry, "note/src", "linux/amd64", note="note", docker=True)
    arm64 = push_image(registry, "note/src", "linux/arm64", note="note", docker=True)

    run = create("-t", f"{registry.host}/note/dst:plain", amd64.ref, arm64.ref)
    assert run.code == 0, run.stderr
    plain = read_index(registry, "note/dst", "plain")
    assert plain["mediaType"] == DOCKER_LIST
    assert "annotations" not in plain

    annotations = {
        "org.opencontainers.image.description": "busybox, twice = two platforms",
        "org.example.empty": "",
    }
    run = create(
        "-t", f"{registry.host}/note/dst:annotated", amd64.ref, arm64.ref,
        *(f"--annotation={key}={value}" for key, value in annotations.items()),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    annotated = read_index(registry, "note/dst", "annotated")  # validated as an OCI index
    assert annotated["mediaType"] == OCI_INDEX
    assert annotated["annotations"] == annotations
    assert annotated["manifests"] == plain["manifests"]
    assert registry.raw_manifest("note/dst:annotated") == annotated


# --- 6. inspect -------------------------------------------------------------------------------


def test_inspect_shows_platforms_digests_sizes_and_attestations(registry: lab.Registry) -> None:
    source = "show/src"
    amd64 = push_image(registry, source, "linux/amd64", note="show")
    arm64 = push_image(registry, source, "linux/arm/v7", note="show")
    amd64_index, amd64_attestation = push_buildkit_index(registry, source, amd64, "linux/amd64")
    arm64_index, arm64_attestation = push_buildkit_index(registry, source, arm64, "linux/arm/v7")
    tag = f"{registry.host}/show/dst:1"
    run = create("-t", tag, "--annotation", "org.example.shown=yes", amd64_index.ref, arm64_index.ref)
    assert run.code == 0, run.stderr
    digest = pushed_digest(run)
    read_index(registry, "show/dst", "1")

    def image_bytes(manifest: Pushed) -> int:
        return sum(blob["size"] for blob in [manifest.json()["config"], *manifest.json()["layers"]])

    expected = [
        {
            "platform": "linux/amd64",
            "digest": amd64.digest,
            "mediaType": OCI_MANIFEST,
            "size": amd64.size,
            "imageSize": image_bytes(amd64),
            "attestationFor": None,
        },
        {
            "platform": "linux/arm/v7",
            "digest": arm64.digest,
            "mediaType": OCI_MANIFEST,
            "size": arm64.size,
            "imageSize": image_bytes(arm64),
            "attestationFor": None,
        },
        *(
            {
                "platform": "unknown/unknown",
                "digest": attestation.digest,
                "mediaType": OCI_MANIFEST,
                "size": attestation.size,
                "imageSize": image_bytes(attestation),
                "attestationFor": image.digest,
            }
            for attestation, image in ((amd64_attestation, amd64), (arm64_attestation, arm64))
        ),
    ]

    shown = lab.farm("imagetools", "inspect", "--json", tag)
    assert shown.code == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "name": tag,
        "mediaType": OCI_INDEX,
        "digest": digest,
        "manifests": expected,
        "annotations": {"org.example.shown": "yes"},
    }

    text = lab.farm("imagetools", "inspect", tag)
    assert text.code == 0, text.stderr
    lines = text.stdout.splitlines()
    assert f"Digest:    {digest}" in lines
    assert f"MediaType: {OCI_INDEX}" in lines
    assert "Annotation org.example.shown=yes" in lines
    rows = lines[lines.index("Manifests:") + 1 :]
    assert [row.split()[:2] for row in rows] == [[child["platform"], child["digest"]] for child in expected]
    assert f"{image_bytes(amd64):,} bytes" in rows[0]
    assert f"{image_bytes(arm64):,} bytes" in rows[1]
    assert rows[2].endswith(f"attestation for {amd64.digest}")
    assert rows[3].endswith(f"attestation for {arm64.digest}")


def test_inspect_raw_prints_the_exact_bytes_the_registry_serves(registry: lab.Registry) -> None:
    image = push_image(registry, "raw/src", "linux/arm64", note="raw")
    run = create("-t", f"{registry.host}/raw/dst:1", image.ref)
    assert run.code == 0, run.stderr

    read_index(registry, "raw/dst", "1")

    raw = farm_bytes("imagetools", "inspect", "--raw", f"{registry.host}/raw/dst:1")

    assert raw == get_manifest(registry, "raw/dst", "1").content
    assert sha256(raw) == pushed_digest(run)
    # A child too, whose bytes (indent 3, a trailing newline) only survive if nothing reformats them.
    assert (
        farm_bytes("imagetools", "inspect", "--raw", f"{registry.host}/raw/dst@{image.digest}") == image.raw
    )


# --- 7. verification on every path -----------------------------------------------------------


@pytest.mark.parametrize("way", ["image", "index"])
def test_an_image_whose_layers_hold_another_architecture_is_refused(registry: lab.Registry, way: str) -> None:
    """busybox's amd64 layer under a config that says arm64: the label is right, the binaries not."""
    liar = push_image(registry, f"liar/src-{way}", "linux/amd64", claims="linux/arm64", note=f"liar-{way}")
    source = liar.ref
    if way == "index":
        source = push_buildkit_index(registry, f"liar/src-{way}", liar, "linux/arm64")[0].ref

    run = create("-t", f"{registry.host}/liar/dst-{way}:1", source)

    assert run.code == 1, run.stderr
    assert "linux/arm64" in run.stderr
    assert "1 amd64 (e.g. /bin/busybox)" in run.stderr
    assert registry.tags(f"liar/dst-{way}") == []


def test_an_index_entry_that_contradicts_its_image_config_is_refused(registry: lab.Registry) -> None:
    """A source index that calls busybox's genuine amd64 image linux/arm64."""
    image = push_image(registry, "liar/src-entry", "linux/amd64", note="liar-entry")
    source, _ = push_buildkit_index(registry, "liar/src-entry", image, "linux/arm64")

    run = create("-t", f"{registry.host}/liar/dst-entry:1", source.ref)

    assert run.code == 1, run.stderr
    assert "linux/arm64" in run.stderr
    assert "linux/amd64" in run.stderr
    assert registry.tags("liar/dst-entry") == []
