"""Fakes for in-process tests of the orchestration: FAKE nodes and a FAKE clock.

The orchestration (``farm.pool``, ``farm.dispatch``, ``farm serve``'s coordinator) is tested against
real nodes on the SSH lab (tests/test_ssh_nodes.py, test_failover.py, test_serve_pool.py). These
fakes stand in only where a real lab cannot go in seconds: fault timings to the second, backoffs
of minutes, many nodes. Nothing here is farm code.

* ``FakeFarm`` / ``FakeNode``: a node whose agent speaks the real protocol (``agent.protocol``) to
  the real ``farm.session`` over an in-memory ``AgentProcess``, behind a fake ``Transport``: it
  answers ``hello`` and ``facts``, and a ``build`` after ``build_seconds`` (of the loop's clock)
  with a result, or with the agent's death (a node fault). It can be unreachable (its transport
  raises the ``NodeError`` a failed SSH connection raises) and counts what it was asked.
* ``run_virtual``: runs a coroutine on an event loop whose clock is FAKE: when nothing is ready,
  the loop's time jumps to the next timer instead of sleeping, so a 30 s backoff takes no time and
  ``loop.time()`` (pass it as the pool's ``clock``) tells exactly when each thing happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import selectors
import stat
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent import protocol
from farm.errors import NodeError
from farm.inventory import Inventory, NodeSpec
from farm.transport import AgentProcess

__all__ = [
    "FakeAgent",
    "FakeFarm",
    "FakeNode",
    "FakeTransport",
    "VirtualTimeLoop",
    "context_files",
    "run_virtual",
    "sync_body",
]

T = TypeVar("T")


# --- a fake clock ------------------------------------------------------------------------------


class _InstantSelector(selectors.BaseSelector):
    """A real selector that never sleeps: where it would wait ``timeout`` seconds for I/O, it moves
    the loop's fake time on by ``timeout`` instead (real I/O, a worker thread's wake-up, is still
    seen at once)."""

    def __init__(self) -> None:
        self._inner = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timer at all: only real I/O can wake the loop
            return self._inner.select(None)
        self.now += timeout
        return ready

    def get_map(self) -> Any:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a FAKE clock that starts at 0 and jumps to the next timer when idle."""

    def __init__(self) -> None:
        self._instant = _InstantSelector()
        super().__init__(self._instant)

    def time(self) -> float:
        return self._instant.now


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a ``VirtualTimeLoop``."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)


# --- fake nodes --------------------------------------------------------------------------------


@dataclass
class FakeNode:
    """What a FAKE node is and does, and what it was asked (times on the loop's clock)."""

    name: str
    machine: str = "x86_64"
    emulators: tuple[str, ...] = ()
    slots: int = 1
    build_seconds: float = 10.0
    reachable: bool = True
    faults: int = 0  # the next ``faults`` builds end with the agent dying after ``build_seconds``
    connections: int = 0  # "handshakes": the first agent, and the first after ``drop_connection``
    opened: list[float] = field(default_factory=list)  # when each agent was asked for
    probes: list[float] = field(default_factory=list)  # when each ``facts`` was asked
    builds: list[tuple[float, str]] = field(default_factory=list)  # when each build began, platform
    running: int = 0
    most_running: int = 0
    _connected: bool = False

    def spec(self, **fields: Any) -> NodeSpec:
        return NodeSpec.model_validate(
            {"name": self.name, "host": f"{self.name}.fake", "slots": self.slots} | fields
        )

    def drop_connection(self) -> None:
        self._connected = False

    def facts(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "python": "3.11.2",
            "cores": 4,
            "memory_bytes": 8 * 2**30,
            "disk_free_bytes": 100 * 2**30,
            "workdir": "/var/lib/farm",
            "builders": ["buildah"],
            "emulators": list(self.emulators),
            "uid": 1000,
            "user": "farm-build",
            "oci_runtime": "/usr/bin/runc",
            "private_network": True,
            "rootless_ready": True,
        }


class FakeFarm:
    """FAKE nodes by name; ``transport`` is the ``NodePool``'s transport factory."""

    def __init__(self, *nodes: FakeNode) -> None:
        self.nodes = {node.name: node for node in nodes}

    def __getitem__(self, name: str) -> FakeNode:
        return self.nodes[name]

    def inventory(self, **fields: Any) -> Inventory:
        return Inventory(nodes=tuple(node.spec(**fields) for node in self.nodes.values()), source="fake")

    def transport(self, spec: NodeSpec) -> FakeTransport:
        return FakeTransport(self.nodes[spec.name])


class FakeTransport:
    """A FAKE ``Transport``: an in-memory agent for the node, or the error of an unreachable one."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node

    @contextlib.asynccontextmanager
    async def open_agent(self, workdir: str) -> AsyncIterator[AgentProcess]:
        node = self.node
        node.opened.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0)
        if not node.reachable:
            node._connected = False
            raise NodeError(f"{node.name}: cannot connect to {node.name}.fake: unreachable", node=node.name)
        if not node._connected:
            node._connected = True
            node.connections += 1
        agent = FakeAgent(node)
        try:
            yield agent
        finally:
            agent.kill()


class FakeAgent:
    """A FAKE agent process: the protocol's marker, ``hello``, ``facts`` and ``build`` answered."""

    def __init__(self, node: FakeNode) -> None:
        self._node = node
        self._out: deque[bytes] = deque([b"motd of a chatty profile\n", protocol.MARKER + b"\n"])
        self._pending = b""
        self._build: tuple[float, bool] | None = None  # (when it ends, whether the agent dies then)
        self._closed = asyncio.Event()

    async def write(self, data: bytes) -> None:
        if self._closed.is_set():
            raise ConnectionError("the agent has exited")
        self._pending += data
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            self._answer(protocol.decode(line + b"\n"))

    def _answer(self, message: dict[str, Any]) -> None:
        node, kind = self._node, message["type"]
        now = asyncio.get_running_loop().time()
        if kind == "hello":
            self._out.append(
                protocol.encode("hello", version=protocol.PROTOCOL_VERSION, python="3.11", pid=1)
            )
        elif kind == "facts":
            node.probes.append(now)
            self._out.append(protocol.encode("facts", **node.facts()))
        elif kind == "build":
            dies = node.faults > 0
            node.faults -= dies
            node.builds.append((now, str(message["platform"])))
            node.running += 1
            node.most_running = max(node.most_running, node.running)
            self._build = (now + node.build_seconds, dies)

    async def readline(self) -> bytes:
        if self._out:
            return self._out.popleft()
        if self._build is not None:
            ends, dies = self._build
            try:
                await asyncio.sleep(max(0.0, ends - asyncio.get_running_loop().time()))
            finally:
                self._end_build()
            if dies:
                self.kill()
                return b""
            digest = "sha256:" + hashlib.sha256(f"{self._node.name}{ends}".encode()).hexdigest()
            return protocol.encode("result", digest=digest, size=1234, media_type="application/vnd.oci")
        await self._closed.wait()  # nothing more to say until it is closed
        return b""

    def _end_build(self) -> None:
        if self._build is not None:
            self._build = None
            self._node.running -= 1

    async def readexactly(self, size: int) -> bytes:
        raise ConnectionError("the FAKE agent takes no blobs")

    def close_stdin(self) -> None:
        self.kill()

    async def wait(self) -> int:
        return 0

    def kill(self) -> None:
        self._end_build()
        self._closed.set()

    def stderr_tail(self) -> str:
        return ""


# --- a context as a client uploads it to farm serve ----------------------------------------------


def context_files(files: dict[str, bytes]) -> tuple[str, list[list[Any]], dict[str, bytes]]:
    """A context of ``files``: its digest, its manifest entries, its blobs by digest."""
    entries = [
        (name, stat.S_IFREG | 0o644, len(data), "sha256:" + hashlib.sha256(data).hexdigest(), "")
        for name, data in sorted(files.items())
    ]
    blobs = {"sha256:" + hashlib.sha256(data).hexdigest(): data for data in files.values()}
    digest = protocol.manifest_digest(protocol.canonical_manifest(entries))
    return digest, [list(entry) for entry in entries], blobs


def sync_body(digest: str, entries: list[list[Any]]) -> bytes:
    return json.dumps({"context": digest, "entries": entries}).encode()
