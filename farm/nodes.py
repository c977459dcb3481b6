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

__all__ = ["Node", "check_nodes", "containment_problem", "open_nodes", "probe"]


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
            return LocalTransport(spec)
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
    node.problem = containment_problem(node.spec, facts)
    if node.problem is not None:
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


def containment_problem(spec: NodeSpec, facts: NodeFacts) -> NodeError | None:
    """Why this node cannot contain a build as the inventory asks, if it cannot: an agent running
    as root that the inventory did not put there, RUN steps it cannot sandbox, a rootless builder
    without subordinate ids. Weaker containment is never chosen silently."""
    if facts.runs_as_root and not spec.root_on_purpose:
        return NodeError(
            f"{spec.name}: the agent runs as root there; a build that escapes its sandbox would be root",
            node=spec.name,
            hint="log in as an unprivileged user (deploy/node/setup-node.sh creates one), or set "
            "'user: root' on this node to build as root on purpose",
        )
    containers_tools = {"buildah", "podman"} & set(facts.builders)
    if spec.isolation == "oci" and containers_tools and not facts.oci_runtime:
        return NodeError(
            f"{spec.name}: no OCI runtime (runc) there to sandbox RUN steps with",
            node=spec.name,
            hint="install runc on the node (deploy/node/setup-node.sh does), or set "
            "'isolation: chroot' on this node to build without a sandbox on purpose",
        )
    if containers_tools and not facts.private_network:
        return NodeError(
            f"{spec.name}: RUN steps cannot get a network of their own there (no slirp4netns)",
            node=spec.name,
            hint="install slirp4netns on the node (deploy/node/setup-node.sh does)",
        )
    if containers_tools and not facts.runs_as_root and not facts.rootless_ready:
        return NodeError(
            f"{spec.name}: {facts.user or 'the agent'} has no subordinate uids and gids for rootless builds",
            node=spec.name,
            hint=f"add ranges for {facts.user or 'the user'} to /etc/subuid and /etc/subgid and install "
            "uidmap (deploy/node/setup-node.sh does both)",
        )
    return None


async def check_nodes(inventory: Inventory, drained: frozenset[str], names: tuple[str, ...]) -> list[Node]:
    """Probe the inventory's nodes (or only ``names``) in parallel."""
    async with open_nodes(inventory, drained) as nodes:
        chosen = [node for node in nodes if not names or node.name in names]
        # ``probe`` keeps a node's failure in ``problem``: whatever escapes it is a bug (or a
        # cancellation), and stops the other probes before the connections close under them.
        async with asyncio.TaskGroup() as probes:
            for node in chosen:
                probes.create_task(probe(node))
        return chosen
