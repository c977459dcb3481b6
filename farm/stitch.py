"""Stitching: images and indexes, wherever they were pushed, into one index under the tags.

The algorithm that the OCI image and distribution specifications and the registries' behaviour
jointly imply, done the same way for ``farm build`` and ``farm imagetools create``:

1. Resolve each source by digest, keeping the registry's raw bytes. An index source is
   flattened: its children (attestation manifests included) are taken as they are declared.
2. Refuse two images of one platform.
3. Read every child's manifest, and every image child's config, once: from what resolving the
   sources already read, else from the child's own repository. Check each config's platform.
4. Put every child into each target repository it is not in yet: mount (else upload) its
   blobs, each blob once however many children share it, then PUT the manifest's original
   bytes under its digest. Registries reject an index whose children are elsewhere, or worse,
   accept it and serve a broken tag. Meanwhile scan each distinct layer of the image children
   for ELF executables, once.
5. Check every image child's executables against its platform.
6. Build the index (pure, ``farm.index``) and PUT it by digest, then under each tag; only the
   last step moves a tag, and only once every child passed both checks.

Everything is content-addressed and every read is checked against its digest, so a child is
verified once from wherever it was read, whichever repositories it goes into.

Concurrent requests run in task groups (``_all``): when one fails, its siblings are cancelled and
awaited before the failure leaves, so none runs on against a registry client being closed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from farm import mediatypes
from farm.index import Descriptor, IndexDocument, build_index, children_of, merge_children
from farm.platforms import Platform
from farm.registry.client import Manifest, RegistryClient
from farm.registry.name import Reference
from farm.registry.verify import (
    LayerScan,
    check_config,
    check_executables,
    config_platform,
    image_document,
    inspectable_layers,
    scan_layers,
)
from farm.tasks import FarmTaskGroup, run_all

__all__ = ["Source", "existing_children", "push_index", "resolve_source"]

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """Where children come from: a repository and the descriptors found there.

    ``manifests`` and ``configs`` hold, by digest, what resolving the source already read, so
    that stitching does not ask the registry for it again.
    """

    repository: Reference
    children: tuple[Descriptor, ...]
    manifests: Mapping[str, Manifest] = field(default_factory=dict, compare=False, repr=False)
    configs: Mapping[str, bytes] = field(default_factory=dict, compare=False, repr=False)


async def resolve_source(client: RegistryClient, ref: Reference) -> Source:
    """The children ``ref`` brings: an index's children (flattened), or the image itself."""
    manifest = await client.get_manifest(ref)
    if manifest.media_type in mediatypes.INDEX_TYPES:
        declared = children_of(manifest.json())
        # A per-platform index (an image with its attestation) is flattened too.
        nested = await run_all(
            client.get_manifest(ref.with_digest(child.digest))
            for child in declared
            if child.media_type in mediatypes.INDEX_TYPES
        )
        flattened = iter(nested)
        children: list[Descriptor] = []
        for child in declared:
            if child.media_type in mediatypes.INDEX_TYPES:
                children += children_of(next(flattened).json())
            else:
                children.append(child)
        return Source(ref, tuple(children))
    config_digest = str(image_document(manifest, ref)["config"]["digest"])
    config = await client.get_blob(ref, config_digest)
    platform = config_platform(config, ref)
    return Source(
        ref,
        (Descriptor(manifest.media_type, manifest.digest, len(manifest.raw), platform),),
        manifests={manifest.digest: manifest},
        configs={config_digest: config},
    )


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
    held = _Held.of(sources)
    levels = await _read_manifests(client, {child.digest: origin[child.digest] for child in children}, held)
    images = await _read_images(client, children, levels[0], held)
    scans = {} if scans is None else scans
    unscanned = {layer: image.ref for image in images for layer in image.layers if layer not in scans}
    repositories = _repositories(tags)
    # A layer is scanned where its image was read: by its digest it is the very blob mounted
    # into the targets, so the copies and the scans need not wait for each other.
    async with FarmTaskGroup() as group:
        for repository in repositories:
            group.create_task(_copy_into(client, repository, levels))
        scanning = group.create_task(scan_layers(client, unscanned))
    scans.update(scanning.result())
    for image in images:
        check_executables(image.platform, image.layers, scans)
    if len(repositories) > 1:
        # Every repository takes the index before any tag moves, so that one refusing it leaves
        # every tag as it was. In a single repository the first tag's PUT is that test.
        await run_all(
            client.put_manifest(repository.with_digest(index.digest), index.raw, index.media_type)
            for repository in repositories
        )
    for tag in tags:
        await client.put_manifest(tag, index.raw, index.media_type)
    return index


@dataclass(frozen=True)
class _Held:
    """What resolving the sources read (manifests and configs, by digest), to be read once."""

    manifests: Mapping[str, Manifest]
    configs: Mapping[str, bytes]

    @classmethod
    def of(cls, sources: Sequence[Source]) -> _Held:
        return cls(
            {digest: manifest for source in sources for digest, manifest in source.manifests.items()},
            {digest: config for source in sources for digest, config in source.configs.items()},
        )

    async def manifest(self, client: RegistryClient, ref: Reference) -> Manifest:
        held = self.manifests.get(ref.digest)
        return held if held is not None else await client.get_manifest(ref)

    async def config(self, client: RegistryClient, repository: Reference, digest: str) -> bytes:
        held = self.configs.get(digest)
        return held if held is not None else await client.get_blob(repository, digest)


@dataclass(frozen=True)
class _Read:
    """A manifest and the repository it was read from (``ref`` names both)."""

    ref: Reference
    manifest: Manifest

    @property
    def is_index(self) -> bool:
        return self.manifest.media_type in mediatypes.INDEX_TYPES


@dataclass(frozen=True)
class _Image:
    """An image child being verified: its platform, where it was read, its manifest parsed."""

    platform: Platform
    ref: Reference
    document: dict[str, Any]

    @property
    def layers(self) -> list[str]:
        return inspectable_layers(self.document)


async def _read_manifests(
    client: RegistryClient, wanted: dict[str, Reference], held: _Held
) -> list[dict[str, _Read]]:
    """Every manifest the index reaches, each read once, by depth: ``wanted`` (digest: the
    repository it is in), then the children of those that are indexes, and so on."""
    levels: list[dict[str, _Read]] = []
    seen: set[str] = set()
    while wanted:
        seen.update(wanted)
        refs = [repository.with_digest(digest) for digest, repository in wanted.items()]
        manifests = await run_all(held.manifest(client, ref) for ref in refs)
        level = {ref.digest: _Read(ref, manifest) for ref, manifest in zip(refs, manifests, strict=True)}
        levels.append(level)
        wanted = {
            child.digest: read.ref
            for read in level.values()
            if read.is_index
            for child in children_of(read.manifest.json())
            if child.digest not in seen
        }
    return levels


async def _read_images(
    client: RegistryClient, children: Sequence[Descriptor], read: Mapping[str, _Read], held: _Held
) -> list[_Image]:
    """The image children (attestations aside), each with its config checked against its platform."""
    images = [
        _Image(
            child.platform,
            read[child.digest].ref,
            image_document(read[child.digest].manifest, read[child.digest].ref),
        )
        for child in children
        if not child.is_attestation and child.platform is not None
    ]
    configs = await run_all(
        held.config(client, image.ref, str(image.document["config"]["digest"])) for image in images
    )
    for image, config in zip(images, configs, strict=True):
        check_config(config, image.platform, image.ref)
    return images


async def _copy_into(
    client: RegistryClient, target: Reference, levels: Sequence[Mapping[str, _Read]]
) -> None:
    """Put every manifest of ``levels`` that is in another repository into ``target``'s.

    Blobs go first, each once however many manifests share it; then the manifests as their
    original bytes: images, then indexes deepest first, so that the registry never sees a
    manifest refer to something it lacks.
    """
    foreign = [[read for read in level.values() if read.ref.name != target.name] for level in levels]
    images = [read for level in foreign for read in level if not read.is_index]
    blobs: dict[str, tuple[Reference, int]] = {}
    for read in images:
        document = read.manifest.json()
        for blob in [document["config"], *document.get("layers", [])]:
            if not blob.get("urls"):  # a foreign layer lives elsewhere by design
                blobs.setdefault(str(blob["digest"]), (read.ref, int(blob["size"])))
    await run_all(_put_blob(client, target, digest, *where) for digest, where in blobs.items())
    indexes_deepest_first = [[read for read in level if read.is_index] for level in reversed(foreign)]
    for batch in [images, *indexes_deepest_first]:
        await run_all(
            client.put_manifest(
                target.with_digest(read.ref.digest), read.manifest.raw, read.manifest.media_type
            )
            for read in batch
        )


async def _put_blob(
    client: RegistryClient, target: Reference, digest: str, source: Reference, size: int
) -> None:
    """Make blob ``digest`` exist in ``target``'s repository: mounted from ``source``'s, else uploaded."""
    # No HEAD first: a mount of a blob the target already holds succeeds too, so it would only
    # cost a request. Where there is no mount (another registry) or it is refused, the HEAD
    # saves uploading a blob the target has.
    if await client.mount_blob(target, digest, source):
        return
    if not await client.has_blob(target, digest):
        await client.copy_blob(target, digest, size, source)


async def _already_tagged(client: RegistryClient, tags: Sequence[Reference], digest: str) -> bool:
    found = await run_all(client.head_manifest(tag) for tag in tags)
    return all(info is not None and info.digest == digest for info in found)


def _repositories(tags: Sequence[Reference]) -> list[Reference]:
    seen: dict[str, Reference] = {}
    for tag in tags:
        seen.setdefault(tag.name, tag)
    return list(seen.values())
