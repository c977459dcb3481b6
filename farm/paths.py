"""Where farm keeps its own files on the coordinator, in one place."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CACHE_DIR", "FARM_KNOWN_HOSTS", "STATE_DIR", "USER_KNOWN_HOSTS"]

CACHE_DIR = Path.home() / ".cache" / "farm"  # agent zipapps, stat caches, the local node's workdir
STATE_DIR = Path.home() / ".local" / "state" / "farm"  # drained nodes
FARM_KNOWN_HOSTS = Path.home() / ".config" / "farm" / "known_hosts"  # keys pinned by `farm nodes add`
USER_KNOWN_HOSTS = Path.home() / ".ssh" / "known_hosts"
