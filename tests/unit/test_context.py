"""farm.context.scan_context: a folder as the manifest nodes receive, rescanned cheaply with a StatCache."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

import farm.context
from agent.protocol import canonical_manifest, context_digest
from farm.context import StatCache, scan_context
from farm.errors import ContextError


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "context"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "Dockerfile").write_bytes(b"FROM scratch\n")
    (root / "src" / "main.py").write_bytes(b"print(1)\n")
    (root / "src" / "pkg" / "same.py").write_bytes(b"print(1)\n")
    (root / "src" / "pkg" / "empty").mkdir()
    (root / "src" / "run.sh").write_bytes(b"#!/bin/sh\n")
    for path in root.rglob("*"):  # whatever the umask
        path.chmod(0o755 if path.is_dir() or path.name == "run.sh" else 0o644)
    os.symlink("pkg/same.py", root / "src" / "alias.py")
    return root


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the scans hash, in order."""
    paths: list[str] = []
    real = farm.context._hash_file

    def counting(path: str) -> str:
        paths.append(os.path.relpath(path))
        return real(path)

    monkeypatch.setattr(farm.context, "_hash_file", counting)
    return paths


def test_a_scan_is_the_sorted_manifest_nodes_receive(tree: Path) -> None:
    context = scan_context(tree)
    code = digest_of(b"print(1)\n")
    assert context.entries == (
        ("Dockerfile", stat.S_IFREG | 0o644, 13, digest_of(b"FROM scratch\n"), ""),
        ("src", stat.S_IFDIR | 0o755, 0, "", ""),
        ("src/alias.py", stat.S_IFLNK | 0o777, 0, "", "pkg/same.py"),
        ("src/main.py", stat.S_IFREG | 0o644, 9, code, ""),
        ("src/pkg", stat.S_IFDIR | 0o755, 0, "", ""),
        ("src/pkg/empty", stat.S_IFDIR | 0o755, 0, "", ""),
        ("src/pkg/same.py", stat.S_IFREG | 0o644, 9, code, ""),
        ("src/run.sh", stat.S_IFREG | 0o755, 10, digest_of(b"#!/bin/sh\n"), ""),
    )
    assert context.manifest == canonical_manifest(list(context.entries))
    assert context.digest == context_digest(list(context.entries))
    assert set(context.blobs) == {code, digest_of(b"FROM scratch\n"), digest_of(b"#!/bin/sh\n")}
    assert context.read_blob(code) == b"print(1)\n"


def test_a_warm_scan_hashes_only_what_changed(
    tree: Path, tmp_path: Path, hashed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree)
    cache_dir = tmp_path / "cache"
    cold = scan_context(tree, StatCache.for_context(tree, cache_dir))
    assert sorted(hashed) == ["Dockerfile", "src/main.py", "src/pkg/same.py", "src/run.sh"]
    hashed.clear()
    assert scan_context(tree, StatCache.for_context(tree, cache_dir)) == cold
    assert hashed == []
    (tree / "src" / "main.py").write_bytes(b"print(2)\n")
    warm = scan_context(tree, StatCache.for_context(tree, cache_dir))
    assert hashed == ["src/main.py"]
    assert dict((e[0], e[3]) for e in warm.entries)["src/main.py"] == digest_of(b"print(2)\n")


def test_the_cache_is_written_only_when_it_would_change(tree: Path, tmp_path: Path) -> None:
    cache = StatCache.for_context(tree, tmp_path / "cache")
    assert cache.path is not None
    scan_context(tree, cache)
    written = cache.path.stat().st_mtime_ns
    os.utime(cache.path, ns=(written - 10**9, written - 10**9))
    scan_context(tree, StatCache.for_context(tree, tmp_path / "cache"))
    assert cache.path.stat().st_mtime_ns == written - 10**9  # nothing new: not rewritten
    (tree / "src" / "run.sh").unlink()
    scan_context(tree, StatCache.for_context(tree, tmp_path / "cache"))
    assert sorted(os.path.relpath(path, tree) for path in json.loads(cache.path.read_text())) == [
        "Dockerfile",
        "src/main.py",
        "src/pkg/same.py",
    ]


@pytest.mark.parametrize("value", [5, "x", [1, 2, 3, 4], [1, 2, 3, 4, 5], None, {"a": 1}])
def test_a_damaged_cache_costs_only_a_rehash(
    tree: Path, tmp_path: Path, hashed: list[str], value: object
) -> None:
    cache = StatCache.for_context(tree, tmp_path / "cache")
    assert cache.path is not None
    first = scan_context(tree, cache)
    entries = json.loads(cache.path.read_text())
    main = str(tree / "src" / "main.py")
    damaged = [*entries[main][:4], 5] if value == [1, 2, 3, 4, 5] else value
    cache.path.write_text(json.dumps({**entries, main: damaged}))
    hashed.clear()
    assert scan_context(tree, StatCache.for_context(tree, tmp_path / "cache")) == first
    assert hashed == [os.path.relpath(main)]


def test_links_leading_out_are_refused_at_scan_time(tree: Path) -> None:
    os.symlink("../../../etc/passwd", tree / "src" / "pkg" / "passwords")
    with pytest.raises(ContextError, match="points outside the context") as refused:
        scan_context(tree)
    assert refused.value.hint == "nodes refuse it; exclude it in .dockerignore"


@pytest.mark.parametrize(("path", "mode"), [("src/run.sh", 0o4755), ("src/pkg", 0o2775)])
def test_setuid_and_setgid_entries_are_refused_at_scan_time(tree: Path, path: str, mode: int) -> None:
    (tree / path).chmod(mode)
    with pytest.raises(ContextError, match=f"'{path}' is setuid or setgid"):
        scan_context(tree)


def test_pipes_are_refused(tree: Path) -> None:
    os.mkfifo(tree / "src" / "pipe")
    with pytest.raises(ContextError, match="device, socket or pipe"):
        scan_context(tree)


def test_dockerignore_keeps_what_it_excludes_out_of_the_manifest(tree: Path) -> None:
    (tree / ".dockerignore").write_text("src/pkg\n!src/pkg/same.py\n")
    paths = [entry[0] for entry in scan_context(tree).entries]
    assert paths == [
        ".dockerignore",
        "Dockerfile",
        "src",
        "src/alias.py",
        "src/main.py",
        "src/pkg/same.py",
        "src/run.sh",
    ]
