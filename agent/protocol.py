"""The agent protocol: what the coordinator and an agent say to each other, and how it is framed.

One definition for both sides: the coordinator imports this module from the agent package, and
the agent depends on nothing but the standard library (it runs on a node's Python 3.9).

Framing, on the agent's stdin and stdout:

* The agent first writes ``MARKER`` on a line of its own. Everything before it is ignored, so a
  chatty login profile on a node cannot confuse the coordinator.
* Every message is one line of JSON: an object with a ``type`` field.
* A ``blob`` message is followed by exactly ``size`` raw bytes: file contents never go through
  JSON. So is a ``sync`` message: its bytes are the context's canonical manifest, the very bytes
  the context digest is the sha256 of, so the agent checks the digest without encoding anything.

The conversation:

    coordinator                          agent
    hello {version}                ->
                                   <-    hello {version, python, pid}
    facts {workdir}                ->
                                   <-    facts {...}
    sync {context, size} + bytes   ->    (the manifest)
                                   <-    need {digests}
    blob {digest, size} + bytes    ->    (one per needed digest)
                                   <-    synced {context}
    build {...}                    ->
    heartbeat                      ->    (every HEARTBEAT_INTERVAL; silence ends the build)
                                   <-    log {line}  (as the builder prints)
                                   <-    result {digest, size, media_type} | error {...}
    cancel                         ->    (or closing stdin: the build is killed either way)

Errors carry a ``kind`` saying whose fault they are: ``node`` (try another node), ``build`` (would
fail anywhere), ``input`` (the request itself is wrong) or ``registry``.
"""

from __future__ import annotations

import hashlib
import json
from typing import IO, Any

PROTOCOL_VERSION = 2
MARKER = b"--- farm agent protocol v%d ---" % PROTOCOL_VERSION
HEARTBEAT_INTERVAL = 5.0
HEARTBEAT_TIMEOUT = 20.0
MAX_LINE = 64 * 1024 * 1024

ERROR_KINDS = ("node", "build", "input", "registry")

# A context manifest entry: (path, mode, size, digest, link target).
# ``mode`` holds the file type bits too (stat.S_IFREG | 0o644 ...); ``digest`` is "" for
# anything but regular files; ``link`` is "" for anything but symlinks.
Entry = tuple[str, int, int, str, str]

Message = dict[str, Any]

__all__ = [
    "ERROR_KINDS",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TIMEOUT",
    "MARKER",
    "PROTOCOL_VERSION",
    "Entry",
    "Message",
    "ProtocolError",
    "canonical_manifest",
    "context_digest",
    "decode",
    "encode",
    "entries_from_json",
    "entries_from_manifest",
    "manifest_digest",
    "read_message",
    "read_payload",
]


class ProtocolError(Exception):
    """The peer broke the framing or sent something this side cannot understand."""


def encode(message_type: str, /, **fields: Any) -> bytes:
    """One message as the bytes of its line."""
    fields["type"] = message_type
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode(line: bytes) -> Message:
    """Parse one line into a message; the caller checks ``type``."""
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not a JSON message: {line[:200]!r}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(f"a message must be an object with a type: {line[:200]!r}")
    return message


def read_message(stream: IO[bytes]) -> Message | None:
    """Read the next message from a blocking stream, or None at end of stream.

    A blob's bytes are not read here: the caller reads exactly ``size`` bytes next.
    """
    line = stream.readline(MAX_LINE)
    if not line:
        return None
    if not line.endswith(b"\n"):
        raise ProtocolError(f"message line cut short or longer than {MAX_LINE} bytes")
    return decode(line)


def read_payload(stream: IO[bytes], size: Any) -> bytes:
    """The ``size`` raw bytes that follow a ``sync`` message."""
    if not isinstance(size, int) or not 0 <= size <= MAX_LINE:
        raise ProtocolError(f"a payload of {size!r} bytes")
    data = stream.read(size)
    if len(data) != size:
        raise ProtocolError(f"stream ended {len(data)} bytes into a {size}-byte payload")
    return data


def entries_from_manifest(manifest: bytes) -> list[Entry]:
    """A manifest's entries, validated: it comes from the other side of a wire, or from disk."""
    try:
        value = json.loads(manifest)
    except ValueError as exc:
        raise ProtocolError(f"a manifest that is not JSON: {exc}") from exc
    return entries_from_json(value)


def entries_from_json(value: Any) -> list[Entry]:
    """Validate a context's entries (they come from the other side of a wire)."""
    if not isinstance(value, list):
        raise ProtocolError("entries must be a list")
    entries: list[Entry] = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 5
            or not isinstance(item[0], str)
            or not isinstance(item[1], int)
            or not isinstance(item[2], int)
            or not isinstance(item[3], str)
            or not isinstance(item[4], str)
        ):
            raise ProtocolError(f"malformed context entry: {item!r}")
        entries.append((item[0], item[1], item[2], item[3], item[4]))
    return entries


def canonical_manifest(entries: list[Entry]) -> bytes:
    """A context's manifest as the bytes its digest names: entries sorted by path, compact JSON."""
    return json.dumps(sorted(entries), separators=(",", ":"), ensure_ascii=False).encode()


def manifest_digest(manifest: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def context_digest(entries: list[Entry]) -> str:
    """The digest naming a context: that of its canonical manifest."""
    return manifest_digest(canonical_manifest(entries))
