"""agent.store.check_entries: a hostile context manifest is refused before anything touches the disk.

Besides examples, accepted manifests are checked against ``_resolve``, a model of how the kernel
resolves a path through the manifest's own links once ``lay_out`` has written them.
"""

from __future__ import annotations

import stat

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.protocol import Entry
from agent.store import UnsafeEntryError, check_entries

_SETTINGS = settings(database=None, deadline=None, max_examples=150)

DIGEST = "sha256:" + "c" * 64
DIR = stat.S_IFDIR | 0o755
FILE = stat.S_IFREG | 0o644
LINK = stat.S_IFLNK | 0o777


def folder(path: str, mode: int = DIR) -> Entry:
    return (path, mode, 0, "", "")


def file(path: str, mode: int = FILE) -> Entry:
    return (path, mode, 5, DIGEST, "")


def link(path: str, target: str) -> Entry:
    return (path, LINK, 0, "", target)


def test_an_ordinary_context_is_accepted() -> None:
    check_entries(
        [
            file("Dockerfile"),
            folder("src"),
            file("src/main.py", stat.S_IFREG | 0o755),
            folder("src/pkg", stat.S_IFDIR | 0o700),
            file("src/pkg/__init__.py"),
            link("src/current", "pkg"),
            link("src/pkg/up", "../main.py"),
            link("README", "./docs/../src/./main.py"),
            link("dangling", "not/there"),
            file("sticky", stat.S_IFREG | stat.S_ISVTX | 0o644),
            file(".hidden"),
            file("name with spaces…"),
        ]
    )
    check_entries([])


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "/", "a//b", "a/", "./a", "a/./b", "..", "../a", "a/../b", "a/..", "a\\b", "a\0b"],
)
def test_paths_must_be_plain_and_relative(path: str) -> None:
    for entry in (file(path), folder(path), link(path, "x")):
        with pytest.raises(UnsafeEntryError):
            check_entries([entry])


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("l", "/etc/passwd"),
        ("l", "/"),
        ("l", ".."),
        ("l", "../x"),
        ("l", "a/../../x"),
        ("a/l", "../.."),
        ("a/b/l", "../../../etc"),
        ("a/l", "./../../x"),
        ("l", ""),
        ("l", "a\0b"),
    ],
)
def test_links_may_not_point_outside(path: str, target: str) -> None:
    with pytest.raises(UnsafeEntryError, match="outside the context"):
        check_entries([link(path, target)])


@pytest.mark.parametrize(("path", "target"), [("l", "."), ("l", "a/.."), ("a/l", ".."), ("a/b/l", "../../c")])
def test_links_may_climb_within_the_context(path: str, target: str) -> None:
    check_entries([link(path, target)])


def test_nothing_may_lie_below_a_link() -> None:
    # The link itself is harmless; writing through it is not.
    for below in (file("l/passwd"), folder("l/sub"), link("l/x", "y"), file("l/deeper/f")):
        with pytest.raises(UnsafeEntryError, match="below a symlink"):
            check_entries([link("l", "sub"), below])
        with pytest.raises(UnsafeEntryError, match="below a symlink"):
            check_entries([below, link("l", "sub")])


def test_a_link_below_a_symlinked_parent_cannot_escape() -> None:
    # "up" points at a deep folder, so "up/x -> ../../.." would be checked against the wrong depth.
    with pytest.raises(UnsafeEntryError, match="below a symlink"):
        check_entries([folder("d"), folder("d/e"), link("up", "d/e"), link("up/x", "../../../etc")])


def test_a_link_through_another_link_cannot_escape() -> None:
    # "s" is the context itself, so "s/.." is its parent, however harmless "s/../x" looks as text.
    with pytest.raises(UnsafeEntryError, match="outside the context"):
        check_entries([link("s", "."), link("x", "s/../victim")])
    with pytest.raises(UnsafeEntryError, match="outside the context"):
        check_entries([folder("a"), folder("a/b"), link("a/b/s", "../.."), link("f", "a/b/s/../../../x")])


def test_one_path_one_entry() -> None:
    # A file entry after a link of the same name would be written through the link.
    for second in (file("f"), folder("f"), link("f", "y")):
        with pytest.raises(UnsafeEntryError, match="twice"):
            check_entries([link("f", "x"), second])
    with pytest.raises(UnsafeEntryError, match="twice"):
        check_entries([file("f"), file("f")])


def test_write_through_a_link_to_outside_is_refused() -> None:
    # The exploit the two rules above close together: lay_out would write the blob to ../victim.
    entries = [
        folder("a"),
        folder("a/b"),
        link("a/b/s", "../.."),
        link("f", "a/b/s/../victim"),
        file("f"),
    ]
    with pytest.raises(UnsafeEntryError):
        check_entries(entries)


@pytest.mark.parametrize(
    "mode",
    [
        stat.S_IFCHR | 0o666,
        stat.S_IFBLK | 0o660,
        stat.S_IFIFO | 0o644,
        stat.S_IFSOCK | 0o755,
        0o644,  # no type at all
    ],
)
def test_only_files_folders_and_links(mode: int) -> None:
    with pytest.raises(UnsafeEntryError, match="not a file, folder or link"):
        check_entries([("dev", mode, 0, "", "")])


@pytest.mark.parametrize("bits", [stat.S_ISUID, stat.S_ISGID, stat.S_ISUID | stat.S_ISGID])
def test_setuid_and_setgid_are_refused(bits: int) -> None:
    with pytest.raises(UnsafeEntryError, match="setuid or setgid"):
        check_entries([file("su", FILE | bits)])
    with pytest.raises(UnsafeEntryError, match="setuid or setgid"):
        check_entries([folder("d", DIR | bits)])


def test_a_file_needs_a_digest() -> None:
    with pytest.raises(UnsafeEntryError, match="digest"):
        check_entries([("f", FILE, 5, "", "")])


def test_entries_may_be_any_iterable() -> None:
    check_entries(iter([file("a"), link("b", "a")]))
    with pytest.raises(UnsafeEntryError):
        check_entries(iter([file("a"), link("b", "../a")]))


# --- the model: how the kernel resolves paths through the laid-out context ---------------------------

_ESCAPED = object()


def _resolve(entries: list[Entry], location: list[str], target: str, budget: int = 8) -> object:
    """Follow ``target`` from folder ``location`` of the context: ``_ESCAPED`` if it leaves the
    context, else where it ends (a list of parts) or None where the kernel would stop (ENOENT,
    ENOTDIR, ELOOP)."""
    links = {path: t for path, mode, _, _, t in entries if stat.S_ISLNK(mode)}
    files = {path for path, mode, _, _, _ in entries if stat.S_ISREG(mode)}
    folders = {path for path, mode, _, _, _ in entries if stat.S_ISDIR(mode)}
    folders |= {
        "/".join(path.split("/")[:end]) for path, *_ in entries for end in range(1, path.count("/") + 1)
    }
    if target.startswith("/"):
        return _ESCAPED
    parts = [part for part in target.split("/") if part not in ("", ".")]
    here = list(location)
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "..":
            if not here:
                return _ESCAPED
            here.pop()
            continue
        key = "/".join([*here, part])
        if key in links:
            if budget == 0:
                return None
            resolved = _resolve(entries, here, links[key], budget - 1)
            if resolved is _ESCAPED or resolved is None:
                return resolved
            assert isinstance(resolved, list)
            here = resolved
        elif key in folders or (last and key in files):
            here = [*here, part]
        elif last:
            return [*here, part]  # a dangling end: nothing to follow
        else:
            return None
    return here


_NAMES = st.sampled_from(["a", "b", "s"])
_PATHS = st.lists(_NAMES, min_size=1, max_size=3).map("/".join)
_TARGETS = st.lists(st.sampled_from(["a", "b", "s", "..", "."]), min_size=1, max_size=5).map("/".join)
_ENTRIES = st.one_of(
    _PATHS.map(folder),
    _PATHS.map(file),
    st.builds(link, _PATHS, _TARGETS),
)


@_SETTINGS
@given(st.lists(_ENTRIES, max_size=6))
@example([link("s", "."), link("x", "s/..")])
@example([link("a/s", ".."), link("x", "a/s/../b")])
@example([folder("a"), link("a/s", ".."), link("x", "a/s/.."), file("x")])
@example([link("s", "a/.."), link("x", "s/../s/..")])
def test_no_accepted_manifest_reaches_outside(entries: list[Entry]) -> None:
    try:
        check_entries(entries)
    except UnsafeEntryError:
        return
    paths = [entry[0] for entry in entries]
    assert len(paths) == len(set(paths))
    for path, mode, _, _, target in entries:
        parent = path.split("/")[:-1]
        # Writing the entry: every folder on its way is a real folder, not a link.
        assert _resolve(entries, [], path) is not _ESCAPED
        if stat.S_ISLNK(mode):
            # Reading through it later (the builder, COPY): it stays inside.
            assert _resolve(entries, parent, target) is not _ESCAPED, (path, target)
