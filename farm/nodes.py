"""The inventory's nodes as the coordinator works with them: reached and probed.

``open_nodes`` gives every node of an inventory its transport (one SSH connection pool for all);
``probe`` asks a node's agent what the node is and decides whether it can take work. Both
``farm build`` and ``farm nodes check`` go through here, so they can never disagree about a node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from farm.errors import FarmError, NodeError
from farm.inventory import Inventory, NodeSpec
from farm.nodefacts import NodeFacts
from farm.session import open_session
from farm.transport import LocalTransport, Transport

__all__ = ["Node", "check_nodes", "open_nodes", "probe"]


@dataclass
class Node:
    spec: NodeSpec
    transport: Transport
    drained: bool = False
    facts: NodeFacts | None = None
    builder: str = ""
    problem: FarmError | None = None  # why the node cannot take work now
    syncing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one context sync at a time

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def usable(self) -> bool:
        return self.facts is not None and self.problem is None and not self.drained


@contextlib.asynccontextmanager
async def open_nodes(
    inventory: Inventory, drained: frozenset[str] = frozenset()
) -> AsyncIterator[list[Node]]:
    """The inventory's nodes with their transports; SSH connections are closed on exit."""
    connections = None
    if not all(spec.local for spec in inventory.nodes):
        # Imported only when needed: asyncssh takes a quarter of a second to import.
        from farm.transport.ssh import SshConnections, SshTransport

        connections = SshConnections()

    def transport(spec: NodeSpec) -> Transport:
        if spec.local:
            return LocalTransport()
        assert connections is not None
        return SshTransport(spec, connections)

    nodes = [Node(spec, transport(spec), drained=spec.name in drained) for spec in inventory.nodes]
    try:
        yield nodes
    finally:
        if connections is not None:
            await connections.close()


async def probe(node: Node) -> None:
    """Learn what the node is; a node that cannot be probed keeps the reason in ``problem``."""
    try:
        async with open_session(node.name, node.transport, node.spec.agent_workdir()) as session:
            node.facts = await session.facts()
    except FarmError as exc:
        node.problem = exc
        return
    facts = node.facts
    try:
        native = facts.native_platform
    except FarmError as exc:
        node.problem = NodeError(f"{node.name}: {exc.message}", node=node.name)
        return
    if node.spec.platforms is not None and native not in node.spec.platforms:
        node.problem = NodeError(
            f"{node.name}: the inventory says it builds {', '.join(map(str, node.spec.platforms))} "
            f"natively, but the node is {native}",
            node=node.name,
            hint="fix 'platforms' for this node, or drop it to use what the node reports",
        )
        return
    wanted = node.spec.builder
    available = facts.builders
    if wanted == "auto":
        node.builder = available[0] if available else ""
    elif wanted in available:
        node.builder = wanted
    if not node.builder:
        node.problem = NodeError(
            f"{node.name}: builder {wanted!r} is not usable there (found: {', '.join(available) or 'none'})",
            node=node.name,
            hint="install buildah, podman or docker on the node, or set 'builder' to one it has",
        )


async def check_nodes(inventory: Inventory, drained: frozenset[str], names: tuple[str, ...]) -> list[Node]:
    """Probe the inventory's nodes (or only ``names``) in parallel."""
    async with open_nodes(inventory, drained) as nodes:
        chosen = [node for node in nodes if not names or node.name in names]
        await asyncio.gather(*(probe(node) for node in chosen))
        return chosen
