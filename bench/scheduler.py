"""The scheduler's cost: decision latency, dispatch rate and memory, on a FAKE farm of 200 nodes.

    .venv/bin/python bench/scheduler.py [--nodes 200] [--builds 2000] [--seed 1] [--json FILE]

Nothing here touches a real node: ``fake_farm`` invents the nodes (mixed platforms, 1-8 slots,
some emulating with QEMU, some down, quarantined, draining or cordoned) and ``simulate`` plays a
coordinator's dispatch loop against them on a simulated clock, calling the real, pure
``farm.scheduler.decide`` and ``farm.health.NodeHealth`` exactly as the orchestration would:

- every queued platform build (all queued at time 0) is decided in queue order; an ``Assign``
  marks a slot of the node busy and schedules the build's end, a ``Wait`` leaves it queued, a
  ``Fail`` drops it. Within one pass, once a (platform, excluded nodes, waiting since) has had
  to wait, the requests after it with the same key wait too without a call: no node can have
  freed in between;
- then the clock jumps to the next event: a build ends (its slot frees, the history remembers
  the node for the context's cache affinity), a build dies of a node fault (2 %: the node is
  quarantined and the platform queued again without that node, up to 2 retries), a held-back
  node's probe is due (passes 70 % of the time), or a ``Wait``'s ``retry_at``. Build times are
  invented too: about a minute divided by the node's speed, six times that when emulated.

Measured: ``time.perf_counter_ns`` around every ``decide`` call (p50, p99, max); dispatches (
``Assign``s) per second of the whole loop's wall time, simulation bookkeeping included; peak
memory as ``tracemalloc``'s peak and the process's ``ru_maxrss``. ``tracemalloc`` slows Python
down, so the simulation runs twice with the same seed: once for time, once for memory.

Targets: p99 decision latency <= 5 ms, >= 500 dispatches/s, peak memory <= 300 MB. Exit status
0 whether or not they are met; 1 if a result check fails (a node ran more builds than it has
slots, a draining or down node got work, emulation where the policy denies it, a build lost).
"""

from __future__ import annotations

import argparse
import heapq
import random
import resource
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from common import at_least, at_most, write_json

from farm.health import NodeHealth
from farm.platforms import Platform
from farm.scheduler import Assign, Fail, NodeView, Policy, Request, Wait, decide

P99_TARGET_MS = 5.0
RATE_TARGET = 500.0
MEMORY_TARGET_MB = 300.0

AMD64 = Platform("linux", "amd64")
I386 = Platform("linux", "386")
ARM64 = Platform("linux", "arm64")
ARM_V7 = Platform("linux", "arm", "v7")
ARM_V6 = Platform("linux", "arm", "v6")
S390X = Platform("linux", "s390x")
PPC64LE = Platform("linux", "ppc64le")
RISCV64 = Platform("linux", "riscv64")

# The fake farm's node kinds: (share, native platforms, speed range, may emulate).
NODE_KINDS = [
    (0.40, frozenset({AMD64, I386}), (1.5, 3.0), True),
    (0.30, frozenset({ARM64}), (0.8, 1.5), True),
    (0.10, frozenset({ARM64, ARM_V7}), (0.6, 1.0), False),
    (0.08, frozenset({ARM_V7, ARM_V6}), (0.3, 0.5), False),
    (0.05, frozenset({S390X}), (1.0, 2.0), False),
    (0.04, frozenset({PPC64LE}), (1.0, 2.0), False),
    (0.03, frozenset({RISCV64}), (0.3, 0.6), False),
]
QEMU = frozenset({AMD64, ARM64, ARM_V7, ARM_V6, S390X, PPC64LE, RISCV64})
# What the queued builds ask for.
DEMAND = [
    (AMD64, 0.25),
    (ARM64, 0.25),
    (ARM_V7, 0.12),
    (ARM_V6, 0.05),
    (S390X, 0.10),
    (PPC64LE, 0.10),
    (RISCV64, 0.05),
    (I386, 0.08),
]
POLICY = Policy(emulation="allow", deny=frozenset({RISCV64}), native_wait=120.0)
FAULT_RATE = 0.02
RETRIES = 2
PROBE_PASS_RATE = 0.7
CONTEXTS = 50


@dataclass
class FakeNode:
    """One invented node: what it builds, how fast, and its health."""

    view: NodeView
    health: NodeHealth


def fake_farm(count: int, rng: random.Random) -> list[FakeNode]:
    nodes = []
    shares = [kind[0] for kind in NODE_KINDS]
    for index in range(count):
        _, native, (slow, fast), emulates = rng.choices(NODE_KINDS, weights=shares)[0]
        name = f"fake{index:03d}"
        health = NodeHealth(name).apply("probe_passed", 0.0)
        roll = rng.random()
        if roll < 0.05:
            health = NodeHealth(name).apply("probe_failed", 0.0)  # down, back in 30 s
        elif roll < 0.10:
            health = health.apply("build_failed_node_fault", 0.0)  # quarantined
        elif roll < 0.13:
            health = health.apply("drain", 0.0)
        elif roll < 0.15:
            health = health.apply("cordon", 0.0)
        view = NodeView(
            name,
            native,
            (QEMU - native) if emulates and rng.random() < 0.6 else frozenset(),
            emulation_allowed=rng.random() < 0.9,
            slots=rng.randint(1, 8),
            busy=0,
            state=health.state,
            labels={"rack": f"r{index % 10}"},
            speed=round(rng.uniform(slow, fast), 2),
            back_at=health.back_at,
        )
        nodes.append(FakeNode(view, health))
    return nodes


@dataclass
class Result:
    decisions: int = 0
    assigned: int = 0
    emulated: int = 0
    waits: int = 0
    failed: int = 0
    completed: int = 0
    retried: int = 0
    node_faults: int = 0
    probes: int = 0
    simulated_seconds: float = 0.0
    wall_seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# Requests that would get the same answer from one pass's farm: platform (as a string, whose hash
# Python caches), excluded nodes, waiting since.
Key = tuple[str, frozenset[str], float]


def _queued(request: Request) -> tuple[Key, Request]:
    return (str(request.platform), request.excluded, request.waiting_since), request


def simulate(node_count: int, build_count: int, seed: int) -> Result:
    rng = random.Random(seed)
    farm = fake_farm(node_count, rng)
    position = {node.view.name: index for index, node in enumerate(farm)}
    platforms, weights = zip(*DEMAND, strict=True)
    queue = [
        _queued(Request(platform, f"ctx{rng.randrange(CONTEXTS)}", frozenset(), 0.0))
        for platform in rng.choices(platforms, weights=weights, k=build_count)
    ]
    history: dict[tuple[str, Platform], str] = {}
    # (time, sequence, kind: done/fault/probe, node index, the build's request for done/fault)
    events: list[tuple[float, int, str, int, Request | None]] = []
    sequence = 0
    for index, node in enumerate(farm):
        if node.health.back_at is not None:
            events.append((node.health.back_at, sequence, "probe", index, None))
            sequence += 1
    heapq.heapify(events)
    result = Result()
    now = 0.0
    started = time.perf_counter()

    def refresh(index: int, busy_delta: int = 0) -> None:
        node = farm[index]
        node.view = replace(
            node.view,
            busy=node.view.busy + busy_delta,
            state=node.health.state,
            back_at=node.health.back_at,
        )

    while queue or events:
        waiting: set[Key] = set()
        retry_at = float("inf")
        still: list[tuple[Key, Request]] = []
        views = [node.view for node in farm]
        for key, request in queue:
            if key in waiting:
                still.append((key, request))
                continue
            before = time.perf_counter_ns()
            decision = decide(request, views, POLICY, history, now)
            result.latencies_ns.append(time.perf_counter_ns() - before)
            result.decisions += 1
            if isinstance(decision, Assign):
                index = position[decision.node]
                view = farm[index].view
                if view.state != "up" or view.busy >= view.slots or decision.node in request.excluded:
                    result.problems.append(f"{decision} went to {view}")
                if decision.mode == "emulated" and not POLICY.allows_emulation(request.platform):
                    result.problems.append(f"{decision} emulates a denied platform")
                refresh(index, +1)
                views[index] = farm[index].view
                result.assigned += 1
                result.emulated += decision.mode == "emulated"
                took = rng.uniform(30.0, 90.0) / view.speed * (6.0 if decision.mode == "emulated" else 1.0)
                kind = "fault" if rng.random() < FAULT_RATE else "done"
                heapq.heappush(events, (now + took, sequence, kind, index, request))
                sequence += 1
            elif isinstance(decision, Wait):
                result.waits += 1
                waiting.add(key)
                still.append((key, request))
                if decision.retry_at is not None:
                    retry_at = min(retry_at, decision.retry_at)
            else:
                assert isinstance(decision, Fail)
                result.failed += 1
        queue = still
        next_event = events[0][0] if events else float("inf")
        if min(next_event, retry_at) == float("inf"):
            if queue:
                result.problems.append(f"{len(queue)} builds wait for nothing")
            break
        now = min(next_event, retry_at)
        while events and events[0][0] <= now:
            _, _, kind, index, build = heapq.heappop(events)
            node = farm[index]
            if kind == "probe":
                if node.health.admin == "cordoned" or not node.health.due_for_probe(now):
                    continue
                result.probes += 1
                passed = rng.random() < PROBE_PASS_RATE
                node.health = node.health.apply("probe_passed" if passed else "probe_failed", now)
                if not passed and node.health.back_at is not None:
                    heapq.heappush(events, (node.health.back_at, sequence, "probe", index, None))
                    sequence += 1
                refresh(index)
                continue
            assert build is not None
            if kind == "done":
                result.completed += 1
                if build.affinity is not None:
                    history[(build.affinity, build.platform)] = node.view.name
                node.health = node.health.apply("heartbeat", now)
            else:
                result.node_faults += 1
                was_up = node.health.health == "up"
                node.health = node.health.apply("build_failed_node_fault", now)
                if was_up and node.health.back_at is not None:
                    heapq.heappush(events, (node.health.back_at, sequence, "probe", index, None))
                    sequence += 1
                if len(build.excluded) < RETRIES:
                    result.retried += 1
                    retry = replace(build, excluded=build.excluded | {node.view.name}, waiting_since=now)
                    queue.append(_queued(retry))
                else:
                    result.failed += 1
            refresh(index, -1)
    result.wall_seconds = time.perf_counter() - started
    result.simulated_seconds = now
    if result.completed + result.failed != build_count:
        result.problems.append(
            f"{build_count} builds queued, {result.completed} done, {result.failed} failed"
        )
    if any(node.view.busy for node in farm):
        result.problems.append("slots still busy at the end")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--builds", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    timed = simulate(args.nodes, args.builds, args.seed)
    tracemalloc.start()
    measured = simulate(args.nodes, args.builds, args.seed)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    latencies_ms = sorted(ns / 1e6 for ns in timed.latencies_ns)
    p50 = statistics.median(latencies_ms)
    p99 = latencies_ms[min(len(latencies_ms) - 1, int(len(latencies_ms) * 0.99))]
    rate = timed.assigned / timed.wall_seconds
    decide_rate = timed.assigned / (sum(timed.latencies_ns) / 1e9)
    peak_mb = peak / 1e6
    memory_mb = max(peak_mb, maxrss_mb)
    outcome = Counter(
        {
            "assigned": timed.assigned,
            "emulated": timed.emulated,
            "waits": timed.waits,
            "completed": timed.completed,
            "failed": timed.failed,
            "retried": timed.retried,
            "node faults": timed.node_faults,
            "probes": timed.probes,
        }
    )
    print(f"fake farm: {args.nodes} nodes, {args.builds} queued platform builds, seed {args.seed}")
    print(
        f"simulated {timed.simulated_seconds / 3600:.1f} h in {timed.wall_seconds:.2f} s wall; "
        + ", ".join(f"{key} {value}" for key, value in outcome.items())
    )
    print(
        f"decide: {timed.decisions} calls, p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {latencies_ms[-1]:.3f} ms "
        f"(target p99 <= {P99_TARGET_MS:g} ms: {'met' if p99 <= P99_TARGET_MS else 'MISSED'})"
    )
    print(
        f"dispatch: {rate:,.0f} assignments/s over the whole loop ({decide_rate:,.0f}/s counting decide "
        f"calls only) (target >= {RATE_TARGET:g}/s: {'met' if rate >= RATE_TARGET else 'MISSED'})"
    )
    print(
        f"memory: tracemalloc peak {peak_mb:.1f} MB, ru_maxrss {maxrss_mb:.1f} MB "
        f"(target <= {MEMORY_TARGET_MB:g} MB: {'met' if memory_mb <= MEMORY_TARGET_MB else 'MISSED'})"
    )
    problems = timed.problems + measured.problems
    if (timed.assigned, timed.completed) != (measured.assigned, measured.completed):
        problems.append("the two runs of the same seed differ")
    for problem in problems[:20]:
        print(f"CHECK FAILED: {problem}", file=sys.stderr)
    figures = [
        at_most("decide p99", p99, P99_TARGET_MS, "ms"),
        at_least("dispatches per second", rate, RATE_TARGET, "/s"),
        at_most("peak memory", memory_mb, MEMORY_TARGET_MB, "MB"),
    ]
    write_json(
        args.json,
        "scheduler",
        figures,
        nodes=args.nodes,
        builds=args.builds,
        seed=args.seed,
        decisions=timed.decisions,
        p50_ms=p50,
        p99_ms=p99,
        max_ms=latencies_ms[-1],
        dispatches_per_s=rate,
        decide_only_dispatches_per_s=decide_rate,
        tracemalloc_peak_mb=peak_mb,
        ru_maxrss_mb=maxrss_mb,
        wall_s=timed.wall_seconds,
        simulated_s=timed.simulated_seconds,
        **{key.replace(" ", "_"): value for key, value in outcome.items()},
        problems=problems,
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
