"""Prove that a pushed image is of the platform it was built for, before it goes into an index.

Two checks, both against what the registry stores: the image config's os/architecture/variant,
and the ELF executables in its layers. The second catches what the first cannot: a builder that
reused a base image pulled for another platform writes the right label on the wrong binaries.

The checks are pure (``check_config``, ``check_executables``) over what was read; reading is
separate (``scan_layers``), so that stitching many images reads each config and scans each
layer once, however many images share it. ``verify_image`` does both for one image.
"""

from __future__ import annotations

import asyncio
import json
import stat
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from farm import elf, mediatypes
from farm.errors import PlatformError, VerificationError
from farm.index import Descriptor
from farm.platforms import Platform, normalize
from farm.registry.client import Manifest, RegistryClient
from farm.registry.name import Reference
from farm.tasks import run_all

__all__ = [
    "LayerScan",
    "check_config",
    "check_executables",
    "config_platform",
    "image_document",
    "inspectable_layers",
    "scan_layers",
    "verify_image",
]

_SPOOL_BYTES = 32 * 1024 * 1024
_UNINSPECTABLE = ("zstd",)


@dataclass
class LayerScan:
    """ELF executables found in one layer, by architecture, with one example path each."""

    architectures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)


async def verify_image(
    client: RegistryClient,
    repository: Reference,
    digest: str,
    platform: Platform,
    scans: dict[str, LayerScan] | None = None,
) -> Descriptor:
    """Check the image ``repository@digest`` against ``platform``; return its index descriptor.

    ``scans`` caches layer results by digest across calls (base layers recur).
    """
    ref = repository.with_digest(digest)
    manifest = await client.get_manifest(ref)
    document = image_document(manifest, ref)
    check_config(await client.get_blob(repository, document["config"]["digest"]), platform, ref)
    layers = inspectable_layers(document)
    scans = {} if scans is None else scans
    scans.update(await scan_layers(client, {layer: repository for layer in layers if layer not in scans}))
    check_executables(platform, layers, scans)
    return Descriptor(manifest.media_type, digest, len(manifest.raw), platform)


def image_document(manifest: Manifest, ref: Reference) -> dict[str, Any]:
    """The manifest of an image (not an index), parsed."""
    if manifest.media_type not in mediatypes.MANIFEST_TYPES:
        raise VerificationError(f"{ref} is a {manifest.media_type}, not an image manifest")
    return manifest.json()


def config_platform(config: bytes, ref: Reference) -> Platform:
    """The platform an image config (its raw bytes) names, normalised."""
    try:
        document = json.loads(config)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise VerificationError(f"the config of {ref} is not a JSON object")
    try:
        return normalize(
            str(document.get("os", "")),
            str(document.get("architecture", "")),
            str(document.get("variant", "") or ""),
        )
    except PlatformError as exc:
        raise VerificationError(f"{ref} has an image config with {exc.message}") from exc


def check_config(config: bytes, platform: Platform, ref: Reference) -> None:
    """Refuse the image ``ref`` if its config names another platform than ``platform``."""
    declared = config_platform(config, ref)
    if declared != platform:
        raise VerificationError(
            f"the image built for {platform} says it is {declared} in its config ({ref})",
        )


def inspectable_layers(document: dict[str, Any]) -> list[str]:
    """The digests of the layers farm can look into, in order (a layer may recur)."""
    return [
        str(layer["digest"])
        for layer in document.get("layers", [])
        if not any(kind in layer.get("mediaType", "") for kind in _UNINSPECTABLE)
    ]


def check_executables(platform: Platform, layers: Iterable[str], scans: Mapping[str, LayerScan]) -> None:
    """Refuse an image whose ``layers`` (their ``scans``) hold executables of another architecture."""
    found: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for scan in (scans[layer] for layer in layers):
        found.update(scan.architectures)
        for arch, path in scan.examples.items():
            examples.setdefault(arch, path)
    foreign = sorted(arch for arch in found if arch != platform.architecture)
    if foreign:
        listed = ", ".join(f"{found[a]} {a} (e.g. /{examples[a]})" for a in foreign)
        raise VerificationError(
            f"the image built for {platform} holds executables of another architecture: {listed}",
            hint="the builder mixed platforms up; farm pins base images by digest to prevent this, "
            "so check that the Dockerfile does not fetch binaries for a fixed architecture",
        )


async def scan_layers(client: RegistryClient, layers: Mapping[str, Reference]) -> dict[str, LayerScan]:
    """Scan ``layers`` (digest: the repository to read it from) for ELF executables, concurrently."""
    scanned = await run_all(_scan_layer(client, repository, digest) for digest, repository in layers.items())
    return dict(zip(layers, scanned, strict=True))


async def _scan_layer(client: RegistryClient, repository: Reference, digest: str) -> LayerScan:
    """The ELF executables in layer ``digest`` of ``repository``."""
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        async with client.stream_blob(repository, digest) as chunks:
            async for chunk in chunks:
                spool.write(chunk)
        spool.seek(0)
        return await asyncio.to_thread(_scan_tar, spool, digest)


def _scan_tar(stream: IO[bytes], digest: str) -> LayerScan:
    scan = LayerScan()
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or not member.mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
                    continue
                extracted = tar.extractfile(member)
                if extracted is None:
                    continue
                header = extracted.read(elf.HEADER_SIZE)
                if not elf.is_executable_elf(header):
                    continue
                arch = elf.elf_architecture(header)
                assert arch is not None
                scan.architectures[arch] += 1
                scan.examples.setdefault(arch, member.name.removeprefix("./"))
    except tarfile.TarError as exc:
        raise VerificationError(f"layer {digest} is not a readable tar archive: {exc}") from exc
    return scan
