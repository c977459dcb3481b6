"""The dispatch loop of one build: ask the scheduler, run, and fail over when a node fails.

    pending platforms ──decide──► Assign ─► run on the node ─► done
          ▲       │                                   │
          │       └── Wait (a native slot, a node due back) ◄─┐
          └──────────── a node fault: exclude that node, retry ┘   (up to --retries)

A build fault (a broken Dockerfile) ends its platform at once: it would fail anywhere. A node fault
(connection lost, agent killed, disk full) quarantines the node, with growing backoff, and sends
the platform back to the scheduler without that node. Every platform carries on independently.
Quarantined nodes are probed again when due, and come back when a probe passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from farm.errors import FarmError, NodeError, PlanError
from farm.health import NodeHealth
from farm.nodes import Node, probe
from farm.platforms import Platform
from farm.scheduler import Assign, Fail, History, Mode, NodeView, Policy, Request, Wait, decide

__all__ = ["Dispatch", "Outcome", "initial_health", "node_views"]

RunPlatform = Callable[[Platform, Node, Mode, str], Coroutine[object, object, object]]
Report = Callable[[Platform, str, str, str], None]  # platform, node, state, detail


@dataclass
class Outcome:
    results: dict[Platform, object] = field(default_factory=dict)
    failures: dict[Platform, FarmError] = field(default_factory=dict)


def initial_health(node: Node, now: float) -> NodeHealth:
    """A node's health after its first probe of this build."""
    health = NodeHealth(node.name)
    if node.drained:
        health = health.apply("drain", now)
    passed = node.facts is not None and node.problem is None
    return health.apply("probe_passed" if passed else "probe_failed", now)


def node_views(nodes: Sequence[Node], health: dict[str, NodeHealth], busy: dict[str, int]) -> list[NodeView]:
    """The nodes as the scheduler sees them now (a node never probed cannot be placed)."""
    views = []
    for node in nodes:
        if node.facts is None:
            continue
        try:
            native, emulated = node.facts.native_platforms, node.facts.emulated_platforms
        except FarmError:
            continue  # a machine type farm cannot name
        views.append(
            NodeView(
                name=node.name,
                native=native,
                emulated=emulated,
                emulation_allowed=node.spec.emulation,
                slots=node.spec.slots,
                busy=busy.get(node.name, 0),
                state=health[node.name].state,
                labels=node.spec.labels,
                speed=node.spec.speed,
                back_at=health[node.name].back_at,
            )
        )
    return views


class Dispatch:
    """One build's platforms through the scheduler, with failover; every task owned here."""

    def __init__(
        self,
        nodes: Sequence[Node],
        policy: Policy,
        history: History,
        retries: int,
        run: RunPlatform,
        report: Report,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nodes = {node.name: node for node in nodes}
        self._policy = policy
        self._history = history
        self._retries = retries
        self._run = run
        self._report = report
        self._clock = clock
        now = clock()
        self.health = {node.name: initial_health(node, now) for node in nodes}
        self._busy: dict[str, int] = {}
        self._requests: dict[Platform, Request] = {}
        self._pending: set[Platform] = set()
        self._attempts: dict[Platform, int] = {}
        self._running: dict[asyncio.Task[object], tuple[Platform, str]] = {}
        self._probing: dict[asyncio.Task[None], str] = {}
        self._said: dict[Platform, str] = {}
        self._last_error: dict[Platform, NodeError] = {}
        self._outcome = Outcome()

    async def run(self, platforms: Sequence[Platform], affinity: str) -> Outcome:
        now = self._clock()
        self._requests = {p: Request(p, affinity=affinity, waiting_since=now) for p in platforms}
        self._pending = set(platforms)
        self._attempts = dict.fromkeys(platforms, 0)
        try:
            while self._pending or self._running:
                wake_at = self._place(platforms)
                if not self._running and not self._probing:
                    if not self._pending:
                        break
                    if wake_at is None:
                        self._give_up()
                        break
                timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
                tasks: list[asyncio.Task[Any]] = [*self._running, *self._probing]
                done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._settle(task)
        finally:
            leftovers: list[asyncio.Task[Any]] = [*self._running, *self._probing]
            for task in leftovers:
                task.cancel()
            if leftovers:
                await asyncio.wait(leftovers)
        return self._outcome

    def _place(self, order: Sequence[Platform]) -> float | None:
        """Ask the scheduler about every waiting platform; return when to ask again at the latest."""
        now = self._clock()
        wake_at: float | None = None
        for platform in [p for p in order if p in self._pending]:
            views = node_views(list(self._nodes.values()), self.health, self._busy)
            decision = decide(self._requests[platform], views, self._policy, self._history, now)
            if isinstance(decision, Assign):
                self._start(decision)
            elif isinstance(decision, Wait):
                if self._said.get(platform) != decision.reason:
                    self._said[platform] = decision.reason
                    self._report(platform, "-", "waiting", decision.reason)
                wake_at = _earliest(wake_at, decision.retry_at)
            else:
                assert isinstance(decision, Fail)
                self._pending.discard(platform)
                # After a node fault, the fault is the news; that no other node is left, the hint.
                last = self._last_error.get(platform)
                error = (
                    decision.error()
                    if last is None
                    else NodeError(
                        last.message, node=last.node, hint=f"no other node could take it: {decision.message}"
                    )
                )
                self._outcome.failures[platform] = error
                self._report(platform, "-", "failed", error.message)
        if self._pending:
            for name, health in self.health.items():
                if health.due_for_probe(now) and name not in self._probing.values():
                    self._probing[asyncio.create_task(self._reprobe(name))] = name
                else:
                    wake_at = _earliest(wake_at, health.back_at)
        return wake_at

    def _start(self, decision: Assign) -> None:
        platform = decision.platform
        self._pending.discard(platform)
        self._busy[decision.node] = self._busy.get(decision.node, 0) + 1
        self._report(platform, decision.node, "assigned", decision.reason)
        work = self._run(platform, self._nodes[decision.node], decision.mode, decision.reason)
        self._running[asyncio.create_task(work)] = (platform, decision.node)

    def _settle(self, task: asyncio.Task[Any]) -> None:
        """A build or a probe ended: record it, or send the platform back to the scheduler."""
        if task in self._probing:
            del self._probing[task]
            return
        platform, node = self._running.pop(task)
        self._busy[node] -= 1
        error = task.exception()
        if error is None:
            self._outcome.results[platform] = task.result()
            return
        if not isinstance(error, FarmError):
            raise error
        self._attempts[platform] += 1
        if isinstance(error, NodeError):
            self._last_error[platform] = error
            self.health[node] = self.health[node].apply("build_failed_node_fault", self._clock())
            if self._attempts[platform] <= self._retries:
                self._report(platform, node, "retrying", f"{error.message}; trying another node")
                request = self._requests[platform]
                self._requests[platform] = replace(
                    request, excluded=request.excluded | {node}, waiting_since=self._clock()
                )
                self._pending.add(platform)
                return
        self._outcome.failures[platform] = error
        self._report(platform, node, "failed", error.message)

    def _give_up(self) -> None:
        """Nothing runs, nothing is due: what still waits can never be placed."""
        for platform in sorted(self._pending):
            reason = self._said.get(platform, "no node can take it")
            self._outcome.failures[platform] = PlanError(f"{platform}: {reason}")
        self._pending.clear()

    async def _reprobe(self, name: str) -> None:
        node = self._nodes[name]
        node.problem = None
        await probe(node)
        passed = node.problem is None and node.facts is not None
        self.health[name] = self.health[name].apply(
            "probe_passed" if passed else "probe_failed", self._clock()
        )


def _earliest(current: float | None, candidate: float | None) -> float | None:
    if candidate is None:
        return current
    return candidate if current is None else min(current, candidate)
