"""Whose fault the agent says a failed build request is: the request's (``input``: the coordinator
sent something wrong) or the node's (``node``: another node may do it), its own bugs included."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

from agent.main import Agent
from agent.protocol import MARKER, Entry, Message, canonical_manifest, decode, encode, manifest_digest

FILE = b"hello\n"
ENTRIES: list[Entry] = [
    ("hello", stat.S_IFREG | 0o644, len(FILE), "sha256:" + hashlib.sha256(FILE).hexdigest(), "")
]
MANIFEST = canonical_manifest(ENTRIES)
CONTEXT = manifest_digest(MANIFEST)


def sync() -> bytes:
    return b"".join(
        [
            encode("sync", context=CONTEXT, size=len(MANIFEST)),
            MANIFEST,
            encode("blob", digest=ENTRIES[0][3], size=len(FILE)),
            FILE,
        ]
    )


def build(**fields: object) -> bytes:
    request: dict[str, object] = {
        "build_id": "b1",
        "context": CONTEXT,
        "platform": "linux/amd64",
        "dockerfile": "FROM scratch\nCOPY hello /\n",
        "builder": "buildah",
        "push": {"registry_url": "http://127.0.0.1:9", "repository": "x/y"},
    }
    request.update(fields)
    return encode("build", **{key: value for key, value in request.items() if value is not None})


def errors(workdir: Path, stdin: bytes) -> list[Message]:
    out = io.BytesIO()
    Agent(str(workdir), io.BytesIO(stdin), out).serve()
    marker, *lines = out.getvalue().splitlines()
    assert marker == MARKER
    return [message for message in map(decode, lines) if message["type"] == "error"]


def test_a_request_lacking_a_field_is_an_input_error_naming_it(tmp_path: Path) -> None:
    [error] = errors(tmp_path, sync() + build(builder=None))
    assert error["kind"] == "input"
    assert error["message"] == "malformed build request: KeyError: 'builder'"


def test_a_request_with_a_malformed_field_is_an_input_error(tmp_path: Path) -> None:
    [error] = errors(tmp_path, sync() + build(slots="many"))
    assert error["kind"] == "input"
    assert error["message"].startswith("malformed build request: ValueError: invalid literal for int()")
    [error] = errors(tmp_path, build(network="wide"))  # refused before the context is looked up
    assert (error["kind"], error["message"]) == (
        "input",
        "malformed build request: ValueError: unknown network 'wide'",
    )


def test_a_context_not_synced_is_an_input_error(tmp_path: Path) -> None:
    [error] = errors(tmp_path, build())
    assert (error["kind"], error["message"]) == ("input", f"context {CONTEXT} was not synced to this node")


def test_the_agents_own_value_error_is_no_input_error(tmp_path: Path) -> None:
    """Its own fault on a sound request (here, a manifest damaged in its store) is the node's: the
    build may go to another node, and the user is not told their input is wrong."""
    errors(tmp_path, sync())
    kept = tmp_path / "contexts" / (CONTEXT.replace(":", "-") + ".json")
    os.chmod(kept, 0o600)
    kept.write_bytes(MANIFEST + b" ")
    [error] = errors(tmp_path, build())
    assert error["kind"] == "node"
    assert error["message"].startswith("agent bug: ValueError(")
    assert "is damaged" in error["message"]
