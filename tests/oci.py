"""The OCI image-spec's own JSON schemas, as validators the tests share.

The schema files come from Debian's golang-github-opencontainers-image-spec-dev package
(``deploy/lab/setup.sh`` installs it), so documents are checked against the spec's text, not
against farm's idea of it.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from farm import mediatypes

__all__ = [
    "DESCRIPTOR_VALIDATOR",
    "INDEX_VALIDATOR",
    "MANIFEST_VALIDATOR",
    "assert_valid_oci_index",
    "assert_valid_oci_manifest",
]

SCHEMA_DIR = Path("/usr/share/gocode/src/github.com/opencontainers/image-spec/schema")
_SCHEMAS: dict[str, Any] = {path.name: json.loads(path.read_text()) for path in SCHEMA_DIR.glob("*.json")}


def _retrieve(uri: str) -> Resource[Any]:
    # The schemas' ids and $refs disagree on folders; image-spec's own validator maps by file name.
    return Resource.from_contents(_SCHEMAS[posixpath.basename(urlsplit(uri).path)], DRAFT4)


INDEX_VALIDATOR = jsonschema.Draft4Validator(
    _SCHEMAS["image-index-schema.json"], registry=Registry(retrieve=_retrieve)
)
MANIFEST_VALIDATOR = INDEX_VALIDATOR.evolve(schema=_SCHEMAS["image-manifest-schema.json"])
DESCRIPTOR_VALIDATOR = INDEX_VALIDATOR.evolve(schema={"$ref": "content-descriptor.json"})


def assert_valid_oci_index(document: dict[str, Any]) -> None:
    """``document`` is an OCI image index by the spec's schema, every descriptor included."""
    INDEX_VALIDATOR.validate(document)
    assert document["mediaType"] == mediatypes.OCI_INDEX
    for manifest in document["manifests"]:
        DESCRIPTOR_VALIDATOR.validate(manifest)


def assert_valid_oci_manifest(document: dict[str, Any]) -> None:
    """``document`` is an OCI image manifest by the spec's schema."""
    MANIFEST_VALIDATOR.validate(document)
    assert document["mediaType"] == mediatypes.OCI_MANIFEST
    for descriptor in [document["config"], *document["layers"]]:
        DESCRIPTOR_VALIDATOR.validate(descriptor)
