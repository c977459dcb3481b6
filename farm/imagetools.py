"""``farm imagetools``: stitch existing images into an index, and look at what a tag holds."""

from __future__ import annotations

from dataclasses import dataclass

from farm import mediatypes
from farm.errors import InputError
from farm.index import Descriptor, IndexDocument
from farm.registry.client import RegistryClient
from farm.registry.name import Reference
from farm.stitch import existing_children, push_index, resolve_source
from farm.tasks import run_all

__all__ = ["InspectedChild", "Inspection", "create_index", "inspect"]


async def create_index(
    tags: list[Reference],
    sources: list[Reference],
    *,
    append: bool,
    annotations: dict[str, str],
    insecure_registries: tuple[str, ...],
) -> IndexDocument:
    """Merge ``sources`` (images or indexes) into one index under ``tags``.

    With ``append``, start from what the first tag holds and replace only the platforms the
    sources bring; every other descriptor is kept byte for byte.
    """
    if any(tag.digest for tag in tags):
        raise InputError("a target must be a tag, not a digest")
    async with RegistryClient(insecure_registries=insecure_registries) as client:
        resolved = await run_all(resolve_source(client, source) for source in sources)
        base = await existing_children(client, tags[0]) if append else []
        return await push_index(
            client,
            tags,
            resolved,
            base=base,
            base_repository=tags[0],
            annotations=annotations or None,
        )


@dataclass(frozen=True)
class InspectedChild:
    descriptor: Descriptor
    image_bytes: int | None  # config and layers, for images


@dataclass(frozen=True)
class Inspection:
    reference: Reference
    media_type: str
    digest: str
    raw: bytes
    children: tuple[InspectedChild, ...]
    annotations: dict[str, str]


async def inspect(ref: Reference, insecure_registries: tuple[str, ...]) -> Inspection:
    async with RegistryClient(insecure_registries=insecure_registries) as client:
        manifest = await client.get_manifest(ref)
        document = manifest.json()
        children: list[InspectedChild] = []
        if manifest.media_type in mediatypes.INDEX_TYPES:
            source = await resolve_source(client, ref)
            sizes = await run_all(_image_bytes(client, ref, child) for child in source.children)
            children = [InspectedChild(c, size) for c, size in zip(source.children, sizes, strict=True)]
        annotations = document.get("annotations") or {}
        return Inspection(
            reference=ref,
            media_type=manifest.media_type,
            digest=manifest.digest,
            raw=manifest.raw,
            children=tuple(children),
            annotations={str(k): str(v) for k, v in annotations.items()},
        )


async def _image_bytes(client: RegistryClient, ref: Reference, child: Descriptor) -> int | None:
    if child.media_type not in mediatypes.MANIFEST_TYPES:
        return None
    document = (await client.get_manifest(ref.with_digest(child.digest))).json()
    blobs = [document["config"], *document.get("layers", [])]
    return sum(int(blob.get("size", 0)) for blob in blobs)
