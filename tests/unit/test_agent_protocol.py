"""agent.protocol: one JSON object per line, validated context manifests, order-free context digests."""

from __future__ import annotations

import hashlib
import io
import json
import stat
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import (
    MARKER,
    MAX_LINE,
    PROTOCOL_VERSION,
    Entry,
    ProtocolError,
    canonical_manifest,
    context_digest,
    decode,
    encode,
    entries_from_json,
    entries_from_manifest,
    manifest_digest,
    read_message,
    read_payload,
)

_SETTINGS = settings(database=None, deadline=None, max_examples=60)

DIGEST = "sha256:" + "d" * 64


def test_marker_names_the_version() -> None:
    assert f"--- farm agent protocol v{PROTOCOL_VERSION} ---".encode() == MARKER
    assert b"\n" not in MARKER


def test_encode_is_one_compact_line_with_the_type() -> None:
    line = encode("need", digests=[DIGEST])
    assert line == b'{"digests":["' + DIGEST.encode() + b'"],"type":"need"}\n'
    assert line.count(b"\n") == 1


def test_encode_keeps_text_as_utf8_and_escapes_newlines() -> None:
    line = encode("log", line="héllo\nworld\u2028!")
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")
    assert "héllo".encode() in line
    assert decode(line) == {"type": "log", "line": "héllo\nworld\u2028!"}


def test_the_type_argument_wins_over_a_type_field() -> None:
    assert decode(encode("error", kind="node", message="m")) == {
        "type": "error",
        "kind": "node",
        "message": "m",
    }


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@_SETTINGS
@given(
    st.text(min_size=1, max_size=10),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), _JSON, max_size=4),
)
def test_decode_inverts_encode(message_type: str, fields: dict[str, Any]) -> None:
    line = encode(message_type, **fields)
    assert line.endswith(b"\n")
    assert b"\n" not in line[:-1]
    assert decode(line) == {**fields, "type": message_type}


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json\n",
        b"[1, 2]\n",
        b'"text"\n',
        b"{}\n",
        b'{"type": 1}\n',
        b'{"type": null}\n',
        b'{"type": "x"',
        b"\xff\xfe{}\n",
    ],
)
def test_decode_refuses_what_is_not_a_typed_object(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(line)


def test_read_message_reads_lines_then_stops() -> None:
    stream = io.BytesIO(encode("hello", version=1) + encode("blob", digest=DIGEST, size=3) + b"abc")
    assert read_message(stream) == {"type": "hello", "version": 1}
    assert read_message(stream) == {"type": "blob", "digest": DIGEST, "size": 3}
    assert stream.read(3) == b"abc"  # blob bytes are the caller's to read
    assert read_message(stream) is None


def test_read_message_refuses_a_cut_line() -> None:
    with pytest.raises(ProtocolError, match="cut short"):
        read_message(io.BytesIO(b'{"type": "hello"}'))


def test_max_line_is_generous() -> None:
    assert MAX_LINE >= 16 * 1024 * 1024


# --- context manifests -----------------------------------------------------------------------------


def test_entries_from_json_accepts_what_json_carries() -> None:
    value = json.loads(
        json.dumps([["a", stat.S_IFREG | 0o644, 3, DIGEST, ""], ["l", stat.S_IFLNK | 0o777, 0, "", "a"]])
    )
    assert entries_from_json(value) == [
        ("a", stat.S_IFREG | 0o644, 3, DIGEST, ""),
        ("l", stat.S_IFLNK | 0o777, 0, "", "a"),
    ]
    assert entries_from_json([]) == []


@pytest.mark.parametrize(
    "value",
    [
        None,
        {"a": 1},
        "a",
        [None],
        [["a", 1, 2, DIGEST]],
        [["a", 1, 2, DIGEST, "", "extra"]],
        [[1, 1, 2, DIGEST, ""]],
        [["a", "420", 2, DIGEST, ""]],
        [["a", 1.5, 2, DIGEST, ""]],
        [["a", 1, None, DIGEST, ""]],
        [["a", 1, 2, None, ""]],
        [["a", 1, 2, DIGEST, 0]],
        [("a", 1, 2, DIGEST, "")],  # only what JSON can carry: lists
    ],
)
def test_entries_from_json_refuses_malformed_entries(value: Any) -> None:
    with pytest.raises(ProtocolError):
        entries_from_json(value)


_ENTRIES = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=12),
        st.integers(0, 0o177777),
        st.integers(0, 2**40),
        st.text(max_size=8),
        st.text(max_size=8),
    ),
    max_size=8,
    unique_by=lambda entry: entry[0],
)


@_SETTINGS
@given(_ENTRIES, st.randoms(use_true_random=False))
def test_context_digest_ignores_entry_order(entries: list[Entry], rnd: Any) -> None:
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    assert context_digest(shuffled) == context_digest(entries)


@_SETTINGS
@given(_ENTRIES)
def test_context_digest_survives_the_wire(entries: list[Entry]) -> None:
    over_the_wire = entries_from_json(json.loads(encode("sync", entries=entries))["entries"])
    assert over_the_wire == entries
    assert context_digest(over_the_wire) == context_digest(entries)


def test_context_digest_is_sha256_of_the_sorted_compact_manifest() -> None:
    entries: list[Entry] = [("b", 0o100644, 1, DIGEST, ""), ("a", 0o40755, 0, "", "")]
    canonical = '[["a",16877,0,"",""],["b",33188,1,"' + DIGEST + '",""]]'
    assert context_digest(entries) == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    "change",
    [
        lambda e: (e[0] + "x", *e[1:]),
        lambda e: (e[0], e[1] | 0o111, *e[2:]),
        lambda e: (*e[:2], e[2] + 1, *e[3:]),
        lambda e: (*e[:3], "sha256:" + "e" * 64, e[4]),
        lambda e: (*e[:4], "target"),
    ],
)
def test_context_digest_covers_every_field(change: Any) -> None:
    entries: list[Entry] = [("a", 0o100644, 1, DIGEST, ""), ("b", 0o100644, 2, DIGEST, "")]
    assert context_digest([change(entries[0]), entries[1]]) != context_digest(entries)


# --- the manifest as a payload ---------------------------------------------------------------------


def test_a_sync_message_carries_its_manifest_as_raw_bytes() -> None:
    entries: list[Entry] = [("b", 0o100644, 1, DIGEST, ""), ("a", 0o40755, 0, "", "")]
    manifest = canonical_manifest(entries)
    stream = io.BytesIO(encode("sync", context=manifest_digest(manifest), size=len(manifest)) + manifest)
    message = read_message(stream)
    assert message is not None
    assert read_payload(stream, message["size"]) == manifest
    assert message["context"] == context_digest(entries)
    assert entries_from_manifest(manifest) == sorted(entries)
    assert read_message(stream) is None


@pytest.mark.parametrize("size", [-1, MAX_LINE + 1, "3", None, 1.0])
def test_read_payload_refuses_sizes_it_cannot_trust(size: Any) -> None:
    with pytest.raises(ProtocolError):
        read_payload(io.BytesIO(b"abc"), size)


def test_read_payload_refuses_a_stream_that_ends_early() -> None:
    with pytest.raises(ProtocolError, match="ended 2 bytes into a 3-byte payload"):
        read_payload(io.BytesIO(b"ab"), 3)


@pytest.mark.parametrize("manifest", [b"", b"[", b"\xff", b'{"a": 1}', b'[["a", 1, 2, 3, ""]]'])
def test_entries_from_manifest_refuses_what_is_not_a_manifest(manifest: bytes) -> None:
    with pytest.raises(ProtocolError):
        entries_from_manifest(manifest)


@_SETTINGS
@given(_ENTRIES)
def test_the_canonical_manifest_is_what_the_digest_names(entries: list[Entry]) -> None:
    manifest = canonical_manifest(entries)
    assert manifest_digest(manifest) == context_digest(entries)
    assert entries_from_manifest(manifest) == sorted(entries)
