"""Contexts on the server: received incrementally from clients, built from where they are kept.

The protocol is the agent's (``farm.session.AgentSession.sync``) over HTTP:

    client ── POST /api/contexts/sync {context, entries} ─────────► server checks the entries and
           ◄─ {"missing": [digests]} ──────────────────────────────  keeps the manifest
    client ── POST /api/contexts/{digest}/blobs: frames ──────────► each blob hashed on arrival;
           ◄─ {"received": n, "bytes": b, "complete": true} ──────   a wrong one refuses the upload

A frame is a blob header line (``agent.protocol.encode("blob", digest=…, size=…)``) and then
exactly ``size`` bytes. Only blobs the manifest names, of the size it names, are accepted.

Everything a client sends is checked before anything is kept, and bounded: a manifest is parsed
entry by entry as it is checked (``parse_sync_request``), so a hostile body is refused at its first
malformed entry and costs no more memory than itself; at most ``MAX_ENTRIES`` entries, paths of at
most ``MAX_PATH`` bytes (``MAX_NAME`` per component), sizes from 0 to the store's limit. Blobs
count against that limit as they arrive, with or without a build: the least recently used ones
not needed by a queued, running or arriving context make room, else the upload is refused.

A build takes its context as ``farm.context.Context`` (``ContextStore.context``): the manifest as
the client sent it, each blob read from the store where it lies. Nothing is copied or laid out on
the server; the nodes lay it out, as for a local build.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from agent import protocol
from agent.protocol import Entry, canonical_manifest
from agent.store import MANIFEST_MAX_AGE, ContentStore, UnsafeEntryError, check_entries
from farm.context import Context
from farm.errors import InputError, ServerError

__all__ = [
    "MAX_ENTRIES",
    "MAX_NAME",
    "MAX_PATH",
    "ByteStream",
    "ContextStore",
    "check_digest",
    "parse_sync_request",
]

MAX_ENTRIES = 500_000  # files, folders and links in one context
MAX_PATH = 4096  # bytes of an entry's path or link target (Linux's PATH_MAX)
MAX_NAME = 255  # bytes of one component of a path (NAME_MAX)
_MAX_MODE = 0o177777  # file type and permission bits: st_mode fits in 16 bits
_MAX_HEADER = 4096  # bytes of a blob frame's header line
_CHUNK = 1024 * 1024
_LOW_WATER = 0.9  # making room for a blob evicts down to this share of the limit: not once per blob
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ByteStream(Protocol):
    """What the blob upload is read from (aiohttp's ``StreamReader`` is one)."""

    async def readline(self) -> bytes: ...

    async def read(self, n: int) -> bytes: ...


class ContextStore:
    """The server's contexts: manifests and blobs in a ``ContentStore``.

    ``store_limit`` bounds the blobs kept (bytes); ``needed`` names the contexts that queued and
    running builds need, whose blobs are never evicted.
    """

    def __init__(
        self,
        store: ContentStore,
        store_limit: int = 10 * 1024**3,
        needed: Callable[[], set[str]] = set,
        read_timeout: float = 60.0,
    ) -> None:
        self.store = store
        self.store_limit = store_limit
        self._incoming = Path(store.root) / "incoming"
        self._blobs = Path(store.root) / "cas" / "sha256"  # ``ContentStore``'s layout
        self._needed = needed
        self._read_timeout = read_timeout
        self._in_use: dict[str, int] = {}
        self._stored: int | None = None  # bytes of blobs in the store; None: to be measured
        self._making_room = asyncio.Lock()

    def accept_sync(self, body: bytes | bytearray) -> tuple[list[str], int, int]:
        """Check and keep the manifest a sync request carries; return the blobs the store lacks, their
        size, and the size of all. Nothing is kept unless all of it is right."""
        digest, entries = parse_sync_request(body)
        sizes = _check_manifest(entries, self.store_limit)
        try:
            check_entries(entries)
        except UnsafeEntryError as exc:
            raise InputError(f"refused the context manifest: {exc}") from exc
        try:
            self.store.save_context(digest, entries)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        missing = self.store.missing(sizes)
        return missing, sum(sizes[d] for d in missing), sum(sizes.values())

    def manifest(self, digest: str) -> list[Entry]:
        try:
            return self.store.load_context(check_digest(digest))
        except (OSError, ValueError, protocol.ProtocolError):
            raise InputError(
                f"the server has no manifest for context {digest}", hint="sync the context first"
            ) from None

    def has_context(self, digest: str) -> bool:
        try:
            return self.store.has_context(check_digest(digest))
        except (OSError, ValueError, protocol.ProtocolError, InputError):
            return False

    def blob_sizes(self, digest: str) -> dict[str, int]:
        return _blob_sizes(self.manifest(digest))

    async def receive(self, digest: str, stream: ByteStream) -> tuple[int, int]:
        """Store the blobs framed in ``stream`` for context ``digest``; return (blobs, bytes)."""
        sizes = await asyncio.to_thread(self.blob_sizes, digest)
        count = total = 0
        # Its blobs are in use while they arrive: making room for one never evicts another.
        self._in_use[digest] = self._in_use.get(digest, 0) + 1
        try:
            while True:
                line = await self._read_header(stream)
                if not line:
                    return count, total
                blob, size = _frame_header(line)
                if sizes.get(blob) != size:
                    raise InputError(f"blob {blob} ({size} bytes) is not in context {digest}")
                await self._make_room(size)
                await self._receive_blob(blob, size, stream)
                count += 1
                total += size
        finally:
            self._release(digest)

    async def _read_header(self, stream: ByteStream) -> bytes:
        try:
            async with asyncio.timeout(self._read_timeout):
                line = await stream.readline()
        except TimeoutError:
            raise InputError(f"the upload stalled: nothing came for {self._read_timeout:.0f} s") from None
        except ConnectionError:
            raise InputError("the client went away during the upload") from None
        except ValueError:  # aiohttp: a line longer than its buffer
            raise InputError("bad blob frame: its header line is too long") from None
        if len(line) > _MAX_HEADER:
            raise InputError(f"bad blob frame: its header line is longer than {_MAX_HEADER} bytes")
        return line

    async def _make_room(self, size: int) -> None:
        """Keep the store under its limit with this blob in it: evict, or refuse the blob."""
        async with self._making_room:
            if self._stored is not None and self._stored + size <= self.store_limit:
                self._stored += size
                return
            keep: list[str] = []
            for context in self._needed() | set(self._in_use):
                with contextlib.suppress(InputError):
                    keep += await asyncio.to_thread(self.blob_sizes, context)
            room = max(0, int(self.store_limit * _LOW_WATER) - size)
            await asyncio.to_thread(self.store.evict, room, keep)
            self._stored = await asyncio.to_thread(self._measure)
            if self._stored + size > self.store_limit:
                raise ServerError(
                    f"the server's context store is full: {self._stored} of its {self.store_limit} bytes"
                    f" hold contexts of queued, running or arriving builds, and a blob of {size} bytes"
                    " does not fit",
                    status=507,
                    hint="try again once the queue has moved on",
                )
            self._stored += size

    def _measure(self) -> int:
        total = 0
        with os.scandir(self._blobs) as entries:
            for entry in entries:
                if not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    def _release(self, digest: str) -> None:
        self._in_use[digest] -= 1
        if not self._in_use[digest]:
            del self._in_use[digest]

    async def _receive_blob(self, digest: str, size: int, stream: ByteStream) -> None:
        target = self.store.blob_path(digest)
        partial = self._incoming / f"{uuid.uuid4().hex}.partial"
        hasher = hashlib.sha256()
        try:
            with partial.open("wb") as out:
                remaining = size
                while remaining > 0:
                    try:
                        async with asyncio.timeout(self._read_timeout):
                            chunk = await stream.read(min(_CHUNK, remaining))
                    except TimeoutError:
                        raise InputError(
                            f"the upload stalled inside blob {digest}: nothing came for"
                            f" {self._read_timeout:.0f} s"
                        ) from None
                    except ConnectionError:
                        raise InputError(f"the client went away inside blob {digest}") from None
                    if not chunk:
                        raise InputError(f"the upload ended inside blob {digest}")
                    chunk = chunk[:remaining]
                    hasher.update(chunk)
                    out.write(chunk)
                    remaining -= len(chunk)
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise InputError(f"blob announced as {digest} hashes to {actual}")
            partial.chmod(0o444)
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()

    @contextlib.asynccontextmanager
    async def context(self, digest: str) -> AsyncIterator[Context]:
        """The context as a build takes it, its blobs read where the store keeps them; none of them
        is evicted while the block runs."""
        # In use from now on, before any await: ``prune`` never evicts what a build is about to read.
        self._in_use[digest] = self._in_use.get(digest, 0) + 1
        try:
            entries = await asyncio.to_thread(self.manifest, digest)
            blobs = {entry[3]: self.store.blob_path(entry[3]) for entry in entries if entry[3]}
            yield Context(
                root=Path(self.store.root),
                entries=tuple(entries),
                blobs=blobs,
                manifest=canonical_manifest(entries),
            )
        finally:
            self._release(digest)

    async def prune(self, keep_contexts: set[str], store_limit: int) -> None:
        """Shrink the store to ``store_limit``, keeping the contexts in use or in ``keep_contexts``."""
        keep_blobs: list[str] = []
        for digest in keep_contexts | set(self._in_use):
            with contextlib.suppress(InputError):
                keep_blobs += self.blob_sizes(digest)
        async with self._making_room:
            await asyncio.to_thread(self.store.evict, store_limit, keep_blobs)
            self._stored = None  # measured again when a blob next arrives
        in_use = keep_contexts | set(self._in_use)
        await asyncio.to_thread(self.store.drop_stale_manifests, MANIFEST_MAX_AGE, in_use)


def check_digest(digest: str) -> str:
    """A context digest as it may be used in a file name: sha256 and 64 hex digits, nothing else."""
    if not _DIGEST.fullmatch(digest):
        raise InputError(f"not a context digest: {_excerpt(digest)}")
    return digest


# --- the sync request, parsed as it is checked ------------------------------------------------------
#
# {"context": "sha256:…", "entries": [[path, mode, size, digest, link], …]}, members in any order,
# nothing else. Each entry is matched by one regular expression, its strings and numbers taken
# from the match: a body of a million empty lists is refused at the first, before it costs any
# memory beyond its own bytes, and a valid one costs what its entries do.

_WS = r"[ \t\n\r]*"
_STRING = r'"([^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*)"'
_INT = r"(-?(?:0|[1-9][0-9]{0,19}))"  # 20 digits at most: bounded before int() sees it
_OPEN = re.compile(_WS + r"\{" + _WS)
_KEY = re.compile(_STRING + _WS + ":" + _WS)
_SEPARATOR = re.compile(_WS + r"([,}])" + _WS)
_STRING_VALUE = re.compile(_STRING)
_ARRAY_START = re.compile(r"\[" + _WS + r"(\]?)")
_ENTRY = re.compile(
    r"\[" + _WS + _STRING + _WS + "," + _WS + _INT + _WS + "," + _WS + _INT + _WS + ","
    + _WS + _STRING + _WS + "," + _WS + _STRING + _WS + r"\]" + _WS + r"([,\]])" + _WS
)  # fmt: skip
_END = re.compile(_WS + r"\Z")


def parse_sync_request(body: bytes | bytearray, max_entries: int = MAX_ENTRIES) -> tuple[str, list[Entry]]:
    """The context digest and the entries of a sync request's body; ``InputError`` at the first fault."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the sync request is not UTF-8: {exc.reason} at byte {exc.start}") from None
    digest: str | None = None
    entries: list[Entry] | None = None
    match = _OPEN.match(text)
    if match is None:
        raise InputError("the sync request must be a JSON object {context, entries}")
    pos = match.end()
    while True:
        key = _KEY.match(text, pos)
        if key is None:
            raise _malformed(text, pos, "a member of the sync request")
        name = _unescape(key[1])
        pos = key.end()
        if name == "context" and digest is None:
            value = _STRING_VALUE.match(text, pos)
            if value is None:
                raise InputError("the context of a sync request must be its digest, a string")
            digest = check_digest(_unescape(value[1]))
            pos = value.end()
        elif name == "entries" and entries is None:
            entries, pos = _parse_entries(text, pos, max_entries)
        else:
            raise InputError(f"unexpected member {_excerpt(name)} in the sync request (or one given twice)")
        after = _SEPARATOR.match(text, pos)
        if after is None:
            raise _malformed(text, pos, "a ',' or '}' in the sync request")
        pos = after.end()
        if after[1] == "}":
            break
    if _END.match(text, pos) is None:
        raise _malformed(text, pos, "the end of the sync request")
    if digest is None:
        raise InputError("the sync request lacks the context's digest")
    if entries is None:
        raise InputError("the sync request lacks the context's entries")
    return digest, entries


def _parse_entries(text: str, pos: int, max_entries: int) -> tuple[list[Entry], int]:
    start = _ARRAY_START.match(text, pos)
    if start is None:
        raise _malformed(text, pos, "the list of entries")
    entries: list[Entry] = []
    pos = start.end()
    if start[1]:
        return entries, pos
    while True:
        match = _ENTRY.match(text, pos)
        if match is None:
            raise _malformed(text, pos, f"context entry #{len(entries) + 1} [path, mode, size, digest, link]")
        if len(entries) == max_entries:
            raise InputError(f"a context has at most {max_entries} entries (files, folders and links)")
        path, mode, size, digest, link, end = match.groups()
        entries.append((_unescape(path), int(mode), int(size), _unescape(digest), _unescape(link)))
        pos = match.end()
        if end == "]":
            return entries, pos


def _unescape(raw: str) -> str:
    """A JSON string's value from its matched content (escapes are rare in paths)."""
    return json.loads(f'"{raw}"') if "\\" in raw else raw


def _malformed(text: str, pos: int, expected: str) -> InputError:
    return InputError(
        f"malformed sync request: expected {expected} at character {pos}: {_excerpt(text[pos : pos + 60])}"
    )


def _excerpt(text: str, limit: int = 60) -> str:
    """Client text quoted in a one-line message: short, and with its control characters escaped."""
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def _check_manifest(entries: list[Entry], store_limit: int) -> dict[str, int]:
    """Check what ``agent.store.check_entries`` leaves to its callers; return each blob's size."""
    sizes: dict[str, int] = {}
    for path, mode, size, digest, link in entries:
        where = f"context entry {_excerpt(path)}"
        try:
            encoded = path.encode()
            link_bytes = len(link.encode())
        except UnicodeEncodeError:
            raise InputError(f"{where}: its path or link is not valid Unicode") from None
        if len(encoded) > MAX_PATH or link_bytes > MAX_PATH:
            raise InputError(f"{where}: a path or link longer than {MAX_PATH} bytes")
        if any(len(part) > MAX_NAME for part in encoded.split(b"/")):
            raise InputError(f"{where}: a path component longer than {MAX_NAME} bytes")
        if not 0 <= mode <= _MAX_MODE:
            raise InputError(f"{where}: mode {mode} is not a file mode")
        if stat.S_ISREG(mode):
            if not _DIGEST.fullmatch(digest) or link:
                raise InputError(f"{where}: a file needs a sha256 digest and no link target")
            if not 0 <= size <= store_limit:
                raise InputError(
                    f"{where}: size {size} is not between 0 and the server's store limit, {store_limit} bytes"
                )
            if sizes.setdefault(digest, size) != size:
                raise InputError(f"{where}: blob {digest} is given two sizes")
        elif size or digest:
            raise InputError(f"{where}: only files have a size and a digest")
        elif link and not stat.S_ISLNK(mode):
            raise InputError(f"{where}: only links have a target")
    total = sum(sizes.values())
    if total > store_limit:
        raise InputError(
            f"the context's files add up to {total} bytes, more than the server's store holds: {store_limit}",
            hint="leave large files out of the context (.dockerignore)",
        )
    return sizes


def _frame_header(line: bytes) -> tuple[str, int]:
    """The digest and size a blob frame's header announces."""
    try:
        header = protocol.decode(line)
    except protocol.ProtocolError as exc:
        raise InputError(f"bad blob frame: {exc}") from exc
    blob, size = header.get("digest"), header.get("size")
    if (
        header.get("type") != "blob"
        or not isinstance(blob, str)
        or not _DIGEST.fullmatch(blob)
        or not isinstance(size, int)
        or isinstance(size, bool)
        or size < 0
    ):
        raise InputError(
            "bad blob frame: expected a blob header with a sha256 digest and a size of 0 or more"
        )
    return blob, size


def _blob_sizes(entries: list[Entry]) -> dict[str, int]:
    return {entry[3]: entry[2] for entry in entries if entry[3]}
