"""The node's content store and the build contexts laid out from it.

Files arrive by sha256 and are kept under ``WORKDIR/cas``; a context manifest names them by path.
Every entry is checked before anything touches the disk: a hostile or broken coordinator must
not be able to write outside the build folder, plant device files or links that escape.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from typing import IO

from agent.protocol import Entry, entries_from_json

__all__ = ["ContentStore", "UnsafeEntryError", "check_entries"]

_CHUNK = 1024 * 1024
DEFAULT_LIMIT = 4 * 1024**3


class UnsafeEntryError(ValueError):
    """A context entry that would escape the context or is not a plain file, folder or link."""


class ContentStore:
    """A sha256-addressed file store in a folder, safe for concurrent agents on one node."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._blobs = os.path.join(root, "cas", "sha256")
        self._contexts = os.path.join(root, "contexts")
        os.makedirs(self._blobs, exist_ok=True)
        os.makedirs(self._contexts, exist_ok=True)
        self._partials = itertools.count()

    def blob_path(self, digest: str) -> str:
        algorithm, _, encoded = digest.partition(":")
        if algorithm != "sha256" or len(encoded) != 64 or not _is_hex(encoded):
            raise UnsafeEntryError(f"not a sha256 digest: {digest!r}")
        return os.path.join(self._blobs, encoded)

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests the store lacks, each once, in the order first asked."""
        seen: set[str] = set()
        lacking: list[str] = []
        for digest in digests:
            if digest not in seen:
                seen.add(digest)
                if not os.path.exists(self.blob_path(digest)):
                    lacking.append(digest)
        return lacking

    def touch(self, digests: Iterable[str]) -> None:
        """Mark blobs as just used, so that eviction keeps them longest."""
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.blob_path(digest))

    def evict(self, limit: int, keep: Iterable[str] = ()) -> int:
        """Delete least recently used blobs until the store holds at most ``limit`` bytes.

        Blobs in ``keep`` (the context in use) stay whatever their age; returns bytes freed.
        """
        kept = {self.blob_path(digest) for digest in keep}
        blobs = []
        total = 0
        with os.scandir(self._blobs) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                info = entry.stat()
                total += info.st_size
                if entry.path not in kept:
                    blobs.append((info.st_mtime_ns, info.st_size, entry.path))
        freed = 0
        for _, size, path in sorted(blobs):
            if total - freed <= limit:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            freed += size
        return freed

    def receive(self, digest: str, size: int, stream: IO[bytes]) -> None:
        """Copy ``size`` bytes from ``stream`` into the store, refusing them if the hash differs."""
        target = self.blob_path(digest)
        hasher = hashlib.sha256()
        partial = os.path.join(self._blobs, f".partial-{os.getpid()}-{next(self._partials)}")
        # Few system calls per blob: contexts are often thousands of small files.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            remaining = size
            while remaining:
                chunk = stream.read(min(_CHUNK, remaining))
                if not chunk:
                    raise EOFError(f"stream ended {size - remaining} bytes into a {size}-byte blob")
                hasher.update(chunk)
                os.write(fd, chunk)
                remaining -= len(chunk)
            os.close(fd)
            fd = -1
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise UnsafeEntryError(f"blob announced as {digest} hashes to {actual}")
            os.replace(partial, target)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(partial)
            raise

    def save_context(self, context_digest: str, entries: list[Entry]) -> None:
        path = os.path.join(self._contexts, context_digest.replace(":", "-") + ".json")
        fd, partial = tempfile.mkstemp(dir=self._contexts, prefix=".partial-")
        with os.fdopen(fd, "w") as out:
            json.dump(entries, out)
        os.replace(partial, path)

    def load_context(self, context_digest: str) -> list[Entry]:
        path = os.path.join(self._contexts, context_digest.replace(":", "-") + ".json")
        with open(path) as source:
            return entries_from_json(json.load(source))

    def has_context(self, context_digest: str) -> bool:
        """The manifest is here and none of its blobs has been evicted."""
        path = os.path.join(self._contexts, context_digest.replace(":", "-") + ".json")
        if not os.path.exists(path):
            return False
        return not self.missing(entry[3] for entry in self.load_context(context_digest) if entry[3])

    def lay_out(self, entries: list[Entry], destination: str) -> None:
        """Materialise a checked context manifest in ``destination`` (which must be empty)."""
        check_entries(entries)
        os.makedirs(destination, exist_ok=True)
        folders = []
        for path, mode, _size, digest, link in entries:
            target = os.path.join(destination, path)
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFDIR:
                os.makedirs(target, exist_ok=True)
                folders.append((target, stat.S_IMODE(mode)))
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if kind == stat.S_IFLNK:
                os.symlink(link, target)
            else:
                shutil.copyfile(self.blob_path(digest), target)
                os.chmod(target, stat.S_IMODE(mode))
        # Folder modes last, deepest first, so a read-only folder does not stop its own filling.
        for target, permissions in sorted(folders, key=lambda item: -len(item[0])):
            os.chmod(target, permissions)


def check_entries(entries: Iterable[Entry]) -> None:
    """Refuse absolute paths, ``..``, links leaving the context and anything but files/folders/links.

    Entries below a symlink are refused too: writing them would follow the link, and a link
    checked against its spelled path could leave the context once its parent resolves elsewhere.
    So is a second entry for one path: a file written where a link was laid out follows the link.
    """
    entries = list(entries)
    links = {entry[0] for entry in entries if stat.S_ISLNK(entry[1])}
    seen: set[str] = set()
    for path, mode, _size, digest, link in entries:
        if not path or path.startswith("/") or "\\" in path or "\0" in path:
            raise UnsafeEntryError(f"context entry with an absolute or empty path: {path!r}")
        parts = path.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise UnsafeEntryError(f"context entry with '.', '..' or an empty part: {path!r}")
        if path in seen:
            raise UnsafeEntryError(f"context entry {path!r} appears twice")
        seen.add(path)
        for end in range(1, len(parts)):
            if "/".join(parts[:end]) in links:
                raise UnsafeEntryError(f"context entry {path!r} lies below a symlink")
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            if not digest:
                raise UnsafeEntryError(f"file without a digest: {path!r}")
        elif kind == stat.S_IFLNK:
            if not link or link.startswith("/") or "\0" in link or not _stays_inside(parts[:-1], link, links):
                raise UnsafeEntryError(f"link {path!r} points outside the context: {link!r}")
        elif kind != stat.S_IFDIR:
            raise UnsafeEntryError(f"context entry {path!r} is not a file, folder or link (mode {mode:o})")
        if stat.S_IMODE(mode) & (stat.S_ISUID | stat.S_ISGID):
            raise UnsafeEntryError(f"context entry {path!r} is setuid or setgid")


def _stays_inside(folder: list[str], link: str, links: set[str]) -> bool:
    """Whether ``link``, followed from ``folder``, stays in the context, judged by its spelling.

    The spelling is only trustworthy until it passes through another link of the context: the
    kernel takes ".." from where that link leads, not from where it is written (with ``s -> .``,
    ``s/..`` is the context's parent). So no ".." may follow a link; the links passed through are
    checked in their own right.
    """
    here = list(folder)
    through_link = False
    for part in link.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if through_link or not here:
                return False
            here.pop()
        else:
            here.append(part)
            through_link = through_link or "/".join(here) in links
    return True


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
