"""One node as the coordinator works with it, and how a node is examined.

``Node`` is a node of the inventory with its transport and what the process knows of it now:
what its last probe found (facts, builder, problem), its health and the slots builds hold on it.
``farm.pool.NodePool`` owns every ``Node`` of a process and is the only one to change them;
``probe`` asks a node's agent what the node is and decides whether it can take work. Builds,
``farm serve`` and ``farm nodes check`` all probe through the pool, so they can never disagree
about a node.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from farm.errors import FarmError, NodeError
from farm.health import NodeHealth
from farm.inventory import NodeSpec
from farm.nodefacts import NodeFacts
from farm.session import open_session
from farm.transport import Transport

__all__ = ["Node", "containment_problem", "examine", "probe"]


@dataclass
class Node:
    spec: NodeSpec
    transport: Transport
    health: NodeHealth = field(init=False)  # changed by the pool alone
    facts: NodeFacts | None = None
    builder: str = ""
    problem: FarmError | None = None  # why the node cannot take work now
    busy: int = 0  # slots the process's builds hold on it
    probed_at: float | None = None  # epoch seconds when its last probe began
    probes: int = 0  # probes finished (a probe asked for while one ran is answered by it)
    probing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one probe at a time
    syncing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one context sync at a time

    def __post_init__(self) -> None:
        self.health = NodeHealth(self.spec.name)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def drained(self) -> bool:
        return self.health.admin == "draining"

    @property
    def usable(self) -> bool:
        return self.facts is not None and self.problem is None and not self.drained


async def probe(node: Node) -> None:
    """Learn what the node is; a node that cannot be probed keeps the reason in ``problem`` (and
    the facts of its last good probe). Facts, builder and problem change together, at the end."""
    try:
        async with open_session(node.name, node.transport, node.spec.agent_workdir()) as session:
            facts = await session.facts()
    except FarmError as exc:
        node.problem = exc
        return
    node.facts = facts
    node.builder, node.problem = examine(node.spec, facts)


def examine(spec: NodeSpec, facts: NodeFacts) -> tuple[str, NodeError | None]:
    """The builder a node with these facts uses, or why it cannot take work."""
    try:
        native = facts.native_platform
    except FarmError as exc:
        return "", NodeError(f"{spec.name}: {exc.message}", node=spec.name)
    if spec.platforms is not None and native not in spec.platforms:
        return "", NodeError(
            f"{spec.name}: the inventory says it builds {', '.join(map(str, spec.platforms))} "
            f"natively, but the node is {native}",
            node=spec.name,
            hint="fix 'platforms' for this node, or drop it to use what the node reports",
        )
    problem = containment_problem(spec, facts)
    if problem is not None:
        return "", problem
    wanted = spec.builder
    available = facts.builders
    if wanted == "auto":
        builder = available[0] if available else ""
    else:
        builder = wanted if wanted in available else ""
    if not builder:
        return "", NodeError(
            f"{spec.name}: builder {wanted!r} is not usable there (found: {', '.join(available) or 'none'})",
            node=spec.name,
            hint="install buildah, podman or docker on the node, or set 'builder' to one it has",
        )
    return builder, None


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
