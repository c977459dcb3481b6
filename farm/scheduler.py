"""Which node builds which platform, and why: native hardware first, QEMU only where allowed.

Pure: no I/O here. The orchestration gathers ``Candidate``s from the inventory and the probes,
and gets back one ``Assignment`` per platform, each with a reason a user can read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from farm.errors import PlanError
from farm.platforms import Platform

__all__ = ["Assignment", "Candidate", "Mode", "plan_build"]

Mode = Literal["native", "emulated"]


@dataclass(frozen=True)
class Candidate:
    """A usable node as the scheduler sees it."""

    name: str
    native: frozenset[Platform]
    emulated: frozenset[Platform]
    emulation_allowed: bool
    slots: int

    def mode_for(self, platform: Platform) -> Mode | None:
        if platform in self.native:
            return "native"
        if self.emulation_allowed and platform in self.emulated:
            return "emulated"
        return None


@dataclass(frozen=True)
class Assignment:
    platform: Platform
    node: str
    mode: Mode
    reason: str


def plan_build(platforms: Sequence[Platform], candidates: Sequence[Candidate]) -> list[Assignment]:
    """Assign every platform to a node, spreading load; raise ``PlanError`` naming what is missing.

    Native nodes win over emulating ones whatever their load; among equals the node with the
    fewest builds per slot already planned wins, then inventory order.
    """
    planned: dict[str, int] = {candidate.name: 0 for candidate in candidates}
    assignments: list[Assignment] = []
    missing: list[Platform] = []
    for platform in platforms:
        native = [c for c in candidates if c.mode_for(platform) == "native"]
        emulated = [c for c in candidates if c.mode_for(platform) == "emulated"]
        pool, mode = (native, "native") if native else (emulated, "emulated")
        if not pool:
            missing.append(platform)
            continue
        chosen = min(pool, key=lambda c: (planned[c.name] / c.slots, candidates.index(c)))
        planned[chosen.name] += 1
        if mode == "native":
            reason = f"{chosen.name} runs {platform} natively"
        else:
            reason = f"no node runs {platform} natively; {chosen.name} emulates it with QEMU"
        assignments.append(Assignment(platform, chosen.name, mode, reason))  # type: ignore[arg-type]
    if missing:
        raise PlanError(
            f"no node can build {', '.join(str(p) for p in missing)}",
            hint=_describe_capacity(candidates),
        )
    return assignments


def _describe_capacity(candidates: Iterable[Candidate]) -> str:
    parts = []
    for candidate in candidates:
        native = ", ".join(sorted(str(p) for p in candidate.native)) or "nothing"
        text = f"{candidate.name} builds {native} natively"
        if candidate.emulated:
            emulated = ", ".join(sorted(str(p) for p in candidate.emulated))
            allowed = "" if candidate.emulation_allowed else " (but emulation is off for it)"
            text += f" and can emulate {emulated}{allowed}"
        parts.append(text)
    if not parts:
        return "no node of the inventory is usable"
    return (
        "the inventory has: "
        + "; ".join(parts)
        + (". Add a node for the missing platform, or register its QEMU handler (deploy/lab/setup.sh)")
    )
