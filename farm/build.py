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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from farm import mediatypes
from farm.context import Context, StatCache, scan_context
from farm.dockerfile import BaseImage, parse_stages, pin_bases
from farm.errors import (
    BuildFailedError,
    ContextError,
    FarmError,
    InputError,
    PlanError,
    RegistryError,
)
from farm.index import Descriptor
from farm.inventory import Inventory
from farm.nodes import Node, candidates, open_nodes, probe
from farm.platforms import Platform, normalize
from farm.registry.client import RegistryClient
from farm.registry.name import Reference, parse_reference
from farm.registry.verify import LayerScan, verify_image
from farm.scheduler import Assignment, Mode, plan_build
from farm.session import AgentSession, open_session
from farm.stitch import Source, existing_children, push_index

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
    append: bool = Field(default=False, description="replace only these platforms in what the tag holds")
    annotations: dict[str, str] = Field(default_factory=dict, description="index annotations")


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


async def run_build(
    options: BuildOptions,
    inventory: Inventory,
    on_event: EventSink,
    drained: frozenset[str] = frozenset(),
) -> BuildResult:
    tags = _parse_tags(options.tags)
    context = await asyncio.to_thread(scan_context, options.context, StatCache.for_context(options.context))
    dockerfile_text = _read_dockerfile(options)
    async with open_nodes(inventory, drained) as nodes:
        return await _build(options, tags, context, dockerfile_text, nodes, on_event)


async def _build(
    options: BuildOptions,
    tags: list[Reference],
    context: Context,
    dockerfile_text: str,
    nodes: list[Node],
    on_event: EventSink,
) -> BuildResult:
    target = tags[0]
    async with RegistryClient(insecure_registries=options.insecure_registries) as client:
        await client.ping(target)
        await asyncio.gather(*(probe(node) for node in nodes))
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
        built = Source(target, tuple(Descriptor(r.media_type, r.digest, r.size, r.platform) for r in ordered))
        base = await existing_children(client, target) if options.append else []
        index = await push_index(
            client, tags, [built], base=base, base_repository=target,
            annotations=options.annotations or None, scans=scans,
        )  # fmt: skip
    return BuildResult(tuple(tags), index.digest, index.media_type, index.size, tuple(ordered))


def _parse_tags(texts: tuple[str, ...]) -> list[Reference]:
    tags = [parse_reference(text) for text in texts]
    for tag in tags:
        if tag.digest:
            raise InputError(f"tag {tag} names a digest", hint="tag with NAME:TAG; farm computes the digest")
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


def _plan(platforms: tuple[Platform, ...], nodes: list[Node]) -> list[Assignment]:
    try:
        usable = candidates(nodes)
        if not usable:
            problems = [node.problem for node in nodes if node.problem is not None]
            if len(problems) == 1:
                raise problems[0]
            reasons = "; ".join(problem.message for problem in problems) or "every node is drained"
            raise PlanError(f"no node is usable ({reasons})")
        return plan_build(platforms, usable)
    except PlanError as exc:
        unusable = [node.problem.message for node in nodes if node.problem is not None]
        unusable += [f"{node.name} is drained" for node in nodes if node.drained]
        if not unusable or exc.hint is None:
            raise
        raise PlanError(exc.message, hint=f"{exc.hint}. Not usable now: {'; '.join(unusable)}") from exc


async def _pin_dockerfiles(
    client: RegistryClient,
    text: str,
    options: BuildOptions,
    assignments: list[Assignment],
    nodes: dict[str, Node],
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
    node: Node,
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
                    "slots": node.spec.slots,
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
    session: AgentSession, node: Node, context: Context, report: Callable[[str], None]
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
