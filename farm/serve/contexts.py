"""Contexts on the server: received incrementally from clients, laid out as folders for builds.

The protocol is the agent's (``farm.session.AgentSession.sync``) over HTTP:

    client ── POST /api/contexts/sync {context, entries} ─────────► server checks the entries and
           ◄─ {"missing": [digests]} ──────────────────────────────  keeps the manifest
    client ── POST /api/contexts/{digest}/blobs: frames ──────────► each blob hashed on arrival;
           ◄─ {"received": n, "bytes": b, "complete": true} ──────   a wrong one refuses the upload

A frame is a blob header line (``agent.protocol.encode("blob", digest=…, size=…)``) and then
exactly ``size`` bytes. Only blobs the manifest names, of the size it names, are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from agent import protocol
from agent.protocol import Entry, entries_from_json
from agent.store import MANIFEST_MAX_AGE, ContentStore, UnsafeEntryError, check_entries
from farm.errors import InputError

__all__ = ["ByteStream", "ContextStore"]

_CHUNK = 1024 * 1024
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ByteStream(Protocol):
    """What the blob upload is read from (aiohttp's ``StreamReader`` is one)."""

    async def readline(self) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...


class ContextStore:
    """The server's contexts: manifests and blobs in a ``ContentStore``, layouts for builds."""

    def __init__(self, store: ContentStore, layouts: Path, keep_layouts: int = 16) -> None:
        self.store = store
        self._layouts = layouts
        self._incoming = Path(store.root) / "incoming"
        self._keep_layouts = keep_layouts
        self._in_use: dict[str, int] = {}
        self._laying_out: dict[str, asyncio.Lock] = {}
        self._tidied = False

    def accept_manifest(self, digest: Any, entries: Any) -> tuple[list[str], int, int]:
        """Check and keep a manifest; return the blobs the store lacks, their size, and the size of all."""
        try:
            checked = entries_from_json(entries)
            check_entries(checked)
        except (protocol.ProtocolError, UnsafeEntryError) as exc:
            raise InputError(f"refused the context manifest: {exc}") from exc
        try:
            self.store.save_context(str(digest), checked)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        sizes = _blob_sizes(checked)
        missing = self.store.missing(sizes)
        return missing, sum(sizes[d] for d in missing), sum(sizes.values())

    def manifest(self, digest: str) -> list[Entry]:
        try:
            return self.store.load_context(_checked(digest))
        except (OSError, ValueError, protocol.ProtocolError):
            raise InputError(
                f"the server has no manifest for context {digest}", hint="sync the context first"
            ) from None

    def has_context(self, digest: str) -> bool:
        try:
            return self.store.has_context(_checked(digest))
        except (OSError, ValueError, protocol.ProtocolError, InputError):
            return False

    def blob_sizes(self, digest: str) -> dict[str, int]:
        return _blob_sizes(self.manifest(digest))

    async def receive(self, digest: str, stream: ByteStream) -> tuple[int, int]:
        """Store the blobs framed in ``stream`` for context ``digest``; return (blobs, bytes)."""
        sizes = self.blob_sizes(digest)
        count = total = 0
        while True:
            line = await stream.readline()
            if not line:
                return count, total
            try:
                header = protocol.decode(line)
            except protocol.ProtocolError as exc:
                raise InputError(f"bad blob frame: {exc}") from exc
            blob, size = header.get("digest"), header.get("size")
            if header.get("type") != "blob" or not isinstance(blob, str) or not isinstance(size, int):
                raise InputError("bad blob frame: expected a blob header with a digest and a size")
            if sizes.get(blob) != size:
                raise InputError(f"blob {blob} ({size} bytes) is not in context {digest}")
            await self._receive_blob(blob, size, stream)
            count += 1
            total += size

    async def _receive_blob(self, digest: str, size: int, stream: ByteStream) -> None:
        target = self.store.blob_path(digest)
        partial = self._incoming / f"{uuid.uuid4().hex}.partial"
        hasher = hashlib.sha256()
        try:
            with partial.open("wb") as out:
                remaining = size
                while remaining:
                    try:
                        chunk = await stream.readexactly(min(_CHUNK, remaining))
                    except asyncio.IncompleteReadError as exc:
                        raise InputError(f"the upload ended inside blob {digest}") from exc
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
    async def laid_out(self, digest: str) -> AsyncIterator[Path]:
        """The context as a folder (shared by the builds of one context), kept while in use."""
        folder = self._layouts / _checked(digest).replace(":", "-")
        # In use from now on, before any await: ``prune`` never takes a folder a build is about to use.
        self._in_use[digest] = self._in_use.get(digest, 0) + 1
        try:
            async with self._laying_out.setdefault(digest, asyncio.Lock()):
                if not folder.is_dir():
                    entries = self.manifest(digest)
                    partial = self._layouts / f".partial-{uuid.uuid4().hex}"
                    try:
                        await asyncio.to_thread(self.store.lay_out, entries, str(partial))
                        os.rename(partial, folder)
                    finally:
                        if partial.exists():
                            await asyncio.to_thread(_remove, partial)
                os.utime(folder)
            yield folder
        finally:
            self._in_use[digest] -= 1
            if not self._in_use[digest]:
                del self._in_use[digest]
                self._laying_out.pop(digest, None)

    async def prune(self, keep_contexts: set[str], store_limit: int) -> None:
        """Remove layouts beyond the newest few and shrink the store, keeping contexts in use.

        A layout is renamed out of the way (at once, on the event loop) before it is removed in a
        worker thread, so a build starting meanwhile lays its context out afresh.
        """
        folders = sorted(
            (p for p in self._layouts.iterdir() if not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        doomed = [p for p in self._layouts.iterdir() if p.name.startswith((".partial-", ".trash-"))]
        if self._tidied:
            doomed = []  # those of a crashed run only; later ones belong to layouts under way
        self._tidied = True
        busy = {d.replace(":", "-") for d in keep_contexts | set(self._in_use)}
        for folder in folders[self._keep_layouts :]:
            if folder.name not in busy:
                trash = self._layouts / f".trash-{uuid.uuid4().hex}"
                os.rename(folder, trash)
                doomed.append(trash)
        for path in doomed:
            await asyncio.to_thread(_remove, path)
        keep_blobs: list[str] = []
        for digest in keep_contexts | set(self._in_use):
            with contextlib.suppress(InputError):
                keep_blobs += self.blob_sizes(digest)
        await asyncio.to_thread(self.store.evict, store_limit, keep_blobs)
        in_use = keep_contexts | set(self._in_use)
        await asyncio.to_thread(self.store.drop_stale_manifests, MANIFEST_MAX_AGE, in_use)


def _checked(digest: str) -> str:
    """A context digest as it may be used in a file name: sha256 and 64 hex digits, nothing else."""
    if not _DIGEST.fullmatch(digest):
        raise InputError(f"not a context digest: {digest!r}")
    return digest


def _blob_sizes(entries: list[Entry]) -> dict[str, int]:
    return {entry[3]: entry[2] for entry in entries if entry[3]}


def _remove(path: Path) -> None:
    """Remove a laid-out context, read-only folders included (links are never followed)."""
    path.chmod(0o700)
    for folder, children, _ in os.walk(path):
        for child in children:
            inner = os.path.join(folder, child)
            if not os.path.islink(inner):
                os.chmod(inner, 0o700)
    shutil.rmtree(path)
