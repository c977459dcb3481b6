"""farm.health: step the machine, assert the whole state; rejected events change nothing."""

from __future__ import annotations

import math
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.errors import InputError
from farm.health import (
    ADMIN_TRANSITIONS,
    BACKOFF_CAP,
    HEALTH_TRANSITIONS,
    PROBE_INTERVAL,
    Admin,
    AdminEvent,
    Event,
    Health,
    HealthEvent,
    NodeHealth,
    backoff,
)

_SETTINGS = settings(database=None, deadline=None, max_examples=200)

ADMINS: tuple[Admin, ...] = get_args(Admin)
HEALTHS: tuple[Health, ...] = get_args(Health)
HEALTH_EVENTS: tuple[HealthEvent, ...] = get_args(HealthEvent)
ADMIN_EVENTS: tuple[AdminEvent, ...] = get_args(AdminEvent)
EVENTS: tuple[Event, ...] = HEALTH_EVENTS + ADMIN_EVENTS


def test_a_new_node_is_down_and_due_for_a_probe() -> None:
    node = NodeHealth("pi")
    assert node == NodeHealth("pi", admin="active", health="down", failures=0, back_at=None, last_seen=None)
    assert node.state == "down"
    assert node.due_for_probe(0.0)


def test_a_life_probes_heartbeats_quarantine_and_backoff() -> None:
    node = NodeHealth("pi").apply("probe_passed", 10.0)
    assert node == NodeHealth("pi", health="up", last_seen=10.0)
    assert not node.due_for_probe(10.0 + PROBE_INTERVAL - 0.1)
    assert node.due_for_probe(10.0 + PROBE_INTERVAL)

    node = node.apply("heartbeat", 20.0)
    assert node == NodeHealth("pi", health="up", last_seen=20.0)

    # A node fault during a build: quarantined, held back 30 s.
    node = node.apply("build_failed_node_fault", 30.0)
    assert node == NodeHealth("pi", health="quarantined", failures=1, back_at=60.0, last_seen=20.0)
    assert node.state == "quarantined"
    assert not node.due_for_probe(59.9)
    assert node.due_for_probe(60.0)

    # Its other builds die of the same incident: nothing grows (Rule 3).
    same = node.apply("build_failed_node_fault", 31.0).apply("heartbeat_lost", 32.0).apply("heartbeat", 33.0)
    assert same == node

    # Each failed probe doubles the wait...
    node = node.apply("probe_failed", 60.0)
    assert node == NodeHealth("pi", health="quarantined", failures=2, back_at=120.0, last_seen=20.0)
    node = node.apply("probe_failed", 120.0)
    assert node == NodeHealth("pi", health="quarantined", failures=3, back_at=240.0, last_seen=20.0)

    # ...and a passing one lets it back, forgetting the failures.
    node = node.apply("probe_passed", 240.0)
    assert node == NodeHealth("pi", health="up", last_seen=240.0)

    # The next failure starts the backoff afresh.
    node = node.apply("probe_failed", 300.0)
    assert node == NodeHealth("pi", health="down", failures=1, back_at=330.0, last_seen=240.0)
    assert node.state == "down"


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (5, 480.0), (6, 600.0), (7, 600.0), (10_000, 600.0)],
)
def test_backoff_doubles_from_30_s_and_stops_at_10_min(failures: int, seconds: float) -> None:
    assert backoff(failures) == seconds


def test_backoff_needs_a_failure() -> None:
    with pytest.raises(ValueError, match="at least one failure"):
        backoff(0)


def test_the_backoff_is_capped_however_long_a_node_fails() -> None:
    node = NodeHealth("pi")
    for step in range(50):
        node = node.apply("probe_failed", float(step))
    assert node == NodeHealth("pi", health="down", failures=50, back_at=49.0 + BACKOFF_CAP)


# Every health event in every health state, from one starting point: 2 failures, held back until
# 100, last seen at 50, the event at 70. The whole resulting state is written out.
_BEFORE = {"failures": 2, "back_at": 100.0, "last_seen": 50.0}
_HEALTH_CASES: dict[tuple[Health, HealthEvent], NodeHealth] = {
    ("up", "probe_passed"): NodeHealth("n", health="up", failures=0, back_at=None, last_seen=70.0),
    ("up", "probe_failed"): NodeHealth("n", health="down", failures=3, back_at=190.0, last_seen=50.0),
    ("up", "heartbeat"): NodeHealth("n", health="up", failures=2, back_at=100.0, last_seen=70.0),
    ("up", "heartbeat_lost"): NodeHealth(
        "n", health="quarantined", failures=3, back_at=190.0, last_seen=50.0
    ),
    ("up", "build_failed_node_fault"): NodeHealth(
        "n", health="quarantined", failures=3, back_at=190.0, last_seen=50.0
    ),
    ("down", "probe_passed"): NodeHealth("n", health="up", failures=0, back_at=None, last_seen=70.0),
    ("down", "probe_failed"): NodeHealth("n", health="down", failures=3, back_at=190.0, last_seen=50.0),
    ("down", "heartbeat"): NodeHealth("n", health="down", failures=2, back_at=100.0, last_seen=50.0),
    ("down", "heartbeat_lost"): NodeHealth(
        "n", health="quarantined", failures=2, back_at=100.0, last_seen=50.0
    ),
    ("down", "build_failed_node_fault"): NodeHealth(
        "n", health="quarantined", failures=2, back_at=100.0, last_seen=50.0
    ),
    ("quarantined", "probe_passed"): NodeHealth("n", health="up", failures=0, back_at=None, last_seen=70.0),
    ("quarantined", "probe_failed"): NodeHealth(
        "n", health="quarantined", failures=3, back_at=190.0, last_seen=50.0
    ),
    ("quarantined", "heartbeat"): NodeHealth(
        "n", health="quarantined", failures=2, back_at=100.0, last_seen=50.0
    ),
    ("quarantined", "heartbeat_lost"): NodeHealth(
        "n", health="quarantined", failures=2, back_at=100.0, last_seen=50.0
    ),
    ("quarantined", "build_failed_node_fault"): NodeHealth(
        "n", health="quarantined", failures=2, back_at=100.0, last_seen=50.0
    ),
}


def test_the_cases_cover_the_health_table() -> None:
    assert set(_HEALTH_CASES) == {(h, e) for h in HEALTHS for e in HEALTH_EVENTS}
    assert {(h, e) for h in HEALTH_TRANSITIONS for e in HEALTH_TRANSITIONS[h]} == set(_HEALTH_CASES)


@pytest.mark.parametrize("admin", ADMINS)
@pytest.mark.parametrize(("health", "event"), sorted(_HEALTH_CASES))
def test_every_health_event_in_every_state(admin: Admin, health: Health, event: HealthEvent) -> None:
    # Health events work alike whatever the operator said (Rule 2): only the admin part stays.
    before = NodeHealth("n", admin=admin, health=health, **_BEFORE)  # type: ignore[arg-type]
    after = before.apply(event, 70.0)
    expected = _HEALTH_CASES[(health, event)]
    assert after == NodeHealth(
        "n",
        admin=admin,
        health=expected.health,
        failures=expected.failures,
        back_at=expected.back_at,
        last_seen=expected.last_seen,
    )
    assert before.accepts(event)


# Every admin event in every admin state: the resulting admin part, or None when it is refused.
_ADMIN_CASES: dict[tuple[Admin, AdminEvent], Admin | None] = {
    ("active", "drain"): "draining",
    ("active", "undrain"): None,
    ("active", "cordon"): "cordoned",
    ("active", "uncordon"): None,
    ("draining", "drain"): None,
    ("draining", "undrain"): "active",
    ("draining", "cordon"): "cordoned",
    ("draining", "uncordon"): None,
    ("cordoned", "drain"): None,
    ("cordoned", "undrain"): None,
    ("cordoned", "cordon"): None,
    ("cordoned", "uncordon"): "active",
}


def test_the_cases_cover_the_admin_table() -> None:
    assert set(_ADMIN_CASES) == {(a, e) for a in ADMINS for e in ADMIN_EVENTS}
    legal = {(a, e): target for a, row in ADMIN_TRANSITIONS.items() for e, target in row.items()}
    assert legal == {key: target for key, target in _ADMIN_CASES.items() if target is not None}


@pytest.mark.parametrize(("admin", "event"), sorted(_ADMIN_CASES))
def test_every_admin_event_in_every_state(admin: Admin, event: AdminEvent) -> None:
    before = NodeHealth("pi", admin=admin, health="quarantined", failures=2, back_at=100.0, last_seen=50.0)
    target = _ADMIN_CASES[(admin, event)]
    assert before.accepts(event) == (target is not None)
    if target is None:
        with pytest.raises(InputError) as caught:
            before.apply(event, 70.0)
        # Refused: the message names the node, what it is and what was asked; nothing changed.
        assert caught.value.message == f"pi is {before.state}: it cannot {event} now"
        assert caught.value.hint == "what it can do now: " + " or ".join(sorted(ADMIN_TRANSITIONS[admin]))
        assert before == NodeHealth(
            "pi", admin=admin, health="quarantined", failures=2, back_at=100.0, last_seen=50.0
        )
        return
    after = before.apply(event, 70.0)
    if event == "uncordon":
        # Rule 4: back down, no failures counted, due for a probe at once.
        assert after == NodeHealth(
            "pi", admin="active", health="down", failures=0, back_at=None, last_seen=50.0
        )
        assert after.due_for_probe(70.0)
    else:
        assert after == NodeHealth(
            "pi", admin=target, health="quarantined", failures=2, back_at=100.0, last_seen=50.0
        )


def test_an_unknown_event_is_a_bug_and_changes_nothing() -> None:
    node = NodeHealth("pi", health="up", last_seen=1.0)
    with pytest.raises(ValueError, match="unknown health event 'reboot'"):
        node.apply("reboot", 2.0)  # type: ignore[arg-type]
    assert node == NodeHealth("pi", health="up", last_seen=1.0)
    assert not node.accepts("reboot")  # type: ignore[arg-type]


@pytest.mark.parametrize("admin", ADMINS)
@pytest.mark.parametrize("health", HEALTHS)
def test_the_operator_s_word_comes_first_in_the_state(admin: Admin, health: Health) -> None:
    node = NodeHealth("pi", admin=admin, health=health)
    assert node.state == (health if admin == "active" else admin)


@pytest.mark.parametrize(
    ("node", "now", "due"),
    [
        (NodeHealth("n"), 0.0, True),  # never probed
        (NodeHealth("n", health="down", failures=1, back_at=30.0), 29.0, False),
        (NodeHealth("n", health="down", failures=1, back_at=30.0), 30.0, True),
        (NodeHealth("n", health="quarantined", failures=1, back_at=30.0), 29.0, False),
        (NodeHealth("n", health="quarantined", failures=1, back_at=30.0), 31.0, True),
        (NodeHealth("n", health="up", last_seen=None), 0.0, True),
        (NodeHealth("n", health="up", last_seen=100.0), 100.0 + PROBE_INTERVAL - 1, False),
        (NodeHealth("n", health="up", last_seen=100.0), 100.0 + PROBE_INTERVAL, True),
        # Draining nodes are still watched...
        (NodeHealth("n", admin="draining", health="up", last_seen=0.0), PROBE_INTERVAL, True),
        (NodeHealth("n", admin="draining", health="down"), 0.0, True),
        # ...cordoned ones are left alone.
        (NodeHealth("n", admin="cordoned", health="down"), 1e9, False),
        (NodeHealth("n", admin="cordoned", health="up", last_seen=0.0), 1e9, False),
    ],
)
def test_due_for_probe(node: NodeHealth, now: float, due: bool) -> None:
    assert node.due_for_probe(now) == due


def test_a_drained_node_keeps_its_health_when_undrained() -> None:
    node = NodeHealth("pi", health="up", last_seen=0.0).apply("drain", 1.0)
    assert node == NodeHealth("pi", admin="draining", health="up", last_seen=0.0)
    assert node.state == "draining"
    node = node.apply("heartbeat_lost", 2.0)
    assert node == NodeHealth(
        "pi", admin="draining", health="quarantined", failures=1, back_at=32.0, last_seen=0.0
    )
    assert node.state == "draining"
    node = node.apply("undrain", 3.0)
    assert node == NodeHealth("pi", health="quarantined", failures=1, back_at=32.0, last_seen=0.0)
    assert node.state == "quarantined"


def test_cordoning_a_draining_node_then_uncordoning_it() -> None:
    node = NodeHealth("pi", health="up", last_seen=0.0).apply("drain", 1.0).apply("cordon", 2.0)
    assert node == NodeHealth("pi", admin="cordoned", health="up", last_seen=0.0)
    with pytest.raises(InputError):
        node.apply("undrain", 3.0)
    assert node == NodeHealth("pi", admin="cordoned", health="up", last_seen=0.0)
    node = node.apply("uncordon", 4.0)
    assert node == NodeHealth("pi", health="down", last_seen=0.0)
    assert node.state == "down"


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[Event, float]]:
    events = draw(st.lists(st.sampled_from(EVENTS), max_size=40))
    gaps = draw(st.lists(st.floats(0, 1000, allow_nan=False), min_size=len(events), max_size=len(events)))
    times, now = [], 0.0
    for gap in gaps:
        now += gap
        times.append(now)
    return list(zip(events, times, strict=True))


@_SETTINGS
@given(histories())
def test_any_history_keeps_the_invariants(events: list[tuple[Event, float]]) -> None:
    node = NodeHealth("n")
    grown_at: float | None = None
    for event, now in events:
        before = node
        if not node.accepts(event):
            with pytest.raises(InputError):
                node.apply(event, now)
            assert node == before
            continue
        node = node.apply(event, now)
        if node.failures > before.failures:
            grown_at = now
        assert node.name == "n"
        assert node.state in ("up", "down", "draining", "cordoned", "quarantined")
        # Up means proven: no failures, nothing held back.
        if node.health == "up":
            assert (node.failures, node.back_at) == (0, None)
        # Only a passing probe lets a node up (Rule 3).
        if node.health == "up" and before.health != "up":
            assert event == "probe_passed"
        # Held back by the backoff, and never longer than the cap.
        if node.failures:
            assert node.back_at is not None
            assert grown_at is not None
            assert math.isclose(node.back_at - grown_at, backoff(node.failures))
            assert node.back_at - grown_at <= BACKOFF_CAP
        # Admin events never touch the health except uncordon (Rule 4); health events never the admin.
        if event in HEALTH_EVENTS:
            assert node.admin == before.admin
        elif event != "uncordon":
            assert (node.health, node.failures, node.back_at) == (
                before.health,
                before.failures,
                before.back_at,
            )
        if node.admin == "cordoned":
            assert not node.due_for_probe(now)
