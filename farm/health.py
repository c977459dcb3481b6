"""A node's health as a pure state machine: probes between builds, heartbeats during builds.

The orchestration owns the probes, heartbeats, clocks and operator commands; it feeds what happened
here as events, with the time, and gets back a new ``NodeHealth``. ``NodeHealth.state`` is what
the scheduler sees (``NodeView.state``); ``back_at`` and ``due_for_probe`` say when to look again.

Rule 1: everything that decides a transition lives in this file: the two tables below, the
backoff, and the few rules that do not fit a table (Rules 3 and 4). Nothing here does I/O or
reads a clock: ``now`` (seconds, from any clock the caller keeps consistent) comes in with each
event.

Rule 2: a node has two independent parts, each with its own table. *What the operator wants*
(``admin``): active, draining (finish what runs, take nothing new; still probed and watched),
cordoned (take nothing new and leave it alone: no probes, it may be under maintenance). *What the
node shows* (``health``): up, down (never probed, or its last probe failed), quarantined (it
failed us during a build: a lost heartbeat or a node fault). Health events are legal in every
health state, because probes, heartbeats and build results of concurrent builds arrive in any
order; admin events are legal only where the table says (undraining a node that is not draining
is a mistake worth reporting). The one ``state`` the scheduler sees is ``cordoned`` or
``draining`` when the operator said so, else the health.

Rule 3: a failure grows the backoff, a passing probe resets it. Failing a probe, or failing while
up, counts one more consecutive failure and holds the node back for 30 s, doubled per failure
and capped at 10 min; only a passing probe lets a down or quarantined node back up. A further
build failure or lost heartbeat while the node is already held back is the same incident and
grows nothing (a node running four builds that dies must not be held back 2^4 times longer).

Rule 4: uncordoning forgets the node's health: it comes back down, with no failures counted, and
due for a probe at once, because whatever was done to it while cordoned is unknown.

Rule 5: an illegal event raises ``InputError`` and changes nothing (``NodeHealth`` is frozen;
``apply`` returns a new value or raises).

What feeds it today: ``farm.pool``, the one owner of every node's health in a process, with probe
results, builds' node faults (``farm.dispatch``), sign of life from a build's events as
``heartbeat`` (``farm.build``), and the drained list as ``drain``/``undrain``. ``heartbeat_lost``,
``cordon`` and ``uncordon`` are part of the model (the scheduler and the metrics know
``cordoned``), but nothing produces them yet: a connection lost during a build arrives as a node
fault, and no command cordons a node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from farm.errors import InputError

__all__ = [
    "ADMIN_TRANSITIONS",
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "HEALTH_TRANSITIONS",
    "PROBE_INTERVAL",
    "Admin",
    "AdminEvent",
    "Effect",
    "Event",
    "Health",
    "HealthEvent",
    "NodeHealth",
    "State",
    "backoff",
]

Admin = Literal["active", "draining", "cordoned"]
Health = Literal["up", "down", "quarantined"]
State = Literal["up", "down", "draining", "cordoned", "quarantined"]
HealthEvent = Literal[
    "probe_passed", "probe_failed", "heartbeat", "heartbeat_lost", "build_failed_node_fault"
]
AdminEvent = Literal["drain", "undrain", "cordon", "uncordon"]
Event = HealthEvent | AdminEvent

# What an event does besides moving the health (Rule 3):
#   reset: the node proved itself: no failures, not held back, seen now
#   grow:  one more consecutive failure: held back until now + backoff(failures)
#   seen:  a sign of life during a build: remember when
#   keep:  nothing else changes
Effect = Literal["reset", "grow", "seen", "keep"]

BACKOFF_BASE = 30.0  # seconds held back after the first failure
BACKOFF_CAP = 600.0  # never held back longer than this
PROBE_INTERVAL = 60.0  # an up node not heard from for this long is probed before new work

HEALTH_TRANSITIONS: dict[Health, dict[HealthEvent, tuple[Health, Effect]]] = {
    "up": {
        "probe_passed": ("up", "reset"),
        "probe_failed": ("down", "grow"),
        "heartbeat": ("up", "seen"),
        "heartbeat_lost": ("quarantined", "grow"),
        "build_failed_node_fault": ("quarantined", "grow"),
    },
    "down": {
        "probe_passed": ("up", "reset"),
        "probe_failed": ("down", "grow"),
        # A build that was running when a probe failed; it proves nothing either way.
        "heartbeat": ("down", "keep"),
        "heartbeat_lost": ("quarantined", "keep"),
        "build_failed_node_fault": ("quarantined", "keep"),
    },
    "quarantined": {
        "probe_passed": ("up", "reset"),
        "probe_failed": ("quarantined", "grow"),
        "heartbeat": ("quarantined", "keep"),
        "heartbeat_lost": ("quarantined", "keep"),
        "build_failed_node_fault": ("quarantined", "keep"),
    },
}

ADMIN_TRANSITIONS: dict[Admin, dict[AdminEvent, Admin]] = {
    "active": {"drain": "draining", "cordon": "cordoned"},
    "draining": {"undrain": "active", "cordon": "cordoned"},
    "cordoned": {"uncordon": "active"},
}

_HEALTH_EVENTS: frozenset[str] = frozenset(get_args(HealthEvent))
_ADMIN_EVENTS: frozenset[str] = frozenset(get_args(AdminEvent))


def backoff(failures: int) -> float:
    """How long a node with ``failures`` consecutive failures (at least 1) is held back."""
    if failures < 1:
        raise ValueError(f"backoff needs at least one failure, got {failures}")
    # Cap the exponent too: 2 ** 10_000 as a float overflows.
    return min(BACKOFF_BASE * 2.0 ** min(failures - 1, 32), BACKOFF_CAP)


@dataclass(frozen=True)
class NodeHealth:
    """One node's health; a new node has never been probed, so it is down and due for a probe."""

    name: str
    admin: Admin = "active"
    health: Health = "down"
    failures: int = 0  # consecutive, since the last passing probe
    back_at: float | None = None  # a down/quarantined node is held back until then (None: due now)
    last_seen: float | None = None  # the last passing probe or heartbeat

    @property
    def state(self) -> State:
        """What the scheduler sees: the operator's word first, then the health (Rule 2)."""
        if self.admin != "active":
            return self.admin
        return self.health

    def due_for_probe(self, now: float) -> bool:
        """Should the orchestration probe this node now?

        Never while cordoned; a down or quarantined node once its backoff is over; an up (or
        draining) node not heard from for ``PROBE_INTERVAL``, so no build goes to a node that
        died quietly since its last build.
        """
        if self.admin == "cordoned":
            return False
        if self.health == "up":
            return self.last_seen is None or now - self.last_seen >= PROBE_INTERVAL
        return self.back_at is None or now >= self.back_at

    def accepts(self, event: Event) -> bool:
        """Whether ``apply(event, ...)`` would succeed."""
        if event in _HEALTH_EVENTS:
            return True
        return event in ADMIN_TRANSITIONS[self.admin]

    def apply(self, event: Event, now: float) -> NodeHealth:
        """The health after ``event`` happened at ``now``; raise ``InputError`` if it cannot happen."""
        if event in _ADMIN_EVENTS:
            return self._apply_admin(event)  # type: ignore[arg-type]
        if event not in _HEALTH_EVENTS:
            raise ValueError(f"unknown health event {event!r}")
        health, effect = HEALTH_TRANSITIONS[self.health][event]  # type: ignore[index]
        if effect == "reset":
            return replace(self, health=health, failures=0, back_at=None, last_seen=now)
        if effect == "grow":
            failures = self.failures + 1
            return replace(self, health=health, failures=failures, back_at=now + backoff(failures))
        if effect == "seen":
            return replace(self, health=health, last_seen=now)
        return replace(self, health=health)

    def _apply_admin(self, event: AdminEvent) -> NodeHealth:
        row = ADMIN_TRANSITIONS[self.admin]
        if event not in row:
            possible = " or ".join(sorted(row))
            raise InputError(
                f"{self.name} is {self.state}: it cannot {event} now",
                hint=f"what it can do now: {possible}",
            )
        admin = row[event]
        if event == "uncordon":  # Rule 4
            return replace(self, admin=admin, health="down", failures=0, back_at=None)
        return replace(self, admin=admin)
