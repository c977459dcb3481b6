"""Prove that a pushed image is of the platform it was built for, before it goes into an index.

Two checks, both against what the registry stores: the image config's os/architecture/variant,
and the ELF executables in its layers. The second catches what the first cannot: a builder that
reused a base image pulled for another platform writes the right label on the wrong binaries.
"""

from __future__ import annotations

import asyncio
import json
import stat
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

from farm import elf, mediatypes
from farm.errors import PlatformError, VerificationError
from farm.index import Descriptor
from farm.platforms import Platform, normalize
from farm.registry.client import RegistryClient
from farm.registry.name import Reference

__all__ = ["LayerScan", "verify_image"]

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
    if manifest.media_type not in mediatypes.MANIFEST_TYPES:
        raise VerificationError(f"{ref} is a {manifest.media_type}, not an image manifest")
    document = manifest.json()
    config = await _load_json_blob(client, repository, document["config"]["digest"])
    declared = _declared_platform(config, ref)
    if declared != platform:
        raise VerificationError(
            f"the image built for {platform} says it is {declared} in its config ({ref})",
        )
    scans = {} if scans is None else scans
    found: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for layer in document.get("layers", []):
        layer_digest = layer["digest"]
        if any(kind in layer.get("mediaType", "") for kind in _UNINSPECTABLE):
            continue
        if layer_digest not in scans:
            scans[layer_digest] = await _scan_layer(client, repository, layer_digest)
        scan = scans[layer_digest]
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
    return Descriptor(manifest.media_type, digest, len(manifest.raw), platform)


def _declared_platform(config: dict[str, object], ref: Reference) -> Platform:
    try:
        return normalize(
            str(config.get("os", "")),
            str(config.get("architecture", "")),
            str(config.get("variant", "") or ""),
        )
    except PlatformError as exc:
        raise VerificationError(f"{ref} has an image config with {exc.message}") from exc


async def _load_json_blob(client: RegistryClient, repository: Reference, digest: str) -> dict[str, object]:
    data = await client.get_blob(repository, digest)
    document = json.loads(data)
    if not isinstance(document, dict):
        raise VerificationError(f"config {digest} of {repository.name} is not a JSON object")
    return document


async def _scan_layer(client: RegistryClient, repository: Reference, digest: str) -> LayerScan:
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
