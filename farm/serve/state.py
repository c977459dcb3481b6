"""The server's state folder: its token, its lock, its build history, its content store.

    STATE/token             the bearer token every request needs (0600; created at first start)
    STATE/serve.lock        held while a server runs: two servers never share one folder
    STATE/history.sqlite3   every build and platform (``history.History``)
    STATE/drained.json      drained nodes, shared with ``farm nodes drain`` (``farm.drain.DrainState``)
    STATE/store/            contexts received from clients (``agent.store.ContentStore``); builds
                            read them there (``farm.serve.contexts.ContextStore.context``)

Everything that can make the folder unusable is found here, at start, and said plainly. At every
start the folder and what it holds are made private to this user (folders 0700, files without
group and other bits: 0600, blobs 0400), however they were left: the history names every image,
tag and submitter, the store holds every context.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.store import ContentStore
from farm.drain import DrainState
from farm.errors import InputError
from farm.serve.history import History

__all__ = ["StateFolder", "open_state"]

_TOKEN_BYTES = 32


@dataclass
class StateFolder:
    root: Path
    token: str
    history: History
    store: ContentStore
    drain: DrainState
    token_file: Path | None  # None: the token was given
    _lock: IO[bytes]

    def close(self) -> None:
        self.history.close()
        self._lock.close()  # releases the flock


def open_state(root: Path, token: str | None = None) -> StateFolder:
    """Open (creating if need be) the state folder; ``token`` given: use it instead of STATE/token."""
    root = root.expanduser()
    hint = "pass --state-dir with a folder this user can write, or fix its owner and permissions"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a folder")
        # Prove it is writable here rather than halfway through the first build.
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise InputError(f"the state folder {root} is unusable: {_reason(exc)}", hint=hint) from exc
    lock = _lock(root)
    try:
        given = token is not None
        token = _check_token(token) if token is not None else _load_or_create_token(root / "token")
        try:
            store = ContentStore(str(root / "store"))
            (root / "store" / "incoming").mkdir(mode=0o700, exist_ok=True)
            _remove_leftovers(root)
        except OSError as exc:
            raise InputError(f"the state folder {root} is unusable: {_reason(exc)}", hint=hint) from exc
        history = History.open(root / "history.sqlite3")
        try:
            _make_private(root)
        except OSError as exc:
            history.close()
            raise InputError(
                f"cannot make the state folder {root} private to this user: {_reason(exc)}", hint=hint
            ) from exc
    except BaseException:
        lock.close()
        raise
    token_file = None if given else root / "token"
    return StateFolder(root, token, history, store, DrainState(root), token_file, lock)


# What the folder holds, below it: each is made private at start. Blobs are not walked (there may
# be a million): no other user can reach them through a private folder.
_FOLDERS = ("store", "store/cas", "store/cas/sha256", "store/contexts", "store/leases", "store/incoming")
# What an older farm serve kept and nothing reads any more: contexts laid out as folders (copies of
# the store's) and the Dockerfiles of running builds.
_LEFTOVERS = ("layouts", "work")


def _remove_leftovers(root: Path) -> None:
    for name in _LEFTOVERS:
        folder = root / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        # Laid-out contexts kept their modes: read-only folders are opened up before they are emptied
        # (top-down, each before the walk enters it; links are never followed).
        folder.chmod(0o700)
        for parent, children, _ in os.walk(folder):
            for child in children:
                inner = os.path.join(parent, child)
                if not os.path.islink(inner):
                    os.chmod(inner, 0o700)
        shutil.rmtree(folder)


def _make_private(root: Path) -> None:
    """Take group and other permissions off the folder, its own files and its folders."""
    paths = [root, *(root / name for name in _FOLDERS)]
    paths += [child for child in root.iterdir() if not child.is_symlink() and child.is_file()]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode & 0o077:
                path.chmod(mode & 0o700)


def _lock(root: Path) -> IO[bytes]:
    path = root / "serve.lock"
    try:
        handle = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    except OSError as exc:
        raise InputError(f"the state folder {root} is unusable: {_reason(exc)}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InputError(
            f"another farm serve is using the state folder {root}",
            hint="stop it, or give this one its own --state-dir",
        ) from None
    return handle


def _check_token(token: str) -> str:
    token = token.strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise InputError(
            "the server token must be at least 16 characters without spaces",
            hint="leave --token out and farm serve creates one in the state folder",
        )
    return token


def _load_or_create_token(path: Path) -> str:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as exc:
        raise InputError(f"cannot create the server token {path}: {_reason(exc)}") from exc
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def _read_token(path: Path) -> str:
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read the server token {path}: {_reason(exc)}") from exc
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise InputError(
            f"the server token {path} is readable by other users",
            hint=f"chmod 600 {path}",
        )
    with contextlib.suppress(InputError):
        return _check_token(text)
    raise InputError(f"the server token {path} is empty or malformed", hint="remove it to get a new one")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
