"""One ``farm build``: plan, dispatch, collect, verify, stitch — all or nothing.

    options ─► scan context ─► probe nodes ─► plan (scheduler) ─► pin base images by digest
            ─► per platform, concurrently: slot → sync context → build → push by digest → verify
            ─► index ─► PUT under every tag, only when every platform succeeded

Progress is reported as ``PlatformEvent``s to a callback; the result is one ``BuildResult`` from
which the CLI writes the summary and the metadata file.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from farm import mediatypes
from farm.context import Context, scan_context
from farm.dockerfile import BaseImage, parse_stages, pin_bases
from farm.errors import (
    BuildFailedError,
    ContextError,
    FarmError,
    InputError,
    InventoryError,
    NodeError,
    PlanError,
    RegistryError,
)
from farm.index import Descriptor, build_index
from farm.inventory import Inventory, NodeSpec
from farm.nodefacts import NodeFacts
from farm.platforms import Platform, normalize
from farm.registry.client import RegistryClient
from farm.registry.name import Reference, parse_reference
from farm.registry.verify import LayerScan, verify_image
from farm.scheduler import Assignment, Candidate, Mode, plan_build
from farm.session import AgentSession, open_session
from farm.transport import LocalTransport, Transport
from farm.transport.ssh import SshConnections, SshTransport

__all__ = ["BuildOptions", "BuildResult", "PlatformEvent", "PlatformResult", "run_build"]


class BuildOptions(BaseModel):
    """A ``farm build`` request, as the CLI parsed it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    context: Path
    dockerfile: Path | None = None
    tags: tuple[str, ...] = Field(min_length=1)
    platforms: tuple[Platform, ...] = Field(min_length=1)
    build_args: dict[str, str] = Field(default_factory=dict)
    target: str = ""
    insecure_registries: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlatformEvent:
    platform: Platform
    node: str
    state: str  # queued, syncing, building, verifying, done, failed, log
    detail: str = ""


@dataclass(frozen=True)
class PlatformResult:
    platform: Platform
    node: str
    mode: Mode
    digest: str
    size: int
    media_type: str
    seconds: float


@dataclass(frozen=True)
class BuildResult:
    tags: tuple[Reference, ...]
    index_digest: str
    index_media_type: str
    index_size: int
    platforms: tuple[PlatformResult, ...]

    def metadata(self) -> dict[str, Any]:
        """The ``--metadata-file`` document, with buildx's key names where buildx has them."""
        return {
            "containerimage.digest": self.index_digest,
            "containerimage.descriptor": {
                "mediaType": self.index_media_type,
                "digest": self.index_digest,
                "size": self.index_size,
            },
            "image.name": ",".join(str(tag) for tag in self.tags),
            "farm.platforms": {
                str(result.platform): {
                    "digest": result.digest,
                    "node": result.node,
                    "mode": result.mode,
                    "seconds": round(result.seconds, 3),
                }
                for result in self.platforms
            },
        }


EventSink = Callable[[PlatformEvent], None]


@dataclass
class _Node:
    spec: NodeSpec
    transport: Transport
    facts: NodeFacts | None = None
    builder: str = ""
    problem: FarmError | None = None  # why the node cannot be used in this build
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    synced: asyncio.Lock = field(default_factory=asyncio.Lock)
    synced_contexts: set[str] = field(default_factory=set)


async def run_build(options: BuildOptions, inventory: Inventory, on_event: EventSink) -> BuildResult:
    tags = _parse_tags(options.tags)
    context = await asyncio.to_thread(scan_context, options.context)
    dockerfile_text = _read_dockerfile(options)
    connections = SshConnections()
    nodes = [
        _Node(spec, _transport_for(spec, connections), slots=asyncio.Semaphore(spec.slots))
        for spec in inventory.nodes
    ]
    try:
        return await _build(options, tags, context, dockerfile_text, nodes, on_event)
    finally:
        await connections.close()


async def _build(
    options: BuildOptions,
    tags: list[Reference],
    context: Context,
    dockerfile_text: str,
    nodes: list[_Node],
    on_event: EventSink,
) -> BuildResult:
    target = tags[0]
    async with RegistryClient(insecure_registries=options.insecure_registries) as client:
        await client.ping(target)
        await asyncio.gather(*(_probe(node) for node in nodes))
        by_name = {node.spec.name: node for node in nodes}
        assignments = _plan(options.platforms, nodes)
        dockerfiles = await _pin_dockerfiles(client, dockerfile_text, options, assignments, by_name)
        results: dict[Platform, PlatformResult] = {}
        failures: dict[str, FarmError] = {}
        scans: dict[str, LayerScan] = {}

        async def build_one(assignment: Assignment) -> None:
            node = by_name[assignment.node]
            try:
                results[assignment.platform] = await _build_platform(
                    client, node, assignment, context, dockerfiles[assignment.platform],
                    options, target, scans, on_event,
                )  # fmt: skip
                on_event(PlatformEvent(assignment.platform, node.spec.name, "done"))
            except FarmError as exc:
                failures[str(assignment.platform)] = exc
                on_event(PlatformEvent(assignment.platform, node.spec.name, "failed", exc.message))

        async with asyncio.TaskGroup() as group:
            for assignment in assignments:
                group.create_task(build_one(assignment))
        if failures:
            raise BuildFailedError(failures)
        ordered = [results[platform] for platform in options.platforms]
        index = build_index([Descriptor(r.media_type, r.digest, r.size, r.platform) for r in ordered])
        # Every child is verified in the target repository before any tag moves.
        await client.put_manifest(target.with_digest(index.digest), index.raw, index.media_type)
        for tag in tags:
            await client.put_manifest(tag, index.raw, index.media_type)
    return BuildResult(tuple(tags), index.digest, index.media_type, index.size, tuple(ordered))


def _parse_tags(texts: tuple[str, ...]) -> list[Reference]:
    tags = [parse_reference(text) for text in texts]
    for tag in tags:
        if tag.digest:
            raise InputError(f"tag {tag} names a digest", hint="tag with NAME:TAG; farm computes the digest")
    names = {tag.name for tag in tags}
    if len(names) > 1:
        raise InputError(
            f"tags name different repositories: {', '.join(sorted(names))}",
            hint="give tags of one repository; copy the result elsewhere afterwards",
        )
    return tags


def _read_dockerfile(options: BuildOptions) -> str:
    path = options.dockerfile or options.context / "Dockerfile"
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ContextError(
            f"Dockerfile {path} does not exist",
            hint="pass -f PATH, or put a Dockerfile in the context folder",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ContextError(f"cannot read Dockerfile {path}: {exc}") from exc


def _transport_for(spec: NodeSpec, connections: SshConnections) -> Transport:
    return LocalTransport() if spec.local else SshTransport(spec, connections)


async def _probe(node: _Node) -> None:
    """Learn what the node is; a node that cannot be probed is left out with its reason."""
    try:
        async with open_session(node.spec.name, node.transport, node.spec.agent_workdir()) as session:
            node.facts = await session.facts()
    except FarmError as exc:
        node.problem = exc
        return
    facts = node.facts
    if node.spec.platforms is not None and facts.native_platform not in node.spec.platforms:
        raise InventoryError(
            f"node {node.spec.name!r}: the inventory says it builds "
            f"{', '.join(map(str, node.spec.platforms))} natively, but it is {facts.native_platform}",
            hint="fix 'platforms' for this node, or drop it to use what the node reports",
        )
    wanted = node.spec.builder
    available = facts.builders
    if wanted == "auto":
        node.builder = available[0] if available else ""
    elif wanted in available:
        node.builder = wanted
    if not node.builder:
        node.problem = NodeError(
            f"{node.spec.name}: builder {wanted!r} is not usable there "
            f"(found: {', '.join(available) or 'none'})",
            node=node.spec.name,
            hint="install a builder on the node, or set 'builder' to one it has",
        )


def _plan(platforms: tuple[Platform, ...], nodes: list[_Node]) -> list[Assignment]:
    try:
        return plan_build(platforms, _candidates(nodes))
    except PlanError as exc:
        unusable = [node.problem.message for node in nodes if node.problem is not None]
        if not unusable:
            raise
        raise PlanError(exc.message, hint=f"{exc.hint}. Not usable now: {'; '.join(unusable)}") from exc


def _candidates(nodes: list[_Node]) -> list[Candidate]:
    candidates = []
    for node in nodes:
        if node.facts is None or node.problem:
            continue
        candidates.append(
            Candidate(
                name=node.spec.name,
                native=node.facts.native_platforms,
                emulated=node.facts.emulated_platforms,
                emulation_allowed=node.spec.emulation,
                slots=node.spec.slots,
            )
        )
    if not candidates:
        problems = [node.problem for node in nodes if node.problem is not None]
        if len(problems) == 1:
            raise problems[0]
        reasons = "; ".join(problem.message for problem in problems)
        raise PlanError(f"no node is usable ({reasons})")
    return candidates


async def _pin_dockerfiles(
    client: RegistryClient,
    text: str,
    options: BuildOptions,
    assignments: list[Assignment],
    nodes: dict[str, _Node],
) -> dict[Platform, str]:
    """Each platform's Dockerfile with its bases pinned to the digest of the right platform."""
    stages_of = {}
    for assignment in assignments:
        facts = nodes[assignment.node].facts
        assert facts is not None
        stages_of[assignment.platform] = parse_stages(
            text,
            target=assignment.platform,
            build=facts.native_platform,
            build_args=options.build_args,
        )
    bases = {stage.base for stages in stages_of.values() for stage in stages if stage.base}
    resolved = await asyncio.gather(*(_resolve_base(client, base) for base in bases))
    digests = dict(zip(bases, resolved, strict=True))
    return {platform: pin_bases(text, stages, digests) for platform, stages in stages_of.items()}


async def _resolve_base(client: RegistryClient, base: BaseImage) -> str:
    """The digest of ``base``'s image for its platform, looked up once for every node."""
    try:
        manifest = await client.get_manifest(base.reference)
    except RegistryError as exc:
        raise RegistryError(
            f"cannot resolve base image {base.reference}: {exc.message}", hint=exc.hint
        ) from exc
    document = manifest.json()
    if manifest.media_type in mediatypes.INDEX_TYPES:
        offered = []
        for child in document.get("manifests", []):
            declared = child.get("platform") or {}
            try:
                platform = normalize(
                    declared.get("os", ""),
                    declared.get("architecture", ""),
                    declared.get("variant", ""),
                )
            except FarmError:
                continue  # attestations (unknown/unknown) and platforms farm does not build
            if platform == base.platform:
                return str(child["digest"])
            offered.append(str(platform))
        raise InputError(
            f"base image {base.reference} has no {base.platform} image",
            hint=f"it has: {', '.join(offered) or 'no platform images'}",
        )
    config = await client.get_blob(base.reference, document["config"]["digest"])
    declared = json.loads(config)
    platform = normalize(
        declared.get("os", ""), declared.get("architecture", ""), declared.get("variant", "")
    )
    if platform != base.platform:
        raise InputError(f"base image {base.reference} is {platform} only; a {base.platform} stage needs it")
    return manifest.digest


async def _build_platform(
    client: RegistryClient,
    node: _Node,
    assignment: Assignment,
    context: Context,
    dockerfile: str,
    options: BuildOptions,
    target: Reference,
    scans: dict[str, LayerScan],
    on_event: EventSink,
) -> PlatformResult:
    platform, name = assignment.platform, node.spec.name
    assert node.facts is not None
    on_event(PlatformEvent(platform, name, "queued", assignment.reason))
    async with node.slots:
        started = time.monotonic()
        async with open_session(name, node.transport, node.spec.agent_workdir()) as session:
            await _ensure_synced(
                session,
                node,
                context,
                lambda d: on_event(PlatformEvent(platform, name, "syncing", d)),
            )
            on_event(PlatformEvent(platform, name, "building", assignment.mode))
            build_args = {
                **options.build_args,
                **platform.build_args("TARGET"),
                **node.facts.native_platform.build_args("BUILD"),
            }
            plain_http = sorted(
                {target.registry, *options.insecure_registries} | _plain_http_bases(client, dockerfile)
            )
            reply = await session.build(
                {
                    "build_id": uuid.uuid4().hex,
                    "context": context.digest,
                    "platform": str(platform),
                    "dockerfile": dockerfile,
                    "build_args": build_args,
                    "target": options.target,
                    "builder": node.builder,
                    "insecure_registries": [h for h in plain_http if client.is_plain_http(h)],
                    "push": {
                        "registry_url": client.base_url(target),
                        "repository": target.repository,
                        "authorization": None,
                    },
                },
                lambda line: on_event(PlatformEvent(platform, name, "log", line)),
            )
        seconds = time.monotonic() - started
    on_event(PlatformEvent(platform, name, "verifying", str(reply["digest"])))
    descriptor = await verify_image(client, target, str(reply["digest"]), platform, scans)
    return PlatformResult(
        platform=platform,
        node=name,
        mode=assignment.mode,
        digest=descriptor.digest,
        size=descriptor.size,
        media_type=descriptor.media_type,
        seconds=seconds,
    )


async def _ensure_synced(
    session: AgentSession, node: _Node, context: Context, report: Callable[[str], None]
) -> None:
    """Sync the context to a node once per build, however many of its platforms run there."""
    async with node.synced:
        if context.digest in node.synced_contexts:
            return
        report(f"{len(context.entries)} entries, {context.size} bytes")
        blobs, sent = await session.sync(context)
        node.synced_contexts.add(context.digest)
        report(f"sent {blobs} files, {sent} bytes")


def _plain_http_bases(client: RegistryClient, dockerfile: str) -> set[str]:
    hosts = set()
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] and words[0].upper() == "FROM":
            image = next((w for w in words[1:] if not w.startswith("--")), "")
            if "/" in image:
                try:
                    hosts.add(parse_reference(image).registry)
                except FarmError:
                    continue
    return {host for host in hosts if client.is_plain_http(host)}
