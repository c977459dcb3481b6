"""The node pool and the dispatch loop in-process, on FAKE nodes and a FAKE clock (tests/fakes.py).

Real SSH nodes and real faults are tests/test_failover.py's and tests/test_serve_pool.py's; these
stand in where a lab cannot go in seconds: backoffs of a minute timed to the second, a hundred
nodes. The pool, the dispatch loop, the session and the protocol are farm's own; only the agent
behind the transport and the clock are fakes. Times below are seconds of the fake clock.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from farm.dispatch import Dispatch, Outcome
from farm.health import NodeHealth
from farm.nodes import Node
from farm.platforms import Platform, parse_platform
from farm.pool import NodePool
from farm.scheduler import Mode, Policy
from farm.session import open_session
from tests.fakes import FakeFarm, FakeNode, run_virtual

AMD64 = parse_platform("linux/amd64")
I386 = parse_platform("linux/386")
ARM64 = parse_platform("linux/arm64")
ARMV7 = parse_platform("linux/arm/v7")


@dataclass
class Build:
    """One build's dispatch: what it reported (time, platform, node, state), and how it ended."""

    events: list[tuple[float, str, str, str]] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # what the loop said, in order
    outcome: Outcome | None = None

    def said(self, *states: str) -> list[tuple[float, str, str, str]]:
        return [event for event in self.events if event[3] in states]


def open_pool(farm: FakeFarm, **options: Any) -> NodePool:
    return NodePool(
        farm.inventory(), transport=farm.transport, clock=asyncio.get_running_loop().time, **options
    )


async def build(
    pool: NodePool,
    platforms: list[Platform],
    *,
    affinity: str = "ctx",
    retries: int = 2,
    policy: Policy | None = None,
) -> Build:
    """A build as ``farm.build`` dispatches one: the nodes due are probed, then every platform is
    run on the node the scheduler picks (here: the agent's ``build`` message alone, no context)."""
    loop = asyncio.get_running_loop()
    seen = Build()

    def report(platform: Platform, node: str, state: str, detail: str) -> None:
        seen.events.append((loop.time(), str(platform), node, state))
        seen.details.append(detail)

    async def run(platform: Platform, node: Node, mode: Mode, reason: str) -> tuple[str, str]:
        seen.events.append((loop.time(), str(platform), node.name, "building"))
        async with open_session(node.name, node.transport, node.spec.agent_workdir()) as session:
            reply = await session.build({"platform": str(platform)}, lambda line: None)
        return node.name, str(reply["digest"])

    await pool.refresh()
    seen.outcome = await Dispatch(pool, policy or Policy(), {}, retries, run, report).run(platforms, affinity)
    return seen


def built_on(seen: Build) -> dict[Platform, str]:
    assert seen.outcome is not None
    return {platform: result[0] for platform, result in seen.outcome.results.items()}  # type: ignore[index]


def test_a_node_fault_sends_the_platform_to_another_node_and_quarantines_the_node() -> None:
    farm = FakeFarm(FakeNode("a", faults=1), FakeNode("b"))

    async def scenario() -> None:
        pool = open_pool(farm)
        seen = await build(pool, [AMD64])
        assert built_on(seen) == {AMD64: "b"}
        assert seen.said("assigned", "retrying", "failed") == [
            (0.0, "linux/amd64", "a", "assigned"),
            (10.0, "linux/amd64", "a", "retrying"),
            (10.0, "linux/amd64", "b", "assigned"),
        ]
        # Held back 30 s from the fault; its last sign of life was its probe.
        assert pool.node("a").health == NodeHealth(
            "a", health="quarantined", failures=1, back_at=40.0, last_seen=0.0
        )
        assert pool.node("b").health == NodeHealth("b", health="up", last_seen=0.0)
        assert pool.busy == 0

    run_virtual(scenario())


def test_a_node_one_build_quarantined_is_avoided_by_the_next_until_a_probe_of_it_passes() -> None:
    farm = FakeFarm(FakeNode("a", faults=1), FakeNode("b"))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = open_pool(farm)
        first = await build(pool, [AMD64], affinity="first")
        assert built_on(first) == {AMD64: "b"}
        assert loop.time() == 20.0
        # The next build, on the same pool: "a" (first in the inventory, free) is still held
        # back, so it is neither probed nor given work.
        second = await build(pool, [AMD64], affinity="second")
        assert second.said("assigned") == [(20.0, "linux/amd64", "b", "assigned")]
        assert farm["a"].probes == [0.0]
        # Once its backoff is over, the next build probes it; it passes and takes the work again.
        await asyncio.sleep(41.0 - loop.time())
        third = await build(pool, [AMD64], affinity="third")
        assert farm["a"].probes == [0.0, 41.0]
        assert third.said("assigned") == [(41.0, "linux/amd64", "a", "assigned")]
        assert pool.node("a").health == NodeHealth("a", health="up", last_seen=41.0)

    run_virtual(scenario())


def test_the_backoff_grows_while_probes_fail_and_a_waiting_build_goes_once_one_passes() -> None:
    farm = FakeFarm(FakeNode("a", faults=1))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = open_pool(farm)
        first = await build(pool, [AMD64], retries=0)
        assert first.outcome is not None
        assert list(first.outcome.failures) == [AMD64]
        # The node is unreachable until t=70: its probe at 40 fails, the next is due 60 s later.
        farm["a"].reachable = False
        loop.call_at(70.0, setattr, farm["a"], "reachable", True)
        second = await build(pool, [AMD64])
        assert farm["a"].opened == [0.0, 0.0, 40.0, 100.0, 100.0]  # probe, build 1, probes, build 2
        assert farm["a"].probes == [0.0, 100.0]  # the agent answered these
        assert [(event[0], event[3]) for event in second.said("waiting", "assigned")] == [
            (10.0, "waiting"),
            (40.0, "waiting"),
            (40.0, "waiting"),
            (100.0, "waiting"),
            (100.0, "assigned"),
        ]
        wait = "waiting for a native node: a is quarantined ({}); {} left of --native-wait 5m"
        wait += " (no node can emulate it)"
        assert second.details == [
            wait.format("next probe in 30s", "5m"),
            wait.format("probe due", "4m30s"),
            wait.format("next probe in 1m", "4m30s"),  # the probe at 40 failed: held back 60 s
            wait.format("probe due", "3m30s"),
            "a runs linux/amd64 natively",
        ]
        assert built_on(second) == {AMD64: "a"}
        assert pool.node("a").health == NodeHealth("a", health="up", last_seen=100.0)

    run_virtual(scenario())


def test_a_node_s_slots_are_booked_across_the_builds_of_one_pool() -> None:
    farm = FakeFarm(FakeNode("a", slots=1))

    async def scenario() -> None:
        pool = open_pool(farm)
        async with asyncio.TaskGroup() as builds:
            one = builds.create_task(build(pool, [AMD64], affinity="one"))
            two = builds.create_task(build(pool, [AMD64], affinity="two"))
        assert farm["a"].probes == [0.0]  # both builds asked for it: one probe answered both
        assigned = sorted(one.result().said("assigned") + two.result().said("assigned"))
        assert [event[0] for event in assigned] == [0.0, 10.0]
        waited = one.result().said("waiting") + two.result().said("waiting")
        assert [event[0] for event in waited] == [0.0]
        assert farm["a"].most_running == 1
        assert pool.busy == 0

    run_virtual(scenario())


def test_a_build_never_runs_more_on_a_node_than_its_slots() -> None:
    farm = FakeFarm(FakeNode("a", slots=2, emulators=("aarch64", "arm")))

    async def scenario() -> None:
        pool = open_pool(farm)
        seen = await build(pool, [AMD64, ARM64, I386, ARMV7])
        assert sorted(seen.said("building")) == [
            (0.0, "linux/amd64", "a", "building"),
            (0.0, "linux/arm64", "a", "building"),
            (10.0, "linux/386", "a", "building"),
            (10.0, "linux/arm/v7", "a", "building"),
        ]
        assert farm["a"].most_running == 2
        assert built_on(seen) == dict.fromkeys([AMD64, ARM64, I386, ARMV7], "a")

    run_virtual(scenario())


def test_a_hundred_nodes_forty_builds_faults_on_thirty_nodes() -> None:
    nodes = [
        FakeNode(f"n{i:03}", slots=2, faults=1 if i < 30 else 0, build_seconds=5 + i % 7) for i in range(100)
    ]
    farm = FakeFarm(*nodes)

    async def scenario() -> None:
        pool = open_pool(farm)
        async with asyncio.TaskGroup() as group:
            builds = [group.create_task(build(pool, [AMD64], affinity=f"b{i}", retries=5)) for i in range(40)]
        where = [built_on(task.result())[AMD64] for task in builds]
        assert all(int(name[1:]) >= 30 for name in where)
        faulted = {node.name for node in nodes[:30] if node.builds}  # each died on its first build
        assert faulted
        for name in faulted:
            assert pool.node(name).health.state == "quarantined"
        assert all(node.most_running <= 2 for node in nodes)
        assert all(len(node.probes) == 1 for node in nodes)  # one probe each, for forty builds
        assert pool.busy == 0

    run_virtual(scenario())


def test_one_probe_of_a_node_at_a_time_and_an_unreachable_node_keeps_why() -> None:
    farm = FakeFarm(FakeNode("a"), FakeNode("b", reachable=False))

    async def scenario() -> None:
        pool = open_pool(farm)
        async with asyncio.TaskGroup() as group:
            for _ in range(3):
                group.create_task(pool.probe("a"))
            group.create_task(pool.refresh())
        assert farm["a"].probes == [0.0]
        assert pool.node("a").usable
        b = pool.node("b")
        assert b.facts is None
        assert not b.usable
        assert b.problem is not None
        assert "unreachable" in b.problem.message
        assert b.health == NodeHealth("b", health="down", failures=1, back_at=30.0)
        assert [view.name for view in pool.views()] == ["a"]  # never probed: cannot be placed
        # Asked again once the first probe has ended: a new probe.
        await pool.probe("a")
        assert farm["a"].probes == [0.0, 0.0]

    run_virtual(scenario())


def test_the_drained_list_is_followed_and_a_drained_node_takes_no_work() -> None:
    farm = FakeFarm(FakeNode("a"), FakeNode("b"))

    async def scenario() -> None:
        pool = open_pool(farm, drained={"a"})
        assert pool.node("a").health.state == "draining"
        seen = await build(pool, [AMD64])
        assert built_on(seen) == {AMD64: "b"}
        assert farm["a"].probes == [0.0]  # a draining node is still probed and watched
        pool.set_drained(set())
        assert pool.node("a").health.state == "up"
        pool.set_drained({"b"})
        assert [(view.name, view.state) for view in pool.views()] == [("a", "up"), ("b", "draining")]

    run_virtual(scenario())


def test_a_cancelled_build_gives_its_slots_back_and_leaves_nothing_running() -> None:
    farm = FakeFarm(FakeNode("a", slots=1, build_seconds=100))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = open_pool(farm)
        cancelled = asyncio.create_task(build(pool, [AMD64], affinity="one"))
        await asyncio.sleep(5)
        assert (pool.node("a").busy, farm["a"].running) == (1, 1)
        cancelled.cancel()
        await asyncio.wait([cancelled])
        assert cancelled.cancelled()
        assert (pool.node("a").busy, farm["a"].running) == (0, 0)
        # The slot is free at once for the next build: it starts now, not when the first would have ended.
        after = await build(pool, [AMD64], affinity="two")
        assert after.said("assigned") == [(5.0, "linux/amd64", "a", "assigned")]
        assert loop.time() == 105.0

    run_virtual(scenario())
