"""SSH session slots come back on every path: cancellation at any point of opening or using a
session, and a node that drops its connection again and again (its sshd sessions killed, its
sshd restarted, its link cut). Afterwards a probe still succeeds at once and every connection's
slots are all free: a flapping node cannot use them up so that its re-probes hang.

Real OpenSSH nodes (tests/sshlab.py), farm's own transport (``SshConnections``, ``SshTransport``,
``open_session``). Where a fault is injected "during" something, the moments are spread over
the time a warm session takes to open, measured first, so that they land before the slot is
taken, while the agent is started, while stage one answers, during the handshake and after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncssh
import pytest

from farm.errors import NodeError
from farm.inventory import NodeSpec
from farm.nodefacts import NodeFacts
from farm.session import AgentSession, open_session
from farm.transport.ssh import MAX_SESSIONS, SessionSlots, SshConnections, SshTransport
from tests import lab, sshlab
from tests.lab import processes_running

pytestmark = pytest.mark.lab

# Every fault is injected more often than there are slots: one leaked slot per fault would
# exhaust them, and the final probe would hang.
ROUNDS = MAX_SESSIONS + 3
PROMPT = 30.0  # seconds a probe of a healthy node may take, handshake included


@pytest.fixture
def node(tmp_path: Path) -> Iterator[sshlab.SshNode]:
    with sshlab.ssh_lab(tmp_path, count=1) as running:
        yield running.nodes[0]


class RecordingConnections(SshConnections):
    """farm's connections, remembering the session slots of every connection they made."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[SessionSlots] = []

    async def connection(self, spec: NodeSpec) -> tuple[asyncssh.SSHClientConnection, SessionSlots]:
        connection, slots = await super().connection(spec)
        if not any(slots is seen for seen in self.seen):
            self.seen.append(slots)
        return connection, slots


class Farm:
    """One coordinator's view of the node: its connections and transport."""

    def __init__(self, node: sshlab.SshNode) -> None:
        self.node = node
        self.spec = NodeSpec.model_validate(node.inventory_entry())
        self.connections = RecordingConnections()
        self.transport = SshTransport(self.spec, self.connections)

    @property
    def seen(self) -> list[SessionSlots]:
        """The slots of every connection made so far, the current one last."""
        return self.connections.seen

    async def slots(self) -> SessionSlots:
        """The current connection's slots (connecting if it is lost)."""
        _, slots = await self.connections.connection(self.spec)
        return slots

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[AgentSession]:
        async with open_session(self.node.name, self.transport, self.node.workdir) as session:
            yield session

    async def probe(self) -> NodeFacts:
        async with asyncio.timeout(PROMPT), self.session() as session:
            return await session.facts()

    def held(self) -> list[int]:
        """Slots held, per connection made so far (all zero when no session is open)."""
        return [seen.limit - seen.free for seen in self.seen]

    async def open_time(self) -> float:
        """How long a warm session takes to open and answer, the median of five."""
        await self.probe()  # connects, and caches the agent on the node
        times = []
        for _ in range(5):
            start = time.monotonic()
            await self.probe()
            times.append(time.monotonic() - start)
        return statistics.median(times)

    async def finish(self) -> None:
        """The checks every test ends with: a prompt probe, every slot free, no agent left."""
        start = time.monotonic()
        facts = await self.probe()
        assert time.monotonic() - start < PROMPT
        assert facts.machine
        await self.slots()
        assert self.held() == [0] * len(self.seen)
        assert all(seen.free == MAX_SESSIONS for seen in self.seen)
        await self.connections.close()
        # The node's side ends too: each agent exits when its session's stdin closes.
        await asyncio.to_thread(
            lab.wait_until, lambda: not processes_running(self.node.workdir), "the agents to exit", 30
        )


def moments(open_time: float) -> list[float]:
    """When to inject a fault, relative to the start of opening a session."""
    return [open_time * fraction for fraction in (0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.1)]


async def cancelled_after(delay: float, work: Callable[[], Awaitable[object]]) -> bool:
    """Run ``work`` and cancel it after ``delay`` (if it is still running); True if cancelled."""
    task = asyncio.create_task(work())
    await asyncio.wait([task], timeout=delay)
    task.cancel()
    await asyncio.wait([task])
    if task.cancelled():
        return True
    task.result()  # finished first: it must have succeeded
    return False


def test_cancelling_sessions_anywhere_gives_every_slot_back(node: sshlab.SshNode) -> None:
    async def main() -> None:
        farm = Farm(node)
        slots = await farm.slots()
        open_time = await farm.open_time()
        cancelled = 0

        # 1. Cancelled while opening: connecting, waiting for a slot, starting the agent,
        #    answering stage one, saying hello; or just after it answered.
        for round_ in range(2):
            for delay in moments(open_time):
                cancelled += await cancelled_after(delay, farm.probe)
                assert slots.free == MAX_SESSIONS, f"round {round_}, cancelled after {delay:.3f} s"

        # 2. Cancelled while the session is open and used (a facts request under way, or idle).
        async def open_and_wait(opened: asyncio.Event) -> None:
            async with farm.session() as session:
                await session.facts()
                opened.set()
                await session.facts()
                await asyncio.Event().wait()  # forever: only the cancellation ends it

        for _ in range(ROUNDS):
            opened = asyncio.Event()
            task = asyncio.create_task(open_and_wait(opened))
            async with asyncio.timeout(PROMPT):
                await opened.wait()
            assert slots.free == MAX_SESSIONS - 1
            task.cancel()
            await asyncio.wait([task])
            assert task.cancelled()
            assert slots.free == MAX_SESSIONS

        # 3. Cancelled while waiting for a slot: every slot held by open sessions, one more asked.
        release = asyncio.Event()

        async def hold(opened: asyncio.Event) -> None:
            async with farm.session():
                opened.set()
                await release.wait()

        holders = []
        for _ in range(MAX_SESSIONS):
            opened = asyncio.Event()
            holders.append(asyncio.create_task(hold(opened)))
            async with asyncio.timeout(PROMPT):
                await opened.wait()
        assert slots.free == 0
        for _ in range(ROUNDS):
            waiting = asyncio.create_task(farm.probe())
            done, _ = await asyncio.wait([waiting], timeout=0.2)
            assert not done, "a session opened beyond the slots"
            waiting.cancel()
            await asyncio.wait([waiting])
            assert waiting.cancelled()
        release.set()
        await asyncio.wait(holders)
        assert [task.exception() for task in holders] == [None] * MAX_SESSIONS

        # Most moments fall before the session answered (the rest check a probe that was not
        # cancelled); parts 2 and 3 cancel ROUNDS times each whatever the timing.
        assert cancelled >= len(moments(open_time)), "the cancellations came too late to test anything"
        await farm.finish()

    asyncio.run(main())


def kill_sshd_sessions(node: sshlab.SshNode) -> int:
    """Kill the sshd processes serving connections to ``node`` (its listener stays): each of its
    connections ends at once, as when the machine resets them. Returns how many were killed."""
    killed = 0
    for pid in node.pids():
        if pid == node.sshd_pid:
            continue
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name == "sshd":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


async def probe_or_lose(farm: Farm) -> str:
    """A probe whose node may drop it: it answers, or fails as a node fault, never otherwise."""
    try:
        await farm.probe()
    except NodeError:
        return "lost"
    return "answered"


@pytest.mark.timeout(400)
def test_a_node_dropping_its_connection_again_and_again_keeps_no_slot(node: sshlab.SshNode) -> None:
    async def main() -> None:
        farm = Farm(node)
        open_time = await farm.open_time()
        outcomes: list[str] = []
        drops = 0

        # 1. The connection dropped at a moment of opening a session, over and over; sometimes
        #    the listening sshd restarted too (new connections wait for it).
        for round_, delay in enumerate(moments(open_time) + moments(open_time)[::3]):
            await farm.slots()
            probing = asyncio.create_task(probe_or_lose(farm))
            await asyncio.wait([probing], timeout=delay)
            drops += await asyncio.to_thread(kill_sshd_sessions, node)
            if round_ % 4 == 3:
                await asyncio.to_thread(node.restart_sshd)
            async with asyncio.timeout(PROMPT):
                outcomes.append(await probing)
            assert farm.held() == [0] * len(farm.seen), f"round {round_}, dropped after {delay:.3f} s"

        # 2. Dropped while sessions are open and in use: each ends as a node fault.
        for _ in range(3):
            async with contextlib.AsyncExitStack() as stack:
                sessions = [await stack.enter_async_context(farm.session()) for _ in range(3)]
                assert farm.held()[-1] == 3
                drops += await asyncio.to_thread(kill_sshd_sessions, node)
                for session in sessions:
                    with pytest.raises(NodeError):
                        async with asyncio.timeout(PROMPT):
                            await session.facts()
            assert farm.held() == [0] * len(farm.seen)

        # 3. The link cut under an open session: keepalives find the connection dead (about
        #    20 s), the session ends as a node fault, and after the link is back a probe connects
        #    again.
        async with farm.session() as session:
            await session.facts()
            await asyncio.to_thread(node.cut_link)
            try:
                with pytest.raises(NodeError):
                    async with asyncio.timeout(60):
                        await session.facts()
            finally:
                await asyncio.to_thread(node.restore_link)
        assert farm.held() == [0] * len(farm.seen)

        assert drops >= ROUNDS
        assert "lost" in outcomes, "no drop landed while a session was opening"
        assert len(farm.seen) > ROUNDS  # every drop made the next session connect anew
        await farm.finish()

    asyncio.run(main())
