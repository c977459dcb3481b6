"""The image index (manifest list) farm pushes under a tag, built from the children's descriptors.

Pure: no I/O here. The document is serialised once; its digest is the sha256 of those exact bytes,
which are the bytes that get PUT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from farm import mediatypes
from farm.errors import VerificationError
from farm.platforms import Platform

__all__ = ["MAX_INDEX_BYTES", "Descriptor", "IndexDocument", "build_index"]

MAX_INDEX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Descriptor:
    """A child manifest as the index will list it."""

    media_type: str
    digest: str
    size: int
    platform: Platform
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "platform": self.platform.descriptor(),
        }
        if self.annotations:
            entry["annotations"] = dict(self.annotations)
        return entry


@dataclass(frozen=True)
class IndexDocument:
    media_type: str
    raw: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()

    @property
    def size(self) -> int:
        return len(self.raw)


def build_index(children: list[Descriptor], annotations: dict[str, str] | None = None) -> IndexDocument:
    """An OCI index, or a Docker manifest list when every child is a Docker v2 manifest.

    Docker's list type cannot carry annotations, so annotations (the index's or a child's) force an
    OCI index.
    """
    if not children:
        raise VerificationError("an index needs at least one image")
    seen: dict[Platform, str] = {}
    for child in children:
        if child.platform in seen:
            raise VerificationError(
                f"two images for {child.platform}: {seen[child.platform]} and {child.digest}"
            )
        seen[child.platform] = child.digest
    all_docker = all(child.media_type == mediatypes.DOCKER_MANIFEST for child in children)
    annotated = bool(annotations) or any(child.annotations for child in children)
    media_type = mediatypes.DOCKER_MANIFEST_LIST if all_docker and not annotated else mediatypes.OCI_INDEX
    document: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [child.to_json() for child in children],
    }
    if annotations:
        document["annotations"] = dict(annotations)
    raw = json.dumps(document, indent=2).encode()
    if len(raw) > MAX_INDEX_BYTES:
        raise VerificationError(
            f"the index would be {len(raw)} bytes; registries accept at most {MAX_INDEX_BYTES}"
        )
    return IndexDocument(media_type, raw)
