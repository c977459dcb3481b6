"""Stitching: images and indexes, wherever they were pushed, into one index under the tags.

The algorithm the OCI sources jointly imply (research/oci.md §7), done the same way for
``farm build`` and ``farm imagetools create``:

1. Resolve each source by digest, keeping the registry's raw bytes. An index source is
   flattened: its children (attestation manifests included) are taken as they are declared.
2. Refuse two images of one platform.
3. Put every child into each target repository: HEAD it, else mount or upload its blobs and PUT
   the manifest's original bytes under its digest. Registries reject an index whose children
   are elsewhere, or worse, accept it and serve a broken tag.
4. Verify every image child in the target repository (config platform, ELF executables).
5. Build the index (pure, ``farm.index``) and PUT it by digest, then under each tag; only the
   last step moves a tag.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass

from farm import mediatypes
from farm.errors import PlatformError, VerificationError
from farm.index import Descriptor, IndexDocument, build_index, children_of, merge_children
from farm.platforms import normalize
from farm.registry.client import RegistryClient
from farm.registry.name import Reference
from farm.registry.verify import LayerScan, verify_image

__all__ = ["Source", "existing_children", "push_index", "resolve_source"]


@dataclass(frozen=True)
class Source:
    """Where children come from: a repository and the descriptors found there."""

    repository: Reference
    children: tuple[Descriptor, ...]


async def resolve_source(client: RegistryClient, ref: Reference) -> Source:
    """The children ``ref`` brings: an index's children (flattened), or the image itself."""
    manifest = await client.get_manifest(ref)
    if manifest.media_type in mediatypes.INDEX_TYPES:
        children: list[Descriptor] = []
        for child in children_of(manifest.json()):
            if child.media_type in mediatypes.INDEX_TYPES:
                # A per-platform index (an image with its attestation): flatten it too.
                nested = await client.get_manifest(ref.with_digest(child.digest))
                children += children_of(nested.json())
            else:
                children.append(child)
        return Source(ref, tuple(children))
    document = manifest.json()
    config = json.loads(await client.get_blob(ref, document["config"]["digest"]))
    try:
        platform = normalize(
            str(config.get("os", "")), str(config.get("architecture", "")), str(config.get("variant") or "")
        )
    except PlatformError as exc:
        raise VerificationError(f"{ref}: its config names {exc.message}") from exc
    return Source(ref, (Descriptor(manifest.media_type, manifest.digest, len(manifest.raw), platform),))


async def existing_children(client: RegistryClient, tag: Reference) -> list[Descriptor]:
    """What ``tag`` holds now (for ``--append``): an index's children, or its single image."""
    if await client.head_manifest(tag) is None:
        return []
    return list((await resolve_source(client, tag)).children)


async def push_index(
    client: RegistryClient,
    tags: Sequence[Reference],
    sources: Sequence[Source],
    *,
    base: Sequence[Descriptor] = (),
    base_repository: Reference | None = None,
    annotations: dict[str, str] | None = None,
    scans: dict[str, LayerScan] | None = None,
) -> IndexDocument:
    """Stitch ``sources`` (over ``base``, for ``--append``) into one index pushed under ``tags``."""
    # The same manifest brought twice (a tag and its digest) is one child, as buildx treats it.
    incoming = list({child.digest: child for source in sources for child in source.children}.values())
    children = merge_children(list(base), incoming) if base else incoming
    index = build_index(children, annotations)  # refuses duplicates and oversize before any copy
    if await _already_tagged(client, tags, index.digest):
        return index  # nothing changed: the index under every tag was verified when it was pushed
    origin = {child.digest: source.repository for source in sources for child in source.children}
    if base_repository is not None:
        for child in base:
            origin.setdefault(child.digest, base_repository)
    scans = {} if scans is None else scans
    for repository in _repositories(tags):
        await asyncio.gather(
            *(copy_manifest(client, repository, origin[child.digest], child.digest) for child in children)
        )
        await asyncio.gather(
            *(
                verify_image(client, repository, child.digest, child.platform, scans)
                for child in children
                if not child.is_attestation and child.platform is not None
            )
        )
        await client.put_manifest(repository.with_digest(index.digest), index.raw, index.media_type)
    for tag in tags:
        await client.put_manifest(tag, index.raw, index.media_type)
    return index


async def copy_manifest(client: RegistryClient, target: Reference, source: Reference, digest: str) -> None:
    """Make ``digest`` (and everything it references) exist in ``target``'s repository."""
    if await client.head_manifest(target.with_digest(digest)) is not None:
        return
    manifest = await client.get_manifest(source.with_digest(digest))
    document = manifest.json()
    if manifest.media_type in mediatypes.INDEX_TYPES:
        for child in children_of(document):
            await copy_manifest(client, target, source, child.digest)
    else:
        for blob in [document["config"], *document.get("layers", [])]:
            if blob.get("urls"):
                continue  # a foreign layer lives elsewhere by design
            blob_digest = str(blob["digest"])
            if await client.has_blob(target, blob_digest):
                continue
            if not await client.mount_blob(target, blob_digest, source):
                await client.copy_blob(target, blob_digest, int(blob["size"]), source)
    await client.put_manifest(target.with_digest(digest), manifest.raw, manifest.media_type)


async def _already_tagged(client: RegistryClient, tags: Sequence[Reference], digest: str) -> bool:
    found = await asyncio.gather(*(client.head_manifest(tag) for tag in tags))
    return all(info is not None and info.digest == digest for info in found)


def _repositories(tags: Sequence[Reference]) -> list[Reference]:
    seen: dict[str, Reference] = {}
    for tag in tags:
        seen.setdefault(tag.name, tag)
    return list(seen.values())
