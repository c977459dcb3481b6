"""One build: plan, dispatch, collect, verify, stitch — all or nothing.

    BuildRequest ─► probe the nodes due ─► plan (scheduler) ─► pin base images by digest
            ─► per platform, concurrently: slot → sync context → build → push by digest → verify
            ─► index ─► PUT under every tag, only when every platform succeeded

``read_request`` makes the request from a context folder and a Dockerfile (``farm build``);
``farm serve`` makes it from what a client sent. The nodes are the process's ``NodePool``
(``farm.pool``): ``farm build`` opens one for its build, ``farm serve`` passes the one it keeps,
so what a build learns of a node (a fault, a sign of life) every later build knows. Progress is
reported as the build API's events (``farm.api``) to a callback; the result is one
``BuildResult`` from which the CLI writes the summary and the metadata file, and ``farm serve``
its history.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from farm import mediatypes
from farm.api import (
    Assigned,
    Building,
    BuildOptions,
    BuildRequest,
    BuildResult,
    ContextSync,
    EventSink,
    LogLine,
    PlatformEvent,
    PlatformFailed,
    PlatformResult,
    Retrying,
    Reused,
    Syncing,
    Verifying,
    Waiting,
)
from farm.context import Context, StatCache, scan_context
from farm.dockerfile import BaseImage, image_references, image_registries, pin_images
from farm.errors import (
    BuildFailedError,
    ContextError,
    FarmError,
    InputError,
    PlanError,
    RegistryError,
)
from farm.index import Descriptor
from farm.paths import CACHE_DIR
from farm.platforms import Platform, normalize, parse_platform
from farm.registry.client import Manifest, RegistryClient
from farm.registry.name import Reference
from farm.registry.verify import LayerScan, verify_image
from farm.scheduler import Decision, Fail, Mode, Request, affinity_key, plan
from farm.stitch import Source, existing_children, push_index

# farm.dispatch, farm.pool, farm.nodes and farm.session are imported where a build reaches its
# nodes: an unchanged rebuild (every platform reused) never does, and its start-up is most of its time.
if TYPE_CHECKING:
    from farm.dispatch import Outcome
    from farm.nodes import Node
    from farm.pool import NodePool
    from farm.session import AgentSession

__all__ = ["dry_run", "read_request", "run_build"]


async def read_request(options: BuildOptions, context: Path, dockerfile: Path | None = None) -> BuildRequest:
    """The request to build ``options`` from the ``context`` folder (scanned once, ``.dockerignore``
    applied) and ``dockerfile`` (default: CONTEXT/Dockerfile)."""
    scanned = await asyncio.to_thread(scan_context, context, StatCache.for_context(context))
    return BuildRequest(options, scanned, read_dockerfile(dockerfile or context / "Dockerfile"))


async def run_build(request: BuildRequest, pool: NodePool, on_event: EventSink) -> BuildResult:
    """Build ``request`` on the ``pool``'s nodes and push its index."""
    options, context, dockerfile_text = request.options, request.context, request.dockerfile
    tags = options.references()
    target = tags[0]
    async with (
        RegistryClient(insecure_registries=options.insecure_registries) as client,
        _Pins(client, dockerfile_text, options) as pins,
    ):
        await client.ping(target)
        records = _BuildRecords.load()
        keys = {p: _build_key(context, await pins.dockerfile(p, p), options, p) for p in options.platforms}
        reused = {} if options.no_cache else await _reusable(client, target, records, keys, on_event)
        wanted = [platform for platform in options.platforms if platform not in reused]
        built: dict[Platform, PlatformResult] = {}
        failures: dict[Platform, FarmError] = {}
        scans: dict[str, LayerScan] = {}
        if wanted:
            outcome = await _dispatch(
                client, wanted, pool, pins, context, dockerfile_text, options, target, scans, on_event
            )
            built = {platform: cast(PlatformResult, result) for platform, result in outcome.results.items()}
            failures = outcome.failures
        for platform, result in built.items():
            records.entries[keys[platform]] = result.record(target)
        records.save()
        results = [reused.get(p) or built[p] for p in options.platforms if p in reused or p in built]
        if failures and not (options.allow_partial and results):
            raise BuildFailedError({str(p): error for p, error in failures.items()})
        children = tuple(Descriptor(r.media_type, r.digest, r.size, r.platform) for r in results)
        base = await existing_children(client, target) if options.append else []
        index = await push_index(
            client, tags, [Source(target, children)], base=base, base_repository=target,
            annotations=options.annotations or None, scans=scans,
        )  # fmt: skip
    missing = {str(p): error.message for p, error in failures.items()}
    return BuildResult(tuple(tags), index.digest, index.media_type, index.size, tuple(results), missing)


async def _dispatch(
    client: RegistryClient,
    platforms: list[Platform],
    pool: NodePool,
    pins: _Pins,
    context: Context,
    dockerfile_text: str,
    options: BuildOptions,
    target: Reference,
    scans: dict[str, LayerScan],
    on_event: EventSink,
) -> Outcome:
    """Probe the pool's nodes that are due and build ``platforms`` on them, failing over as needed."""
    from farm.dispatch import Dispatch

    async def run(platform: Platform, node: Node, mode: Mode, reason: str) -> PlatformResult:
        assert node.facts is not None
        dockerfile = await pins.dockerfile(platform, node.facts.native_platform)

        def on_node_event(event: PlatformEvent) -> None:
            pool.report(node.name, "heartbeat")  # whatever the node says proves it alive
            on_event(event)

        return await _build_platform(
            client, node, platform, mode, context, dockerfile, options, target, scans, on_node_event
        )

    def report(platform: Platform, node: str, state: str, detail: str) -> None:
        on_event(_dispatch_event(platform, node, state, detail))

    await pool.refresh()
    _require_a_usable_node(pool.nodes)
    if not options.allow_partial:
        _refuse_what_cannot_be_placed(options, platforms, pool)
    history = _History.load()
    affinity = _affinity(context, dockerfile_text, options)
    outcome = await Dispatch(pool, options.policy, history.entries, options.retries, run, report).run(
        platforms, affinity
    )
    for platform, result in outcome.results.items():
        history.entries[(affinity, platform)] = cast(PlatformResult, result).node
    history.save()
    return outcome


def _build_key(context: Context, pinned: str, options: BuildOptions, platform: Platform) -> str:
    """What makes two builds of a platform the same build: the context, the Dockerfile with its
    bases pinned (a moved base tag is a new build), the arguments, the target."""
    material = json.dumps(
        [context.digest, pinned, sorted(options.build_args.items()), options.target, str(platform)]
    )
    return hashlib.sha256(material.encode()).hexdigest()


async def _reusable(
    client: RegistryClient,
    target: Reference,
    records: _BuildRecords,
    keys: dict[Platform, str],
    on_event: EventSink,
) -> dict[Platform, PlatformResult]:
    """Platforms built before from the same inputs whose image is still in the target repository."""
    candidates = {
        platform: record
        for platform, record in ((p, records.entries.get(key)) for p, key in keys.items())
        if record is not None and record.get("repository") == target.name
    }
    async with asyncio.TaskGroup() as heads:
        found = [
            heads.create_task(client.head_manifest(target.with_digest(str(record["digest"]))))
            for record in candidates.values()
        ]
    reused: dict[Platform, PlatformResult] = {}
    for (platform, record), present in zip(candidates.items(), found, strict=True):
        if present.result() is None:
            continue  # deleted from the registry since: build it again
        reused[platform] = PlatformResult(
            platform=platform,
            node=str(record["node"]),
            mode=cast(Mode, record["mode"]),
            digest=str(record["digest"]),
            size=int(str(record["size"])),
            media_type=str(record["media_type"]),
            seconds=0.0,
            reused=True,
        )
        on_event(Reused(platform, str(record["node"]), str(record["digest"])))
    return reused


class _BuildRecords:
    """Images farm built, by the inputs that made them (for no-op rebuilds), kept across builds."""

    def __init__(self, path: Path, entries: dict[str, dict[str, object]]) -> None:
        self.path = path
        self.entries = entries

    @classmethod
    def load(cls, path: Path = CACHE_DIR / "builds.json") -> _BuildRecords:
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def save(self, keep: int = 5000) -> None:
        kept = dict(list(self.entries.items())[-keep:])
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(kept))
            partial.replace(self.path)


def _affinity(context: Context, dockerfile: str, options: BuildOptions) -> str:
    """What makes a node's cache warm for a build: the context, the Dockerfile, its arguments."""
    arguments = json.dumps([sorted(options.build_args.items()), options.target])
    return affinity_key(context.digest, hashlib.sha256(dockerfile.encode()).hexdigest(), arguments)


class _History:
    """Which node last built which context and platform (cache affinity), kept across builds."""

    def __init__(self, path: Path, entries: dict[tuple[str, Platform], str]) -> None:
        self.path = path
        self.entries = entries

    @classmethod
    def load(cls, path: Path = CACHE_DIR / "history.json") -> _History:
        entries: dict[tuple[str, Platform], str] = {}
        try:
            for key, platform, node in json.loads(path.read_text()):
                entries[(str(key), parse_platform(str(platform)))] = str(node)
        except (OSError, ValueError, TypeError, FarmError):
            pass  # no history, or a damaged one: only the cache affinity is lost
        return cls(path, entries)

    def save(self, keep: int = 2000) -> None:
        rows = [[key, str(platform), node] for (key, platform), node in self.entries.items()][-keep:]
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            # Private (0600): it names the contexts and nodes this user builds with.
            with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
                os.fchmod(out.fileno(), 0o600)
                out.write(json.dumps(rows))
            partial.replace(self.path)


def read_dockerfile(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ContextError(
            f"Dockerfile {path} does not exist",
            hint="pass -f PATH, or put a Dockerfile in the context folder",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ContextError(f"cannot read Dockerfile {path}: {exc}") from exc


def _require_a_usable_node(nodes: list[Node]) -> None:
    """Say why no node can work, before the scheduler only sees an empty farm."""
    if any(node.usable for node in nodes):
        return
    problems = [node.problem for node in nodes if node.problem is not None]
    if len(problems) == 1:
        raise problems[0]
    reasons = "; ".join(problem.message for problem in problems) or "every node is drained"
    raise PlanError(f"no node is usable ({reasons})", hint="see 'farm nodes check'")


def _refuse_what_cannot_be_placed(options: BuildOptions, platforms: list[Platform], pool: NodePool) -> None:
    """Before building anything: a platform no node could ever take fails the build now."""
    now = pool.clock()
    requests = [Request(platform, waiting_since=now) for platform in platforms]
    decisions = plan(requests, pool.views(), options.policy, {}, now)
    failing = [decision for decision in decisions if isinstance(decision, Fail)]
    if len(failing) == 1:
        raise failing[0].error()
    if failing:
        raise PlanError(
            f"no node can build {', '.join(str(decision.platform) for decision in failing)}",
            hint="; ".join(decision.message for decision in failing),
        )


class _Pins:
    """Each platform's Dockerfile with its bases pinned: a base's manifest is fetched once, and
    resolved once per platform.

    The lookups are tasks shared by every platform that needs them, so none belongs to one
    platform: they are the ``async with`` block's, cancelled and awaited at its end. A lookup's
    failure reaches each platform that awaits it (and fails that platform only, as any error of
    its own would), never the others.
    """

    def __init__(self, client: RegistryClient, text: str, options: BuildOptions) -> None:
        self._client = client
        self._text = text
        self._options = options
        self._manifests: dict[Reference, asyncio.Task[Manifest]] = {}
        self._digests: dict[BaseImage, asyncio.Task[str]] = {}

    async def __aenter__(self) -> _Pins:
        return self

    async def __aexit__(self, *_: object) -> None:
        tasks: list[asyncio.Task[Any]] = [*self._digests.values(), *self._manifests.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # seen: the platforms that awaited it have reported it

    async def dockerfile(self, target: Platform, build: Platform) -> str:
        uses = image_references(self._text, target=target, build=build, build_args=self._options.build_args)
        bases = [use.image for use in uses]
        for base in bases:
            if base not in self._digests:
                self._digests[base] = asyncio.create_task(self._resolve(base))
        digests = {base: await self._digests[base] for base in bases}
        return pin_images(self._text, uses, digests)

    async def _resolve(self, base: BaseImage) -> str:
        if base.reference not in self._manifests:
            self._manifests[base.reference] = asyncio.create_task(_fetch_base(self._client, base.reference))
        return await _resolve_base(self._client, base, await self._manifests[base.reference])


async def _fetch_base(client: RegistryClient, reference: Reference) -> Manifest:
    try:
        return await client.get_manifest(reference)
    except RegistryError as exc:
        raise RegistryError(f"cannot resolve base image {reference}: {exc.message}", hint=exc.hint) from exc


async def _resolve_base(client: RegistryClient, base: BaseImage, manifest: Manifest) -> str:
    """The digest of ``base``'s image for its platform, looked up once for every node."""
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
    platform: Platform,
    mode: Mode,
    context: Context,
    dockerfile: str,
    options: BuildOptions,
    target: Reference,
    scans: dict[str, LayerScan],
    on_event: EventSink,
) -> PlatformResult:
    from farm.session import open_session

    name = node.spec.name
    assert node.facts is not None
    started = time.monotonic()
    async with open_session(name, node.transport, node.spec.agent_workdir()) as session:
        await _sync_for_build(
            session,
            node,
            context,
            lambda sent: on_event(Syncing(platform, name, len(context.entries), context.size, sent)),
        )
        on_event(Building(platform, name, mode))
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
                "isolation": node.spec.isolation,
                "network": options.network,
                "slots": node.spec.slots,
                "insecure_registries": [h for h in plain_http if client.is_plain_http(h)],
                "push": {
                    "registry_url": client.base_url(target),
                    "repository": target.repository,
                    # For this build only: held in the agent's memory, never on the node's disk.
                    "authorization": await client.push_authorization(target),
                },
            },
            lambda line: on_event(LogLine(platform, name, line)),
            lambda: client.push_authorization(target),
        )
    seconds = time.monotonic() - started
    on_event(Verifying(platform, name, str(reply["digest"])))
    descriptor = await verify_image(client, target, str(reply["digest"]), platform, scans)
    return PlatformResult(
        platform=platform,
        node=name,
        mode=mode,
        digest=descriptor.digest,
        size=descriptor.size,
        media_type=descriptor.media_type,
        seconds=seconds,
    )


async def _sync_for_build(
    session: AgentSession, node: Node, context: Context, report: Callable[[ContextSync | None], None]
) -> None:
    """Sync the context in the session that builds it: the agent leases what it holds for as long as
    that session lives, so nothing the build lays out can be evicted before it is laid out (a sync
    in an earlier session holds nothing once that session ends). One sync at a time per node: the
    node's other platforms find nothing left to send, only the manifest goes again."""
    async with node.syncing:
        report(None)
        blobs, sent = await session.sync(context)
        report(ContextSync(context.size, blobs, sent))


def _dispatch_event(platform: Platform, node: str, state: str, detail: str) -> PlatformEvent:
    """The dispatch loop's news (a state and a line of text) as the build API's event."""
    if state == "waiting":
        return Waiting(platform, node, detail)
    if state == "assigned":
        return Assigned(platform, node, detail)
    if state == "retrying":
        return Retrying(platform, node, detail)
    if state == "failed":
        return PlatformFailed(platform, node, detail)
    raise ValueError(f"the dispatch loop reported {state!r}, which is no state it has")


def _plain_http_bases(client: RegistryClient, dockerfile: str) -> set[str]:
    return {host for host in image_registries(dockerfile) if client.is_plain_http(host)}


async def dry_run(options: BuildOptions, pool: NodePool) -> list[Decision]:
    """What ``farm build`` would do now on the ``pool``'s nodes, and why, for every platform;
    nothing is built."""
    await pool.refresh()
    _require_a_usable_node(pool.nodes)
    now = pool.clock()
    requests = [Request(platform, waiting_since=now) for platform in options.platforms]
    return plan(requests, pool.views(), options.policy, _History.load().entries, now)
