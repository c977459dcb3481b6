"""Which nodes are drained, kept in farm's state folder for ``farm nodes drain`` and ``farm serve``.

Apart from ``farm.nodes``, which reaches and probes nodes: every ``farm build`` reads this file,
and a build that dispatches nothing (every platform reused) does not import what dispatching needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from farm.errors import InputError

__all__ = ["DrainState"]


class DrainState:
    """Which nodes are drained (take no new work), kept in farm's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "drained.json"

    def load(self) -> frozenset[str]:
        try:
            names = json.loads(self.path.read_text())
        except FileNotFoundError:
            return frozenset()
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {self.path}: {exc}", hint="fix or remove the file") from exc
        return frozenset(str(name) for name in names)

    def set(self, name: str, drained: bool) -> bool:
        """Drain or undrain ``name``; True if that changed anything."""
        current = set(self.load())
        if (name in current) == drained:
            return False
        current.symmetric_difference_update({name})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}")
        partial.write_text(json.dumps(sorted(current)) + "\n")
        partial.replace(self.path)
        return True
