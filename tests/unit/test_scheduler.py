"""farm.scheduler: native hardware first whatever its load, QEMU only where allowed, load spread by slots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.errors import PlanError
from farm.platforms import KNOWN_PLATFORMS, Platform
from farm.scheduler import Assignment, Candidate, plan_build

_SETTINGS = settings(database=None, deadline=None, max_examples=50)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
ARM_V7 = Platform("linux", "arm", "v7")
S390X = Platform("linux", "s390x")
PPC64LE = Platform("linux", "ppc64le")


def node(
    name: str,
    native: set[Platform],
    emulated: set[Platform] = frozenset(),  # type: ignore[assignment]
    *,
    emulation: bool = True,
    slots: int = 1,
) -> Candidate:
    return Candidate(name, frozenset(native), frozenset(emulated), emulation, slots)


def where(assignments: list[Assignment]) -> dict[str, tuple[str, str]]:
    return {str(a.platform): (a.node, a.mode) for a in assignments}


def test_each_platform_goes_to_its_native_node() -> None:
    x86 = node("x86", {AMD64}, {ARM64, ARM_V7, S390X})
    pi = node("pi", {ARM64})
    plan = plan_build([AMD64, ARM64], [x86, pi])
    assert plan == [
        Assignment(AMD64, "x86", "native", "x86 runs linux/amd64 natively"),
        Assignment(ARM64, "pi", "native", "pi runs linux/arm64 natively"),
    ]


def test_native_wins_over_emulation_whatever_the_load() -> None:
    # The emulating node is idle with many slots; the native one is already busy: native still wins.
    x86 = node("x86", {AMD64}, {ARM64}, slots=64)
    pi = node("pi", {ARM64, ARM_V7}, slots=1)
    plan = plan_build([ARM64, ARM_V7], [x86, pi])
    assert where(plan) == {"linux/arm64": ("pi", "native"), "linux/arm/v7": ("pi", "native")}


def test_emulation_when_no_node_is_native() -> None:
    x86 = node("x86", {AMD64}, {S390X})
    [assignment] = plan_build([S390X], [x86])
    assert (assignment.node, assignment.mode) == ("x86", "emulated")
    assert assignment.reason == "no node runs linux/s390x natively; x86 emulates it with QEMU"


def test_a_node_with_emulation_off_does_not_emulate() -> None:
    strict = node("strict", {AMD64}, {S390X}, emulation=False)
    lenient = node("lenient", {ARM64}, {S390X})
    assert where(plan_build([S390X], [strict, lenient])) == {"linux/s390x": ("lenient", "emulated")}
    # Emulation off still lets a node build what it runs natively.
    assert where(plan_build([AMD64], [strict])) == {"linux/amd64": ("strict", "native")}


def test_load_is_spread_over_equal_nodes() -> None:
    a = node("a", {AMD64}, {S390X, PPC64LE, ARM64, ARM_V7})
    b = node("b", {AMD64}, {S390X, PPC64LE, ARM64, ARM_V7})
    plan = plan_build([S390X, PPC64LE, ARM64, ARM_V7], [a, b])
    assert [x.node for x in plan] == ["a", "b", "a", "b"]


def test_load_is_measured_per_slot() -> None:
    big = node("big", {AMD64}, {S390X, PPC64LE, ARM64, ARM_V7}, slots=3)
    small = node("small", {AMD64}, {S390X, PPC64LE, ARM64, ARM_V7}, slots=1)
    plan = plan_build([S390X, PPC64LE, ARM64, ARM_V7], [small, big])
    # small: 0/1 -> first; then big 0/3, 1/3, 2/3 all lighter than small's 1/1.
    assert [x.node for x in plan] == ["small", "big", "big", "big"]


def test_ties_go_to_the_earlier_node_of_the_inventory() -> None:
    first = node("first", {ARM64})
    second = node("second", {ARM64})
    assert plan_build([ARM64], [first, second])[0].node == "first"
    assert plan_build([ARM64], [second, first])[0].node == "second"


def test_assignments_follow_the_requested_order() -> None:
    x86 = node("x86", {AMD64}, {S390X, ARM64})
    pi = node("pi", {ARM64})
    plan = plan_build([S390X, ARM64, AMD64], [x86, pi])
    assert [a.platform for a in plan] == [S390X, ARM64, AMD64]


def test_no_platforms_no_assignments() -> None:
    assert plan_build([], [node("a", {AMD64})]) == []


def test_missing_platforms_are_named_and_the_capacity_described() -> None:
    x86 = node("x86", {AMD64, Platform("linux", "386")}, {ARM64, S390X}, emulation=False)
    pi = node("pi", {ARM64})
    with pytest.raises(PlanError) as caught:
        plan_build([AMD64, S390X, ARM64, PPC64LE], [x86, pi])
    error = caught.value
    assert error.message == "no node can build linux/s390x, linux/ppc64le"
    assert error.hint is not None
    assert "x86 builds linux/386, linux/amd64 natively" in error.hint
    assert "can emulate linux/arm64, linux/s390x (but emulation is off for it)" in error.hint
    assert "pi builds linux/arm64 natively" in error.hint
    assert "QEMU" in error.hint


def test_no_usable_node_at_all() -> None:
    with pytest.raises(PlanError) as caught:
        plan_build([AMD64], [])
    assert caught.value.hint == "no node of the inventory is usable"


def test_a_node_with_nothing_native_is_described_as_such() -> None:
    with pytest.raises(PlanError) as caught:
        plan_build([S390X], [node("odd", set())])
    assert caught.value.hint is not None
    assert "odd builds nothing natively" in caught.value.hint


_PLATFORMS = st.sampled_from(KNOWN_PLATFORMS)


@st.composite
def inventories(draw: st.DrawFn) -> list[Candidate]:
    count = draw(st.integers(1, 5))
    return [
        Candidate(
            f"n{index}",
            frozenset(draw(st.sets(_PLATFORMS, max_size=2))),
            frozenset(draw(st.sets(_PLATFORMS, max_size=4))),
            draw(st.booleans()),
            draw(st.integers(1, 4)),
        )
        for index in range(count)
    ]


@_SETTINGS
@given(inventories(), st.lists(_PLATFORMS, unique=True, max_size=6))
def test_every_plan_is_sound(candidates: list[Candidate], platforms: list[Platform]) -> None:
    by_name = {c.name: c for c in candidates}
    buildable = [p for p in platforms if any(c.mode_for(p) for c in candidates)]
    missing = [p for p in platforms if p not in buildable]
    if missing:
        with pytest.raises(PlanError) as caught:
            plan_build(platforms, candidates)
        assert caught.value.message == "no node can build " + ", ".join(str(p) for p in missing)
        return
    plan = plan_build(platforms, candidates)
    assert [a.platform for a in plan] == platforms
    for assignment in plan:
        chosen = by_name[assignment.node]
        assert chosen.mode_for(assignment.platform) == assignment.mode
        if assignment.mode == "emulated":
            # Emulation only when no node at all runs the platform natively.
            assert not any(assignment.platform in c.native for c in candidates)
            assert chosen.emulation_allowed
