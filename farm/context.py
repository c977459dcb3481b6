"""The build context as farm ships it: a content-addressed manifest of what ``.dockerignore`` keeps.

The context is scanned and hashed once per build, however many nodes receive it. Each entry is
``(path, mode, size, sha256, link target)``; the context's digest is the digest of its manifest,
so a node that has every blob and the manifest has the context.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from agent.protocol import Entry, canonical_manifest, manifest_digest
from agent.store import UnsafeEntryError, check_entries
from farm.dockerignore import IgnoreRules, parse_dockerignore
from farm.errors import ContextError
from farm.paths import CACHE_DIR

__all__ = ["Context", "StatCache", "scan_context"]

_CHUNK = 1024 * 1024
_READ_BUDGET = 256 * 1024 * 1024
_SET_ID = stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True)
class Context:
    root: Path
    entries: tuple[Entry, ...]
    blobs: dict[str, str]  # sha256 digest -> the path of one file holding it
    manifest: bytes = field(repr=False)  # the entries as nodes receive them (``canonical_manifest``)
    _read: _ReadCache = field(default_factory=lambda: _ReadCache(), repr=False, compare=False)

    @functools.cached_property
    def digest(self) -> str:
        return manifest_digest(self.manifest)

    @property
    def size(self) -> int:
        return sum(entry[2] for entry in self.entries if entry[3])

    @functools.cached_property
    def blob_sizes(self) -> dict[str, int]:
        return {entry[3]: entry[2] for entry in self.entries if entry[3]}

    def read_blob(self, digest: str) -> bytes:
        """A blob's bytes, read from disk and checked against its digest once per build."""
        cached = self._read.blobs.get(digest)
        if cached is not None:
            return cached
        path = self.blobs[digest]
        with open(path, "rb") as source:
            data = source.read()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ContextError(f"{path} changed while the build was running")
        self._read.keep(digest, data)
        return data


class _ReadCache:
    """Blobs already read and checked for one node, kept for the next ones within a budget."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self._size = 0

    def keep(self, digest: str, data: bytes) -> None:
        if self._size + len(data) <= _READ_BUDGET:
            self.blobs[digest] = data
            self._size += len(data)


class StatCache:
    """Digests of files already hashed, trusted while size, mtime, ctime and inode are unchanged.

    Kept per context folder under ``~/.cache/farm/stat``, so an unchanged context of thousands of
    files is scanned without reading a byte of them.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: remember nothing beyond this scan
        self._loaded: dict[str, object] = {}
        self._met: dict[str, list[object]] = {}  # what this scan found: what is saved
        self._dirty = False
        if path is None:
            return
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self._loaded = loaded
        except (OSError, ValueError):
            pass  # a missing or damaged cache only costs a rehash

    @classmethod
    def for_context(cls, root: Path, cache_dir: Path | None = None) -> StatCache:
        folder = cache_dir or CACHE_DIR / "stat"
        name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
        return cls(folder / f"{name}.json")

    def digest(self, path: str, info: os.stat_result) -> str:
        key: list[object] = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        known = self._loaded.get(path)
        if isinstance(known, list) and len(known) == 5 and known[:4] == key and isinstance(known[4], str):
            self._met[path] = known
            return known[4]
        digest = _hash_file(path)
        self._met[path] = [*key, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the cache back, forgetting files this scan did not meet."""
        # Nothing rehashed and as many files as before: the very files of the loaded cache.
        if self.path is None or (not self._dirty and len(self._met) == len(self._loaded)):
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(self._met))
            partial.replace(self.path)
        except OSError:
            pass  # the cache is an optimisation; the build does not depend on it


def scan_context(root: Path, cache: StatCache | None = None) -> Context:
    """Walk ``root``, apply its ``.dockerignore``, hash every file kept (or trust ``cache``)."""
    if not root.is_dir():
        raise ContextError(
            f"build context {root} is not a folder"
            if root.exists()
            else f"build context {root} does not exist",
            hint="pass the folder holding the Dockerfile and the files it copies",
        )
    rules = _load_rules(root)
    entries: list[Entry] = []
    blobs: dict[str, str] = {}
    cache = cache or StatCache(None)
    _walk(str(root), "", rules, entries, blobs, cache)
    cache.save()
    entries.sort()
    try:
        # Nodes refuse these too; saying so before anything is sent names the file here. Of what
        # they refuse, a walked tree can hold only links leading out and setuid or setgid entries:
        # its paths are plain and unique, and nothing lies below a link (links are not walked into).
        check_entries(entry for entry in entries if stat.S_ISLNK(entry[1]) or entry[1] & _SET_ID)
    except UnsafeEntryError as exc:
        raise ContextError(
            f"build context {root}: {exc}", hint="nodes refuse it; exclude it in .dockerignore"
        ) from exc
    return Context(root=root, entries=tuple(entries), blobs=blobs, manifest=canonical_manifest(entries))


def _load_rules(root: Path) -> IgnoreRules:
    ignore_file = root / ".dockerignore"
    if not ignore_file.exists():
        return IgnoreRules()
    try:
        return parse_dockerignore(ignore_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ContextError(f"cannot read {ignore_file}: {exc}") from exc


def _walk(
    folder: str,
    relative: str,
    rules: IgnoreRules,
    entries: list[Entry],
    blobs: dict[str, str],
    cache: StatCache,
) -> None:
    # Plain strings, not Paths: a warm scan of thousands of files is mostly this loop.
    try:
        with os.scandir(folder) as scan:
            children = list(scan)
    except OSError as exc:
        raise ContextError(f"cannot read {folder}: {exc.strerror}") from exc
    for child in children:
        name = child.name
        if "\\" in name or "\n" in name:
            raise ContextError(f"context path {child.path!r} has a character farm cannot ship")
        if not name.isascii():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ContextError(f"context path {os.fsencode(child.path)!r} is not valid UTF-8") from exc
        path = f"{relative}/{name}" if relative else name
        info = child.stat(follow_symlinks=False)
        ignored = rules.is_ignored(path)
        if stat.S_ISDIR(info.st_mode):
            if not ignored:
                entries.append((path, info.st_mode, 0, "", ""))
            if not ignored or rules.may_include_below(path):
                _walk(child.path, path, rules, entries, blobs, cache)
            continue
        if ignored:
            continue
        if stat.S_ISLNK(info.st_mode):
            entries.append((path, info.st_mode, 0, "", os.readlink(child.path)))
        elif stat.S_ISREG(info.st_mode):
            digest = cache.digest(child.path, info)
            blobs.setdefault(digest, child.path)
            entries.append((path, info.st_mode, info.st_size, digest, ""))
        else:
            raise ContextError(
                f"context entry {path} is a device, socket or pipe",
                hint="exclude it in .dockerignore",
            )


def _hash_file(path: str) -> str:
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                hasher.update(chunk)
    except OSError as exc:
        raise ContextError(f"cannot read {path}: {exc.strerror}") from exc
    return "sha256:" + hasher.hexdigest()
