"""The node pool: the inventory's nodes for one process, and the only source of truth about them.

    NodePool ─► per node (``farm.nodes.Node``): its transport (an SSH node: the one connection of
                ``SshConnections``, reused by every probe and build), what its last probe found
                (facts, builder, problem), its health (``farm.health``), the slots builds hold
      refresh() / probe(name)   probe the nodes due; one probe of a node at a time, and its
                                result is the node's health (probe_passed / probe_failed)
      views()                   the nodes as the scheduler sees them: facts, health, busy slots
      take(name) / release(name)  slot bookkeeping across every build of the process
      report(name, event)       a build's news of a node: a heartbeat, a node fault (quarantine)
      set_drained(names)        follow the drained list (draining / active)
      changed()                 a future resolved at the next change: a waiting build looks again

``farm build`` opens one for its build (``async with NodePool(inventory, drained=...)``); ``farm
serve`` keeps one for its life, so every build and the status page read the same health: a node
that one build quarantined is avoided by the next until a probe of it passes, and once the nodes
are connected a build makes no new SSH handshake. ``farm nodes check`` probes through a pool too
(``check_nodes``), so a build and a check can never disagree about a node.

Nothing here decides: health transitions are ``farm.health``'s, placements ``farm.scheduler``'s.
The pool feeds them events with the time of its ``clock`` (a test gives a fake one) and owns what
it starts: the probes of ``refresh`` run in a task group; a caller's own probe runs in its task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Coroutine, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from farm.errors import FarmError, NodeError
from farm.health import Event
from farm.inventory import Inventory, NodeSpec
from farm.nodes import Node, probe
from farm.scheduler import NodeView
from farm.transport import AgentProcess, LocalTransport, Transport

if TYPE_CHECKING:
    from farm.transport.ssh import ConnectObserver, SshConnections

__all__ = ["MakeTransport", "NodePool", "check_nodes"]

MakeTransport = Callable[[NodeSpec], Transport]


class NodePool:
    """The inventory's nodes, reached, probed, kept healthy and booked, for one process.

    ``transport`` makes each node's transport (default: a local subprocess for a local node, the
    pool's SSH connections for the others); ``probe_timeout`` bounds a probe (None: the SSH
    connect timeout and the agent's answer bound it); ``on_ssh_connect`` hears of each SSH
    connection made or given up on. An ``async with`` block closes the SSH connections at its end.
    """

    def __init__(
        self,
        inventory: Inventory,
        *,
        drained: Collection[str] = frozenset(),
        transport: MakeTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe_timeout: float | None = None,
        on_ssh_connect: ConnectObserver | None = None,
    ) -> None:
        self.inventory = inventory
        self.clock = clock
        self._probe_timeout = probe_timeout
        self._on_ssh_connect = on_ssh_connect
        self._ssh: SshConnections | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        make = transport or self._transport
        self.nodes: list[Node] = [Node(spec, make(spec)) for spec in inventory.nodes]
        self._by_name = {node.name: node for node in self.nodes}
        self.set_drained(drained)

    async def __aenter__(self) -> NodePool:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the SSH connections; an agent still running on one ends with it."""
        connections, self._ssh = self._ssh, None
        if connections is not None:
            await connections.close()

    # --- the nodes -------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def views(self) -> list[NodeView]:
        """The nodes as the scheduler sees them now (a node never probed cannot be placed)."""
        views = []
        for node in self.nodes:
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
                    busy=node.busy,
                    state=node.health.state,
                    labels=node.spec.labels,
                    speed=node.spec.speed,
                    back_at=node.health.back_at,
                )
            )
        return views

    # --- probing ---------------------------------------------------------------------------------

    async def refresh(self, names: Iterable[str] | None = None, *, watch: bool = False) -> None:
        """Probe, concurrently, each node (of ``names``; default: every node) due for a probe
        (``NodeHealth.due_for_probe``: never probed, no longer held back, or up but not heard from
        for a while) or being probed now (its probe is waited for). With ``watch``, every up node
        too (``farm serve``'s prober: its status page and heartbeat ages stay fresh), but one
        whose builds could hold every session of its SSH connection: they watch it. A cordoned
        node is left alone."""
        now = self.clock()
        chosen = self.nodes if names is None else [self._by_name[name] for name in names]
        due = [node for node in chosen if _wants_probe(node, now, watch)]
        if not due:
            return
        # A probe keeps a node's failure in ``problem``: whatever escapes it is a bug (or a
        # cancellation), and stops the other probes before the connections close under them.
        async with asyncio.TaskGroup() as probes:
            for node in due:
                probes.create_task(self.probe(node.name))

    def probe(self, name: str) -> Coroutine[object, object, Node]:
        """Probe ``name`` now and make the result its health. One probe of a node at a time: a
        probe that ends after this call while this one waits for its turn answers for it too."""
        node = self._by_name[name]
        return self._probe_once(node, asked=node.probes)  # counted now, not when a task starts

    async def _probe_once(self, node: Node, asked: int) -> Node:
        async with node.probing:
            if node.probes == asked:
                await self._probe(node)
        return node

    async def _probe(self, node: Node) -> None:
        node.probed_at = time.time()
        try:
            async with asyncio.timeout(self._probe_timeout) as deadline:
                await probe(node)
        except TimeoutError:
            if not deadline.expired():
                raise
            node.problem = NodeError(
                f"{node.name}: no answer to a probe within {self._probe_timeout:.0f} s", node=node.name
            )
        node.probes += 1
        passed = node.facts is not None and node.problem is None
        self._apply(node, "probe_passed" if passed else "probe_failed")
        self._notify()  # facts, builder or problem may have changed whatever the health did

    # --- health and slots ------------------------------------------------------------------------

    def report(self, name: str, event: Event) -> None:
        """What a build saw of a node, now: ``heartbeat`` (a sign of life), ``heartbeat_lost`` or
        ``build_failed_node_fault`` (quarantined, held back with growing backoff). An event the
        node's state does not take is ignored."""
        self._apply(self._by_name[name], event)

    def set_drained(self, drained: Collection[str]) -> None:
        """Follow the drained list: the nodes named drain, the others drained before come back."""
        for node in self.nodes:
            if node.name in drained and node.health.admin == "active":
                self._apply(node, "drain")
            elif node.name not in drained and node.health.admin == "draining":
                self._apply(node, "undrain")

    def take(self, name: str) -> None:
        """A build holds one of ``name``'s slots from now (the scheduler chose the node)."""
        self._by_name[name].busy += 1

    def release(self, name: str) -> None:
        """A build gives back the slot it took."""
        node = self._by_name[name]
        if node.busy < 1:
            raise ValueError(f"{name}: a slot given back that no build held")
        node.busy -= 1
        self._notify()

    @property
    def busy(self) -> int:
        """Slots held on every node, by every build of the process."""
        return sum(node.busy for node in self.nodes)

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the pool's next change (a slot given back, a probe's result, a node
        held back or drained): a build waiting for a node asks the scheduler again then. Cancel it
        when no longer waiting."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)
        return waiter

    def _apply(self, node: Node, event: Event) -> None:
        if not node.health.accepts(event):
            return
        before = node.health
        node.health = before.apply(event, self.clock())
        if (node.health.state, node.health.back_at) != (before.state, before.back_at):
            self._notify()

    def _notify(self) -> None:
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(None)

    # --- transports ------------------------------------------------------------------------------

    def _transport(self, spec: NodeSpec) -> Transport:
        if spec.local:
            return LocalTransport(spec)
        return _SshNode(spec, self._ssh_connections)

    def _ssh_connections(self) -> SshConnections:
        if self._ssh is None:
            # Imported once a node is reached: asyncssh takes a quarter of a second to import, and
            # an unchanged rebuild (every platform reused) reaches no node.
            from farm.transport.ssh import SshConnections

            self._ssh = SshConnections(on_connect=self._on_ssh_connect)
        return self._ssh


class _SshNode:
    """An SSH node's transport: the agent over the pool's one connection to the node."""

    def __init__(self, spec: NodeSpec, connections: Callable[[], SshConnections]) -> None:
        self._spec = spec
        self._connections = connections

    def open_agent(self, workdir: str) -> AbstractAsyncContextManager[AgentProcess]:
        from farm.transport.ssh import SshTransport

        return SshTransport(self._spec, self._connections()).open_agent(workdir)


# Builds on an SSH node that leave a session of its connection free for a probe: the connection
# carries ``farm.transport.ssh.MAX_SESSIONS`` (9), one per agent. A probe queued behind them would
# time out and mark a busy node down.
_ROOM_FOR_A_PROBE = 8


def _wants_probe(node: Node, now: float, watch: bool) -> bool:
    health = node.health
    if health.admin == "cordoned":
        return False
    if health.due_for_probe(now) or node.probing.locked():
        return True
    room = node.spec.local or node.busy < _ROOM_FOR_A_PROBE
    return watch and health.health == "up" and room


async def check_nodes(inventory: Inventory, drained: frozenset[str], names: tuple[str, ...]) -> list[Node]:
    """Probe the inventory's nodes (or only ``names``) in parallel, as a build would."""
    async with NodePool(inventory, drained=drained) as pool:
        chosen = [node for node in pool.nodes if not names or node.name in names]
        await pool.refresh([node.name for node in chosen])
        return chosen
