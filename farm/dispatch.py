"""The dispatch loop of one build: ask the scheduler, run, and fail over when a node fails.

    pending platforms ──decide──► Assign ─► run on the node ─► done
          ▲       │                                   │
          │       └── Wait (a native slot, a node due back) ◄─┐
          └──────────── a node fault: exclude that node, retry ┘   (up to --retries)

A build fault (a broken Dockerfile) ends its platform at once: it would fail anywhere. A node fault
(connection lost, agent killed, disk full) quarantines the node, with growing backoff, and sends
the platform back to the scheduler without that node. Every platform carries on independently.

The nodes are the process's ``NodePool``: the health the loop reads and the faults it reports are
the pool's, so a node that one build quarantined is avoided by every other build of the process
until a probe of it passes, and the slots it books are seen by them all. Quarantined nodes are
probed again (through the pool) when due; a platform waiting for a slot another build holds, or
for a node another build is probing, looks again when the pool changes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from farm.errors import FarmError, NodeError, PlanError
from farm.nodes import Node
from farm.platforms import Platform
from farm.pool import NodePool
from farm.scheduler import Assign, Fail, History, Mode, Policy, Request, Wait, decide

__all__ = ["Dispatch", "Outcome"]

RunPlatform = Callable[[Platform, Node, Mode, str], Coroutine[object, object, object]]
Report = Callable[[Platform, str, str, str], None]  # platform, node, state, detail


@dataclass
class Outcome:
    results: dict[Platform, object] = field(default_factory=dict)
    failures: dict[Platform, FarmError] = field(default_factory=dict)


class Dispatch:
    """One build's platforms through the scheduler, with failover; every task owned here."""

    def __init__(
        self,
        pool: NodePool,
        policy: Policy,
        history: History,
        retries: int,
        run: RunPlatform,
        report: Report,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._history = history
        self._retries = retries
        self._run = run
        self._report = report
        self._clock = pool.clock
        self._requests: dict[Platform, Request] = {}
        self._pending: set[Platform] = set()
        self._attempts: dict[Platform, int] = {}
        self._running: dict[asyncio.Task[object], tuple[Platform, str]] = {}
        self._probing: dict[asyncio.Task[Node], str] = {}
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
                    # Nothing of this build runs and nothing is due: only a slot another build
                    # gives back can still change the answer.
                    if wake_at is None and not self._pool.busy:
                        self._give_up()
                        break
                timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
                waiting: list[asyncio.Future[Any]] = [*self._running, *self._probing]
                changed = self._pool.changed() if self._pending else None
                if changed is not None:
                    waiting.append(changed)
                try:
                    done, _ = await asyncio.wait(waiting, timeout=timeout, return_when="FIRST_COMPLETED")
                finally:
                    if changed is not None:
                        changed.cancel()
                for task in [*self._running, *self._probing]:
                    if task in done:
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
            views = self._pool.views()
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
            for node in self._pool.nodes:
                if node.health.due_for_probe(now) and node.name not in self._probing.values():
                    self._probing[asyncio.create_task(self._pool.probe(node.name))] = node.name
                else:
                    wake_at = _earliest(wake_at, node.health.back_at)
        return wake_at

    def _start(self, decision: Assign) -> None:
        platform, name = decision.platform, decision.node
        self._pending.discard(platform)
        self._report(platform, name, "assigned", decision.reason)
        work = self._run(platform, self._pool.node(name), decision.mode, decision.reason)
        task = asyncio.create_task(work)
        self._pool.take(name)
        task.add_done_callback(functools.partial(self._finished, name))
        self._running[task] = (platform, name)

    def _finished(self, node: str, task: asyncio.Task[Any]) -> None:
        """A platform's work on ``node`` ended: the slot goes back to the pool, and a node fault
        quarantines the node, at once and together. Another build must never find the slot free
        and the node still up. A callback, so it runs however the task ends, even cancelled
        before it began (its coroutine's own ``finally`` would never run then)."""
        if not task.cancelled() and isinstance(task.exception(), NodeError):
            self._pool.report(node, "build_failed_node_fault")
        self._pool.release(node)

    def _settle(self, task: asyncio.Task[Any]) -> None:
        """A build or a probe ended: record it, or send the platform back to the scheduler."""
        if task in self._probing:
            del self._probing[task]
            task.result()  # a probe keeps a node's failure in the pool: what escapes it is a bug
            return
        platform, node = self._running.pop(task)
        error = task.exception()
        if error is None:
            self._outcome.results[platform] = task.result()
            return
        if not isinstance(error, FarmError):
            raise error
        self._attempts[platform] += 1
        if isinstance(error, NodeError):
            self._last_error[platform] = error  # the node is quarantined already (``_finished``)
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


def _earliest(current: float | None, candidate: float | None) -> float | None:
    if candidate is None:
        return current
    return candidate if current is None else min(current, candidate)
