"""farm serve's coordinator in-process, on FAKE nodes (tests/fakes.py): its queue's fairness as the
builds really start, and one node pool for every build and the status page.

The same on real parts (a server process, SSH nodes, builds) is tests/test_serve.py's and
tests/test_serve_pool.py's. Here the build function is injected: the first test's only waits, the
second's runs farm's dispatch loop on the server's pool, with FAKE agents behind the transports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from agent.protocol import encode
from farm.api import (
    Assigned,
    BuildOptions,
    BuildRequest,
    BuildResult,
    EventSink,
    PlatformEvent,
    PlatformFailed,
    PlatformResult,
    Retrying,
    Waiting,
)
from farm.dispatch import Dispatch
from farm.errors import BuildFailedError
from farm.nodes import Node
from farm.platforms import Platform, parse_platform
from farm.pool import NodePool
from farm.scheduler import Mode
from farm.serve.coordinator import BuildFunction, Coordinator, CoordinatorOptions, Job
from farm.serve.registries import RegistryPolicy
from farm.serve.state import open_state
from farm.session import open_session
from tests.fakes import FakeFarm, FakeNode, context_files, sync_body

AMD64 = parse_platform("linux/amd64")
DOCKERFILE = "FROM reg.example/busybox\n"
CONTEXT, ENTRIES, BLOBS = context_files({"Dockerfile": DOCKERFILE.encode(), "hello": b"hello\n"})
INDEX = "sha256:" + "1" * 64


def coordinator(state: Path, farm: FakeFarm, build: BuildFunction, max_builds: int) -> Coordinator:
    inventory = farm.inventory()
    return Coordinator(
        inventory,
        open_state(state),
        CoordinatorOptions(max_builds=max_builds, probe_interval=3600),
        "test",
        RegistryPolicy(frozenset({"reg.example"})),
        pool=NodePool(inventory, transport=farm.transport),
        build=build,
    )


async def upload(server: Coordinator) -> None:
    """The context, as ``farm build --server`` sends it."""
    missing, _, _ = server.contexts.accept_sync(sync_body(CONTEXT, ENTRIES))
    stream = asyncio.StreamReader()
    for digest in missing:
        stream.feed_data(encode("blob", digest=digest, size=len(BLOBS[digest])) + BLOBS[digest])
    stream.feed_eof()
    await server.contexts.receive(CONTEXT, stream)


async def submit(server: Coordinator, submitter: str, n: int) -> Job:
    options = BuildOptions(tags=(f"reg.example/app:{n}",), platforms=(AMD64,))
    return await server.submit(submitter, CONTEXT, options.model_dump(mode="json"), DOCKERFILE)


def result(request: BuildRequest, *platforms: PlatformResult) -> BuildResult:
    return BuildResult(
        tags=tuple(request.options.references()),
        index_digest=INDEX,
        index_media_type="application/vnd.oci.image.index.v1+json",
        index_size=1,
        platforms=platforms,
    )


def test_the_queue_starts_one_build_of_each_submitter_in_turn(tmp_path: Path) -> None:
    """One build at a time: alice's one build starts after one more of ci's, not after all three."""
    farm = FakeFarm(FakeNode("a"))
    started: list[str] = []
    gates: dict[str, asyncio.Event] = {}
    starts: asyncio.Queue[str] = asyncio.Queue()

    async def build(request: BuildRequest, pool: NodePool, on_event: EventSink) -> BuildResult:
        tag = str(request.options.tags[0]).rsplit(":", 1)[1]
        gates[tag] = gate = asyncio.Event()
        started.append(tag)
        starts.put_nowait(tag)
        await gate.wait()
        return result(request)

    async def scenario() -> None:
        server = coordinator(tmp_path / "state", farm, build, max_builds=1)
        try:
            async with server.running():
                await upload(server)
                first = await submit(server, "ci", 0)
                async with asyncio.timeout(10):
                    assert await starts.get() == "0"
                ci = [await submit(server, "ci", n) for n in (1, 2, 3)]
                alice = await submit(server, "alice", 4)
                queued = [ci[0], alice, ci[1], ci[2]]
                assert [server.status(job.id)["position"] for job in queued] == [0, 1, 2, 3]
                assert server.snapshot().queue_length == 4
                for _ in queued:
                    gates[started[-1]].set()  # the running build ends: the next one starts
                    async with asyncio.timeout(10):
                        await starts.get()
                    assert server.snapshot().builds_running == 1
                gates[started[-1]].set()
                for job in [first, *queued]:
                    await job.done.wait()
                    assert (job.state, job.exit_code) == ("succeeded", 0)
            assert started == ["0", "1", "4", "2", "3"]
        finally:
            server.state.close()

    asyncio.run(scenario())


def test_a_node_one_build_quarantined_is_shown_so_and_avoided_by_the_next_build(tmp_path: Path) -> None:
    farm = FakeFarm(FakeNode("a", faults=1, build_seconds=0.05), FakeNode("b", build_seconds=0.05))
    events: list[PlatformEvent] = []

    async def build(request: BuildRequest, pool: NodePool, on_event: EventSink) -> BuildResult:
        """``farm.build``'s dispatch, without a registry: the agents only build."""
        kinds: dict[str, Callable[[Platform, str, str], PlatformEvent]] = {
            "assigned": Assigned,
            "retrying": Retrying,
            "waiting": Waiting,
            "failed": PlatformFailed,
        }

        def report(platform: Platform, node: str, state: str, detail: str) -> None:
            event = kinds[state](platform, node, detail)
            events.append(event)
            on_event(event)

        async def run(platform: Platform, node: Node, mode: Mode, reason: str) -> PlatformResult:
            async with open_session(node.name, node.transport, node.spec.agent_workdir()) as session:
                reply = await session.build({"platform": str(platform)}, lambda line: None)
            return PlatformResult(
                platform, node.name, mode, str(reply["digest"]), 1, "application/vnd.oci", 0.1
            )

        options = request.options
        await pool.refresh()
        dispatch = Dispatch(pool, options.policy, {}, options.retries, run, report)
        outcome = await dispatch.run(list(options.platforms), request.context.digest)
        if outcome.failures:
            raise BuildFailedError({str(p): error for p, error in outcome.failures.items()})
        return result(request, *(r for r in outcome.results.values() if isinstance(r, PlatformResult)))

    async def scenario() -> None:
        server = coordinator(tmp_path / "state", farm, build, max_builds=2)
        try:
            async with server.running():
                await upload(server)
                first = await submit(server, "ci", 1)
                await first.done.wait()
                assert first.result is not None
                assert [p.node for p in first.result.platforms] == ["b"]
                assert [(type(e).__name__, e.node) for e in events] == [
                    ("Assigned", "a"),
                    ("Retrying", "a"),
                    ("Assigned", "b"),
                ]
                # The status page, the API and the metrics read the pool the build wrote to.
                nodes = {node["name"]: node for node in server.nodes_json()}
                assert (nodes["a"]["state"], nodes["b"]["state"]) == ("quarantined", "up")
                assert (nodes["a"]["busy"], nodes["b"]["busy"]) == (0, 0)
                assert [node.state for node in server.snapshot().nodes] == ["quarantined", "up"]
                # The next build goes to b at once; a, held back for 30 s, is not even probed.
                probed = list(farm["a"].probes)
                events.clear()
                second = await submit(server, "ci", 2)
                await second.done.wait()
                assert [(type(e).__name__, e.node) for e in events] == [("Assigned", "b")]
                assert farm["a"].probes == probed
                assert len(probed) == 1  # the server's first probe round and the first build shared it
        finally:
            server.state.close()

    asyncio.run(scenario())
