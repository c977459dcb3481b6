"""The build context as farm ships it: a content-addressed manifest of what ``.dockerignore`` keeps.

The context is scanned and hashed once per build, however many nodes receive it. Each entry is
``(path, mode, size, sha256, link target)``; the context's digest is the digest of its manifest,
so a node that has every blob and the manifest has the context.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.protocol import Entry, context_digest
from farm.dockerignore import IgnoreRules, parse_dockerignore
from farm.errors import ContextError

__all__ = ["Context", "scan_context"]

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Context:
    root: Path
    entries: tuple[Entry, ...]
    digest: str
    blobs: dict[str, Path]  # sha256 digest -> one file holding it

    @property
    def size(self) -> int:
        return sum(entry[2] for entry in self.entries if entry[3])

    def read_blob(self, digest: str) -> bytes:
        path = self.blobs[digest]
        data = path.read_bytes()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ContextError(f"{path} changed while the build was running")
        return data


def scan_context(root: Path) -> Context:
    """Walk ``root``, apply its ``.dockerignore``, hash every file kept."""
    if not root.is_dir():
        raise ContextError(
            f"build context {root} is not a folder"
            if root.exists()
            else f"build context {root} does not exist",
            hint="pass the folder holding the Dockerfile and the files it copies",
        )
    rules = _load_rules(root)
    entries: list[Entry] = []
    blobs: dict[str, Path] = {}
    _walk(root, "", rules, entries, blobs)
    entries.sort()
    return Context(root=root, entries=tuple(entries), digest=context_digest(entries), blobs=blobs)


def _load_rules(root: Path) -> IgnoreRules:
    ignore_file = root / ".dockerignore"
    if not ignore_file.exists():
        return IgnoreRules()
    try:
        return parse_dockerignore(ignore_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ContextError(f"cannot read {ignore_file}: {exc}") from exc


def _walk(
    root: Path, relative: str, rules: IgnoreRules, entries: list[Entry], blobs: dict[str, Path]
) -> None:
    folder = root / relative if relative else root
    try:
        children = sorted(os.scandir(folder), key=lambda child: child.name)
    except OSError as exc:
        raise ContextError(f"cannot read {folder}: {exc.strerror}") from exc
    for child in children:
        name = child.name
        if "\\" in name or "\n" in name:
            raise ContextError(f"context path {folder / name!r} has a character farm cannot ship")
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
                _walk(root, path, rules, entries, blobs)
            continue
        if ignored:
            continue
        if stat.S_ISLNK(info.st_mode):
            entries.append((path, info.st_mode, 0, "", os.readlink(child.path)))
        elif stat.S_ISREG(info.st_mode):
            digest = _hash_file(Path(child.path))
            blobs.setdefault(digest, Path(child.path))
            entries.append((path, info.st_mode, info.st_size, digest, ""))
        else:
            raise ContextError(
                f"context entry {path} is a device, socket or pipe",
                hint="exclude it in .dockerignore",
            )


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as source:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                hasher.update(chunk)
    except OSError as exc:
        raise ContextError(f"cannot read {path}: {exc.strerror}") from exc
    return "sha256:" + hasher.hexdigest()
