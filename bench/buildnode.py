"""The local node's workdir in a benchmark: the agent runs as the unprivileged build user.

farm runs the local node's agent as ``farm-build`` (see README, *Security*), so its workdir must be
that user's, under folders it can traverse; a benchmark's scratch folder (``mktemp``: root's
alone) is opened for traversal only, never for listing.
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

BUILD_USER = "farm-build"


def build_user_workdir(path: Path) -> Path:
    """Make ``path`` (a new folder) the build user's, and let it reach it from ``/``."""
    entry = pwd.getpwnam(BUILD_USER)
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o011)
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
