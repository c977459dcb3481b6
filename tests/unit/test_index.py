"""farm.index: the index pushed under a tag, checked against the OCI image-spec's own JSON schema."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm import mediatypes
from farm.errors import VerificationError
from farm.index import MAX_INDEX_BYTES, Descriptor, IndexDocument, build_index
from farm.platforms import KNOWN_PLATFORMS, Platform
from tests.oci import INDEX_VALIDATOR, assert_valid_oci_index

_SETTINGS = settings(database=None, deadline=None, max_examples=40)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
ARM_V7 = Platform("linux", "arm", "v7")


def child(platform: Platform, media_type: str = mediatypes.OCI_MANIFEST, **annotations: str) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(str(platform).encode()).hexdigest()
    return Descriptor(media_type, digest, 400 + len(str(platform)), platform, dict(annotations))


def parsed(index: IndexDocument) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(index.raw)
    return document


def test_the_schema_catches_what_it_should() -> None:
    good = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": []}
    assert_valid_oci_index(good)
    bad_digest = {"digest": "sha256:", "size": 1, "mediaType": mediatypes.OCI_MANIFEST}
    for bad in (
        {**good, "schemaVersion": 1},
        {**good, "manifests": [bad_digest]},
        {**good, "manifests": [{**bad_digest, "digest": "sha256:ab", "platform": {"os": "linux"}}]},
        {**good, "annotations": {"a": 1}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            INDEX_VALIDATOR.validate(bad)


def test_oci_children_make_an_oci_index() -> None:
    children = [child(AMD64), child(ARM64), child(ARM_V7)]
    index = build_index(children)
    document = parsed(index)
    assert index.media_type == mediatypes.OCI_INDEX
    assert_valid_oci_index(document)
    assert document == {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_INDEX,
        "manifests": [
            {
                "mediaType": c.media_type,
                "digest": c.digest,
                "size": c.size,
                "platform": c.platform.descriptor(),
            }
            for c in children
        ],
    }


def test_docker_children_make_a_docker_manifest_list() -> None:
    children = [child(AMD64, mediatypes.DOCKER_MANIFEST), child(ARM_V7, mediatypes.DOCKER_MANIFEST)]
    index = build_index(children)
    document = parsed(index)
    assert index.media_type == mediatypes.DOCKER_MANIFEST_LIST
    assert document["mediaType"] == mediatypes.DOCKER_MANIFEST_LIST
    assert document["schemaVersion"] == 2
    assert [m["platform"] for m in document["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm", "os": "linux", "variant": "v7"},
    ]
    assert "annotations" not in json.dumps(document)


def test_mixed_children_make_an_oci_index() -> None:
    index = build_index([child(AMD64, mediatypes.DOCKER_MANIFEST), child(ARM64)])
    assert index.media_type == mediatypes.OCI_INDEX
    assert_valid_oci_index(parsed(index))


def test_annotations_force_an_oci_index() -> None:
    children = [child(AMD64, mediatypes.DOCKER_MANIFEST), child(ARM64, mediatypes.DOCKER_MANIFEST)]
    annotations = {"org.opencontainers.image.source": "https://example.com/app"}
    index = build_index(children, annotations)
    document = parsed(index)
    assert index.media_type == mediatypes.OCI_INDEX
    assert document["annotations"] == annotations
    assert_valid_oci_index(document)
    assert build_index(children, {}).media_type == mediatypes.DOCKER_MANIFEST_LIST


def test_child_annotations_force_an_oci_index_too() -> None:
    children = [
        child(AMD64, mediatypes.DOCKER_MANIFEST, **{"org.example.note": "x"}),
        child(ARM64, mediatypes.DOCKER_MANIFEST),
    ]
    index = build_index(children)
    document = parsed(index)
    assert index.media_type == mediatypes.OCI_INDEX
    assert document["manifests"][0]["annotations"] == {"org.example.note": "x"}
    assert "annotations" not in document["manifests"][1]
    assert_valid_oci_index(document)


def test_no_children_is_refused() -> None:
    with pytest.raises(VerificationError):
        build_index([])


def test_two_images_for_one_platform_are_refused() -> None:
    first = child(ARM64)
    second = Descriptor(mediatypes.OCI_MANIFEST, "sha256:" + "f" * 64, 10, Platform("linux", "arm64"))
    with pytest.raises(VerificationError) as caught:
        build_index([first, child(AMD64), second])
    assert "linux/arm64" in caught.value.message
    assert first.digest in caught.value.message
    assert second.digest in caught.value.message


def test_digest_and_size_are_of_the_exact_bytes() -> None:
    index = build_index([child(AMD64), child(ARM64)])
    assert index.digest == "sha256:" + hashlib.sha256(index.raw).hexdigest()
    assert index.size == len(index.raw)
    # Same input, same bytes: the digest is stable.
    assert build_index([child(AMD64), child(ARM64)]).raw == index.raw


def test_size_limit_is_four_mebibytes() -> None:
    children = [child(AMD64)]
    overhead = build_index(children, {"big": ""}).size
    fits = build_index(children, {"big": "x" * (MAX_INDEX_BYTES - overhead)})
    assert fits.size == MAX_INDEX_BYTES == 4 * 1024 * 1024
    with pytest.raises(VerificationError, match=str(MAX_INDEX_BYTES)):
        build_index(children, {"big": "x" * (MAX_INDEX_BYTES - overhead + 1)})


def test_descriptor_json_copies_annotations() -> None:
    descriptor = child(AMD64, a="1")
    entry = descriptor.to_json()
    assert entry["annotations"] == {"a": "1"}
    entry["annotations"]["a"] = "2"  # type: ignore[index]
    assert descriptor.annotations == {"a": "1"}


@_SETTINGS
@given(
    st.lists(st.sampled_from(KNOWN_PLATFORMS), min_size=1, unique=True),
    st.data(),
    st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3),
)
def test_any_index_is_valid_ordered_and_addressed_by_its_bytes(
    platforms: list[Platform], data: st.DataObject, annotations: dict[str, str]
) -> None:
    children = [
        child(platform, data.draw(st.sampled_from(sorted(mediatypes.MANIFEST_TYPES))))
        for platform in platforms
    ]
    index = build_index(children, annotations)
    document = parsed(index)
    assert [m["digest"] for m in document["manifests"]] == [c.digest for c in children]
    assert [m["platform"] for m in document["manifests"]] == [p.descriptor() for p in platforms]
    assert index.digest == "sha256:" + hashlib.sha256(index.raw).hexdigest()
    all_docker = all(c.media_type == mediatypes.DOCKER_MANIFEST for c in children)
    if all_docker and not annotations:
        assert index.media_type == document["mediaType"] == mediatypes.DOCKER_MANIFEST_LIST
    else:
        assert index.media_type == mediatypes.OCI_INDEX
        assert_valid_oci_index(document)
