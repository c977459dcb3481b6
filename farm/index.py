"""The image index (manifest list) farm pushes under a tag, built from the children's descriptors.

Pure: no I/O here. The document is serialised once; its digest is the sha256 of those exact bytes,
which are the bytes that get PUT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from farm import mediatypes
from farm.errors import FarmError, VerificationError
from farm.platforms import Platform, normalize

__all__ = ["MAX_INDEX_BYTES", "Descriptor", "IndexDocument", "build_index", "children_of", "merge_children"]

ATTESTATION_TYPE = "vnd.docker.reference.type"
ATTESTATION_SUBJECT = "vnd.docker.reference.digest"

MAX_INDEX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Descriptor:
    """A child manifest as the index will list it.

    ``platform`` is the normalised platform (None for attestations and platforms farm cannot
    name); ``source``, when the descriptor comes from an existing index, is its JSON as found,
    written back unchanged: farm compares normalised platforms but never rewrites a source's.
    """

    media_type: str
    digest: str
    size: int
    platform: Platform | None
    annotations: dict[str, str] = field(default_factory=dict)
    source: dict[str, object] | None = field(default=None, compare=False)

    @property
    def is_attestation(self) -> bool:
        return self.annotations.get(ATTESTATION_TYPE) == "attestation-manifest"

    @property
    def subject(self) -> str | None:
        """For an attestation manifest: the digest of the image it attests."""
        return self.annotations.get(ATTESTATION_SUBJECT) if self.is_attestation else None

    def to_json(self) -> dict[str, object]:
        if self.source is not None:
            return dict(self.source)
        assert self.platform is not None, "a new descriptor needs a platform"
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
    images = [child for child in children if not child.is_attestation]
    if not images:
        raise VerificationError("an index needs at least one image")
    seen: dict[Platform, str] = {}
    for child in images:
        if child.platform is None:
            raise VerificationError(f"image {child.digest} has no platform farm can name")
        if child.platform in seen:
            raise VerificationError(
                f"two images for {child.platform}: {seen[child.platform]} and {child.digest}",
                hint="an index holds one image per platform",
            )
        seen[child.platform] = child.digest
    # Runnable images first, attestations after them, as BuildKit and manifest-tool order them.
    children = images + [child for child in children if child.is_attestation]
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


def children_of(document: dict[str, object]) -> list[Descriptor]:
    """The descriptors an existing index lists, attestations included, each kept as found."""
    children = []
    manifests = document.get("manifests")
    if not isinstance(manifests, list):
        raise VerificationError("not an image index: it has no 'manifests' list")
    for entry in manifests:
        if not isinstance(entry, dict):
            raise VerificationError("an index entry is not an object")
        declared = entry.get("platform") or {}
        platform: Platform | None
        try:
            platform = normalize(
                str(declared.get("os", "")),
                str(declared.get("architecture", "")),
                str(declared.get("variant", "") or ""),
            )
        except FarmError:
            platform = None  # unknown/unknown (attestations) or a platform farm does not build
        annotations = entry.get("annotations") or {}
        children.append(
            Descriptor(
                media_type=str(entry.get("mediaType", "")),
                digest=str(entry["digest"]),
                size=int(entry["size"]),
                platform=platform,
                annotations={str(k): str(v) for k, v in annotations.items()},
                source=entry,
            )
        )
    return children


def merge_children(existing: list[Descriptor], incoming: list[Descriptor]) -> list[Descriptor]:
    """``existing`` with the platforms ``incoming`` brings replaced (``--append``).

    Untouched platforms keep their descriptors byte for byte, and their attestations; a replaced
    image's attestations go with it.
    """
    replaced = {child.platform for child in incoming if not child.is_attestation}
    dropped = {child.digest for child in existing if not child.is_attestation and child.platform in replaced}
    kept = [
        child
        for child in existing
        if child.digest not in dropped and not (child.is_attestation and child.subject in dropped)
    ]
    kept_digests = {child.digest for child in kept}
    return kept + [child for child in incoming if child.digest not in kept_digests]
