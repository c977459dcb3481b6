"""agent.store.ContentStore: blobs by digest, manifests by context, eviction that spares leases.

Leases are held by processes, so some tests hold one in a child process: a lease is honoured
while its process lives and forgotten once it is gone, however it ended.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.protocol import Entry, canonical_manifest, context_digest
from agent.store import ContentStore, UnsafeEntryError

REPO = Path(__file__).resolve().parents[2]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(store: ContentStore, data: bytes, age: int = 0) -> str:
    """Store ``data``; ``age`` seconds in the past makes it less recently used than younger blobs."""
    digest = digest_of(data)
    store.receive(digest, len(data), io.BytesIO(data))
    if age:
        when = os.stat(store.blob_path(digest)).st_mtime - age
        os.utime(store.blob_path(digest), (when, when))
    return digest


def present(store: ContentStore, digests: list[str]) -> list[bool]:
    return [os.path.exists(store.blob_path(digest)) for digest in digests]


@contextmanager
def lease_in_another_process(root: Path, digests: list[str]) -> Iterator[subprocess.Popen[str]]:
    """A process that leases ``digests`` in the store at ``root`` and lives until the block ends."""
    script = (
        "import sys\n"
        "from agent.store import ContentStore\n"
        "store = ContentStore(sys.argv[1])\n"
        "print(len(store.lease(sys.argv[2:])), flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(root), *digests],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "0"  # leased, and nothing was missing
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_a_blob_is_kept_under_its_digest_and_a_wrong_one_refused(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    digest = put(store, b"hello")
    assert Path(store.blob_path(digest)).read_bytes() == b"hello"
    with pytest.raises(UnsafeEntryError, match="hashes to"):
        store.receive(digest_of(b"other"), 5, io.BytesIO(b"hello"))
    assert not os.path.exists(store.blob_path(digest_of(b"other")))
    assert [name for name in os.listdir(tmp_path / "cas" / "sha256") if name.startswith(".")] == []


def test_missing_names_each_absent_blob_once_in_the_order_asked(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    here = put(store, b"here")
    first, second = digest_of(b"first"), digest_of(b"second")
    assert store.missing([second, here, first, second]) == [second, first]
    assert store.lease([first, here, first]) == [first]


@pytest.mark.parametrize(
    "digest", ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "a" * 64, "sha256:" + "a" * 63, ""]
)
def test_digests_are_checked_before_they_name_a_file(tmp_path: Path, digest: str) -> None:
    store = ContentStore(str(tmp_path))
    for use in (store.blob_path, store.load_context, lambda d: store.lease([d]), lambda d: store.touch([d])):
        with pytest.raises(UnsafeEntryError, match="not a sha256 digest"):
            use(digest)


def manifest_of(store: ContentStore, *files: bytes) -> list[Entry]:
    entries: list[Entry] = [("src", stat.S_IFDIR | 0o755, 0, "", "")]
    for number, data in enumerate(files):
        entries.append((f"src/f{number}", stat.S_IFREG | 0o644, len(data), put(store, data), ""))
    return entries


def test_a_manifest_is_kept_as_the_bytes_its_digest_names(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    entries = manifest_of(store, b"a", b"b")
    digest = context_digest(entries)
    store.save_context(digest, list(reversed(entries)))
    kept = tmp_path / "contexts" / (digest.replace(":", "-") + ".json")
    assert kept.read_bytes() == canonical_manifest(entries)
    assert store.load_context(digest) == entries
    assert store.has_context(digest)


def test_a_manifest_is_not_kept_under_a_digest_it_does_not_hash_to(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    entries = manifest_of(store, b"a")
    wrong = context_digest(manifest_of(store, b"b"))
    with pytest.raises(ValueError, match="does not hash to"):
        store.save_context(wrong, entries)
    assert not store.has_context(wrong)


def test_a_damaged_manifest_is_noticed(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    entries = manifest_of(store, b"a")
    digest = context_digest(entries)
    store.save_context(digest, entries)
    kept = tmp_path / "contexts" / (digest.replace(":", "-") + ".json")
    kept.chmod(0o644)
    kept.write_bytes(canonical_manifest([*entries, ("extra", stat.S_IFDIR | 0o755, 0, "", "")]))
    with pytest.raises(ValueError, match="damaged"):
        store.load_context(digest)
    assert not store.has_context(digest)


def test_a_context_lacking_a_blob_is_not_had(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    entries = manifest_of(store, b"a", b"b")
    digest = context_digest(entries)
    store.save_context(digest, entries)
    os.unlink(store.blob_path(entries[2][3]))
    assert not store.has_context(digest)
    assert not store.has_context(context_digest([]))


def test_eviction_takes_the_least_recently_used_first_and_spares_keep(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    oldest, old, kept, new = (
        put(store, bytes([n]) * 100, age) for n, age in ((1, 400), (2, 300), (3, 500), (4, 0))
    )
    assert store.evict(250, keep=[kept]) == 200
    assert present(store, [oldest, old, kept, new]) == [False, False, True, True]


def test_touching_a_blob_makes_it_recent(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    used, unused = put(store, b"u" * 100, age=300), put(store, b"n" * 100, age=200)
    store.touch([used, digest_of(b"gone")])
    store.evict(100)
    assert present(store, [used, unused]) == [True, False]


def test_eviction_under_the_limit_waits_for_no_lock(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    blob = put(store, b"x" * 100)
    evicting = threading.Thread(target=store.evict, args=(100,))
    with store._locked():
        evicting.start()
        evicting.join(10)
        assert not evicting.is_alive()
    assert present(store, [blob]) == [True]


def test_a_lease_waits_for_an_eviction_under_way(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    blob = put(store, b"x")
    answers: list[list[str]] = []
    leasing = threading.Thread(target=lambda: answers.append(ContentStore(str(tmp_path)).lease([blob])))
    with store._locked():
        leasing.start()
        leasing.join(0.3)
        assert leasing.is_alive()
        os.unlink(store.blob_path(blob))  # what that eviction deletes ...
    leasing.join(10)
    assert answers == [[blob]]  # ... the lease taken after it finds missing


def test_eviction_spares_what_a_live_process_has_leased(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    leased = [put(store, bytes([n]) * 100, age=500) for n in range(3)]
    other = put(store, b"o" * 100, age=100)
    with lease_in_another_process(tmp_path, leased):
        assert store.evict(0) == 100
        assert present(store, [*leased, other]) == [True, True, True, False]
    assert store.evict(0) == 300  # its process has ended: so has the lease
    assert present(store, leased) == [False, False, False]
    assert os.listdir(tmp_path / "leases") == [".lock"]


def lease_of_a_killed_process(root: Path, digests: list[str]) -> None:
    """Leave behind the lease of a process killed while it held it."""
    with lease_in_another_process(root, digests) as child:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_a_killed_process_leaves_no_lease_that_counts(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    leased = put(store, b"l" * 100)
    lease_of_a_killed_process(tmp_path, [leased])
    assert len(os.listdir(tmp_path / "leases")) == 2  # its lease file is still there ...
    assert store.evict(0) == 100  # ... but no longer honoured, and removed
    assert os.listdir(tmp_path / "leases") == [".lock"]


def test_ending_its_leases_clears_away_those_of_killed_processes(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    leased = put(store, b"l" * 100)
    lease_of_a_killed_process(tmp_path, [leased])
    with lease_in_another_process(tmp_path, [leased]):
        assert store.lease([leased]) == []
        store.release_leases()
        assert len(os.listdir(tmp_path / "leases")) == 2  # the lock and the live child's lease
    assert store.evict(0) == 100


def test_a_store_honours_the_leases_of_another_store_in_its_own_process(tmp_path: Path) -> None:
    holder, evictor = ContentStore(str(tmp_path)), ContentStore(str(tmp_path))
    leased, other = put(holder, b"l" * 100), put(holder, b"o" * 100)
    assert holder.lease([leased]) == []
    assert evictor.evict(0) == 100
    assert present(evictor, [leased, other]) == [True, False]
    holder.release_leases()
    assert os.listdir(tmp_path / "leases") == [".lock"]
    assert evictor.evict(0) == 100


def test_manifests_not_synced_for_a_day_are_dropped_but_those_kept(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    contexts = {}
    for name, age in (("fresh", 0), ("stale", 2 * 24 * 3600), ("queued", 3 * 24 * 3600)):
        blob = put(store, name.encode())
        entries: list[Entry] = [(f"{name}.txt", 0o100644, len(name), blob, "")]
        digest = context_digest(entries)
        store.save_context(digest, entries)
        manifest = tmp_path / "contexts" / f"sha256-{digest.removeprefix('sha256:')}.json"
        when = manifest.stat().st_mtime - age
        os.utime(manifest, (when, when))
        contexts[name] = digest

    assert store.drop_stale_manifests(24 * 3600, keep=[contexts["queued"]]) == 1
    assert store.has_context(contexts["fresh"])
    assert store.has_context(contexts["queued"])
    assert not store.has_context(contexts["stale"])
    assert present(store, [digest_of(b"stale")]) == [True]  # its blob goes by eviction, not here
