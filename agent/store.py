"""The node's content store and the build contexts laid out from it.

Files arrive by sha256 and are kept under ``ROOT/cas``; a context manifest names them by path and
is kept under ``ROOT/contexts`` as the very bytes its digest names (for a day after its last sync:
every build syncs first). Every entry is checked before
anything touches the disk: a hostile or broken coordinator must not be able to write outside the
build folder, plant device files or links that escape.

Several agents share a node's store (the platforms of one build, other coordinators). Eviction
keeps it under a size limit, least recently used blobs first, but never takes a blob a live
process has leased. An agent leases a context's blobs before it tells its coordinator which ones
it lacks, and before its build looks the context up, and holds the lease until it exits: what it
found present is still there when the build lays the context out.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from typing import IO

from agent.protocol import Entry, canonical_manifest, entries_from_manifest, manifest_digest

__all__ = ["ContentStore", "UnsafeEntryError", "check_entries"]

_CHUNK = 1024 * 1024
DEFAULT_LIMIT = 4 * 1024**3
MANIFEST_MAX_AGE = 24 * 3600
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")
# Lease files are named by process and number: unique however many stores one process opens.
_lease_numbers = itertools.count()


class UnsafeEntryError(ValueError):
    """A context entry that would escape the context or is not a plain file, folder or link."""


class ContentStore:
    """A sha256-addressed file store in a folder, safe for concurrent agents on one node."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._blobs = os.path.join(root, "cas", "sha256")
        self._contexts = os.path.join(root, "contexts")
        self._leases = os.path.join(root, "leases")
        # Readable by the agent's user alone: contexts are the submitters' source code.
        for folder in (self._blobs, self._contexts, self._leases):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        for folder in (root, os.path.dirname(self._blobs), self._blobs, self._contexts, self._leases):
            os.chmod(folder, 0o700)
        self._partials = itertools.count()
        self._held: list[tuple[str, int]] = []  # this store's leases: (path, descriptor holding its lock)

    def blob_path(self, digest: str) -> str:
        return os.path.join(self._blobs, _sha256_hex(digest))

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests the store lacks, each once, in the order first asked."""
        wanted = list(dict.fromkeys(digests))
        return self._lacking(wanted, [_sha256_hex(digest) for digest in wanted])

    def lease(self, digests: Iterable[str]) -> list[str]:
        """Keep these blobs from eviction until this process ends; return those the store lacks.

        The lease is written and the store looked at under the lock eviction deletes under: a blob
        found here stays as long as the lease, one evicted before is reported missing.
        """
        wanted = list(dict.fromkeys(digests))
        names = [_sha256_hex(digest) for digest in wanted]
        with self._locked():
            self._hold_lease("".join(name + "\n" for name in names).encode())
            return self._lacking(wanted, names)

    def release_leases(self) -> None:
        """End this store's leases, and clear away the files of leases whose process died."""
        for path, descriptor in self._held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(descriptor)
        self._held.clear()
        # A killed process's leases end with it, but their files stay until someone looks.
        with self._locked():
            self._live_leases()

    def touch(self, digests: Iterable[str]) -> None:
        """Mark blobs as just used, so that eviction keeps them longest."""
        with self._blob_folder() as folder:
            for digest in digests:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(_sha256_hex(digest), dir_fd=folder)

    def evict(self, limit: int, keep: Iterable[str] = ()) -> int:
        """Delete least recently used blobs until the store holds at most ``limit`` bytes.

        Blobs in ``keep`` and blobs leased by live processes stay whatever their age; returns
        bytes freed. A store under its limit costs one scan and no lock.
        """
        blobs = []
        total = 0
        with self._blob_folder() as folder:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not entry.name.startswith("."):
                        info = entry.stat()
                        total += info.st_size
                        blobs.append((info.st_mtime_ns, info.st_size, entry.name))
            if total <= limit:
                return 0
            freed = 0
            with self._locked():
                kept = {_sha256_hex(digest) for digest in keep}
                for path in self._live_leases():
                    # Gone already: its process has just ended it, and no longer needs its blobs.
                    with contextlib.suppress(FileNotFoundError), open(path, "rb") as lease:
                        kept.update(lease.read().decode().split())
                for _, size, name in sorted(blobs):
                    if total - freed <= limit:
                        break
                    if name in kept:
                        continue
                    try:
                        os.unlink(name, dir_fd=folder)
                    except FileNotFoundError:
                        continue
                    freed += size
        return freed

    def drop_stale_manifests(self, max_age: float, keep: Iterable[str] = ()) -> int:
        """Delete the manifests of contexts not synced for ``max_age`` seconds, but those in ``keep``.

        A manifest is read by the build that follows its sync, moments later; every build syncs
        again first, which rewrites it. Old ones only fill the disk. Returns how many went.
        """
        kept = {os.path.basename(self._manifest_path(digest)) for digest in keep}
        oldest = time.time() - max_age
        dropped = 0
        with os.scandir(self._contexts) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name in kept:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < oldest:
                        os.unlink(entry.path)
                        dropped += 1
        return dropped

    def receive(self, digest: str, size: int, stream: IO[bytes]) -> None:
        """Copy ``size`` bytes from ``stream`` into the store, refusing them if the hash differs."""
        target = self.blob_path(digest)
        hasher = hashlib.sha256()
        partial = self._partial_path(self._blobs)
        # Few system calls per blob: contexts are often thousands of small files.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            remaining = size
            while remaining:
                chunk = stream.read(min(_CHUNK, remaining))
                if not chunk:
                    raise EOFError(f"stream ended {size - remaining} bytes into a {size}-byte blob")
                hasher.update(chunk)
                _write_all(fd, chunk)
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
        """Keep the manifest of ``entries``; ``ValueError`` if it does not hash to ``context_digest``."""
        manifest = canonical_manifest(entries)
        if manifest_digest(manifest) != context_digest:
            raise ValueError(f"the context manifest does not hash to {context_digest!r}")
        self.save_manifest(context_digest, manifest)

    def save_manifest(self, context_digest: str, manifest: bytes) -> None:
        """Keep a context's manifest: ``canonical_manifest`` of its entries, which hashes to its digest."""
        partial = self._partial_path(self._contexts)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            _write_all(fd, manifest)
        except BaseException:
            os.close(fd)
            os.unlink(partial)
            raise
        os.close(fd)
        os.replace(partial, self._manifest_path(context_digest))

    def load_context(self, context_digest: str) -> list[Entry]:
        """The entries of a kept manifest; ``ValueError`` if it no longer hashes to its digest."""
        with open(self._manifest_path(context_digest), "rb") as source:
            manifest = source.read()
        if manifest_digest(manifest) != context_digest:
            raise ValueError(f"the manifest kept for context {context_digest} is damaged")
        return entries_from_manifest(manifest)

    def has_context(self, context_digest: str) -> bool:
        """The manifest is here, intact, and none of its blobs has been evicted."""
        try:
            entries = self.load_context(context_digest)
        except (FileNotFoundError, ValueError):
            return False
        return not self.missing(entry[3] for entry in entries if entry[3])

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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The store alone: taken to lease and to evict, by every agent and thread sharing it."""
        # Each call opens the file anew: flock then also excludes other threads of this process.
        with open(os.path.join(self._leases, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _hold_lease(self, names: bytes) -> None:
        """Write a lease and keep it locked: its lock is how eviction tells a live lease from a dead one."""
        # A file of this name can only be left by a dead process whose pid this one reuses.
        path = os.path.join(self._leases, f"{os.getpid()}-{next(_lease_numbers)}")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(descriptor, names)
        except BaseException:
            os.close(descriptor)
            os.unlink(path)
            raise
        self._held.append((path, descriptor))

    def _live_leases(self) -> list[str]:
        """The files of leases whose process lives (the store lock held); the others are removed."""
        live = []
        with os.scandir(self._leases) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    probe = open(entry.path, "rb")  # noqa: SIM115 - closed below, after the probe
                except FileNotFoundError:
                    continue
                with probe:
                    try:
                        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except BlockingIOError:
                        live.append(entry.path)  # its process holds it
                        continue
                # Nobody holds it: its process is gone (or has just ended it itself).
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        return live

    def _lacking(self, digests: list[str], names: list[str]) -> list[str]:
        with self._blob_folder() as folder:
            return [
                digest for digest, name in zip(digests, names) if not os.access(name, os.F_OK, dir_fd=folder)
            ]

    @contextlib.contextmanager
    def _blob_folder(self) -> Iterator[int]:
        """The blob folder, open: names looked up in it cost a third of what full paths do."""
        folder = os.open(self._blobs, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield folder
        finally:
            os.close(folder)

    def _manifest_path(self, context_digest: str) -> str:
        return os.path.join(self._contexts, f"sha256-{_sha256_hex(context_digest)}.json")

    def _partial_path(self, folder: str) -> str:
        return os.path.join(folder, f".partial-{os.getpid()}-{next(self._partials)}")


def check_entries(entries: Iterable[Entry]) -> None:
    """Refuse absolute paths, ``..``, links leaving the context and anything but files/folders/links.

    Entries below a symlink are refused too: writing them would follow the link, and a link
    checked against its spelled path could leave the context once its parent resolves elsewhere.
    So is a second entry for one path: a file written where a link was laid out follows the link.
    """
    entries = list(entries)
    links = {entry[0] for entry in entries if stat.S_ISLNK(entry[1])}
    seen: set[str] = set()
    # Folders found plain and below no link. Most entries share their folder with others, so
    # each folder's parts are checked once, and then only each entry's own name.
    plain: set[str] = set()
    for path, mode, _size, digest, link in entries:
        if not path or path.startswith("/") or "\\" in path or "\0" in path:
            raise UnsafeEntryError(f"context entry with an absolute or empty path: {path!r}")
        folder, _, name = path.rpartition("/")
        unchecked = bool(folder) and folder not in plain
        if name in _SPECIAL_PARTS or (unchecked and not _SPECIAL_PARTS.isdisjoint(folder.split("/"))):
            raise UnsafeEntryError(f"context entry with '.', '..' or an empty part: {path!r}")
        if path in seen:
            raise UnsafeEntryError(f"context entry {path!r} appears twice")
        seen.add(path)
        if unchecked:
            if _through_a_link(folder, links):
                raise UnsafeEntryError(f"context entry {path!r} lies below a symlink")
            plain.add(folder)
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            if not digest:
                raise UnsafeEntryError(f"file without a digest: {path!r}")
        elif kind == stat.S_IFLNK:
            parents = folder.split("/") if folder else []
            if not link or link.startswith("/") or "\0" in link or not _stays_inside(parents, link, links):
                raise UnsafeEntryError(f"link {path!r} points outside the context: {link!r}")
        elif kind != stat.S_IFDIR:
            raise UnsafeEntryError(f"context entry {path!r} is not a file, folder or link (mode {mode:o})")
        if stat.S_IMODE(mode) & (stat.S_ISUID | stat.S_ISGID):
            raise UnsafeEntryError(f"context entry {path!r} is setuid or setgid")


_SPECIAL_PARTS = frozenset(("", ".", ".."))


def _through_a_link(folder: str, links: set[str]) -> bool:
    """Whether ``folder`` or one of the folders holding it is a link."""
    end = len(folder)
    while end > 0:
        if folder[:end] in links:
            return True
        end = folder.rfind("/", 0, end)
    return False


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


def _sha256_hex(digest: str) -> str:
    """A sha256 digest's 64 hex digits, which name its file: checked, since digests come over a wire."""
    match = _SHA256.fullmatch(digest)
    if match is None:
        raise UnsafeEntryError(f"not a sha256 digest: {digest!r}")
    return match[1]


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]
