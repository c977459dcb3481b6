"""The agent's side of a sync, driven through its streams: what it asks for, keeps and evicts."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import pytest

from agent.main import Agent
from agent.protocol import MARKER, Entry, Message, canonical_manifest, decode, encode, manifest_digest
from agent.store import ContentStore


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def context_of(files: dict[str, bytes]) -> list[Entry]:
    entries: list[Entry] = [("src", stat.S_IFDIR | 0o755, 0, "", "")]
    entries += [
        (f"src/{name}", stat.S_IFREG | 0o644, len(data), digest_of(data), "") for name, data in files.items()
    ]
    return entries


def sync_request(files: dict[str, bytes], sent: list[str], **fields: object) -> bytes:
    """A sync of ``files`` and the blobs of ``sent``, in the order the agent will ask for them."""
    manifest = canonical_manifest(context_of(files))
    frames = [encode("sync", context=manifest_digest(manifest), size=len(manifest), **fields), manifest]
    for name in sent:
        frames += [encode("blob", digest=digest_of(files[name]), size=len(files[name])), files[name]]
    return b"".join(frames)


def run_agent(workdir: Path, stdin: bytes, **options: int) -> list[Message]:
    out = io.BytesIO()
    Agent(str(workdir), io.BytesIO(stdin), out, **options).serve()
    marker, *lines = out.getvalue().splitlines()
    assert marker == MARKER
    return [decode(line) for line in lines]


def lease_files(workdir: Path) -> list[str]:
    return [name for name in os.listdir(workdir / "leases") if not name.startswith(".")]


FILES = {"a": b"a" * 100, "b": b"b" * 200, "c": b"c" * 300}


def test_a_sync_asks_for_what_the_store_lacks_and_keeps_the_context(tmp_path: Path) -> None:
    first = run_agent(tmp_path, sync_request(FILES, ["a", "b", "c"]))
    assert [m["type"] for m in first] == ["need", "synced"]
    assert first[0]["digests"] == [digest_of(FILES[n]) for n in "abc"]
    changed = {**FILES, "b": b"B" * 200}
    second = run_agent(tmp_path, sync_request(changed, ["b"]))
    assert second[0]["digests"] == [digest_of(changed["b"])]
    store = ContentStore(str(tmp_path))
    assert store.has_context(second[1]["context"])
    assert store.load_context(second[1]["context"]) == context_of(changed)
    assert lease_files(tmp_path) == []  # the session's leases ended with it


def test_eviction_after_a_sync_never_takes_the_synced_contexts_blobs(tmp_path: Path) -> None:
    run_agent(tmp_path, sync_request(FILES, ["a", "b", "c"]))
    changed = {**FILES, "b": b"B" * 200}
    # A limit no context fits: everything but what this sync leased goes.
    reply = run_agent(tmp_path, sync_request(changed, ["b"]), store_limit=1)
    store = ContentStore(str(tmp_path))
    assert store.has_context(reply[1]["context"])
    assert store.missing([digest_of(FILES["b"])]) == [digest_of(FILES["b"])]


def test_a_sync_that_adds_nothing_evicts_nothing(tmp_path: Path) -> None:
    run_agent(tmp_path, sync_request(FILES, ["a", "b", "c"]))
    run_agent(tmp_path, sync_request({"a": FILES["a"]}, []), store_limit=1)
    assert ContentStore(str(tmp_path)).missing(digest_of(data) for data in FILES.values()) == []


def test_a_sync_cut_short_leaves_no_manifest(tmp_path: Path) -> None:
    request = sync_request(FILES, ["a", "b", "c"])
    with pytest.raises(EOFError):
        run_agent(tmp_path, request[:-10])
    store = ContentStore(str(tmp_path))
    digest = manifest_digest(canonical_manifest(context_of(FILES)))
    assert not os.path.exists(tmp_path / "contexts" / (digest.replace(":", "-") + ".json"))
    assert not store.has_context(digest)
    assert store.missing([digest_of(FILES["a"]), digest_of(FILES["c"])]) == [digest_of(FILES["c"])]


def test_a_manifest_that_is_not_what_its_digest_names_is_refused(tmp_path: Path) -> None:
    manifest = canonical_manifest(context_of(FILES))
    other = manifest_digest(canonical_manifest(context_of({"a": FILES["a"]})))
    reply = run_agent(tmp_path, encode("sync", context=other, size=len(manifest)) + manifest)
    assert reply == [
        {"type": "error", "kind": "input", "message": f"context {other!r} does not match its manifest"}
    ]
    assert lease_files(tmp_path) == []  # refused before it touched the store
    assert os.listdir(tmp_path / "cas" / "sha256") == []


def test_a_hostile_manifest_is_refused_before_the_store_is_touched(tmp_path: Path) -> None:
    manifest = canonical_manifest([("../escape", stat.S_IFREG | 0o644, 1, digest_of(b"x"), "")])
    reply = run_agent(
        tmp_path, encode("sync", context=manifest_digest(manifest), size=len(manifest)) + manifest
    )
    assert [(m["type"], m["kind"]) for m in reply] == [("error", "input")]
    assert "'..'" in reply[0]["message"]
    assert lease_files(tmp_path) == []
    assert os.listdir(tmp_path / "cas" / "sha256") == []
