"""The server's coordinator: one queue for every client, the builds it runs, the nodes it watches.

    submit ─► history row (queued) ─► FairQueue ─► dispatcher: at most ``max_builds`` at once
          ─► BuildRequest (the context as the store holds it) ─► farm.build.run_build(…, pool)
          ─► its outcome (pushed, partial, failed, cancelled) ─► history row (ended), last stream line
                                 │ each PlatformEvent
                                 └─► the build's event stream, metrics

    NodePool (farm.pool), one for the server's life ◄── every build: probes due, faults, heartbeats,
      │                                                  the slots it holds
      ├── the prober: every ``probe_interval``, the nodes up or due; the drained list
      └── /api/nodes, the status page, the metrics: the same health, facts and slots

The nodes are one ``NodePool``: its SSH connections (one per node) live as long as the server, so
after the first probes no build makes a handshake; every build reads and feeds the same health, so
a node one build quarantined is avoided by the next until its probe passes, and the status page
shows what the builds see. The coordinator keeps no node state of its own.

Every task is owned by the coordinator's TaskGroup: the dispatcher, the prober and each running
build. A build's failure, whatever it is, ends that build only (``_run_job`` is the one place that
records it); stopping the server stops every build on every node, as Ctrl-C does for a local build,
then closes the pool's connections. How a build ended is one ``farm.api.Outcome``: its exit code is
the one the history keeps and the one every client following the build exits with.

The pool books the slots this server's builds hold, so the scheduler sees them across builds; the
agents on the nodes hold the nodes' slots (``agent.slots``), so builds of this server, of other
servers and of plain ``farm build`` runs share them fairly. ``max_builds`` bounds how many builds
this server drives at once (default: the inventory's slots in all).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from farm.api import (
    Assigned,
    Building,
    BuildOptions,
    BuildRequest,
    BuildResult,
    Cancelled,
    EventSink,
    Failed,
    LogLine,
    Outcome,
    Partial,
    PlatformEvent,
    PlatformFailed,
    Pushed,
    Retrying,
    Reused,
    Syncing,
    Verifying,
    outcome_of,
)
from farm.build import dry_run as plan_build
from farm.build import run_build
from farm.errors import (
    BuildCancelledError,
    BuildFailedError,
    FarmError,
    InputError,
    ServerBugError,
    ServerError,
    bug_in,
    error_leaves,
)
from farm.inventory import Inventory
from farm.metrics import FarmSnapshot, Metrics, NodeSnapshot
from farm.nodefacts import NodeFacts
from farm.nodes import Node
from farm.platforms import KNOWN_PLATFORMS, Platform, parse_platform
from farm.pool import NodePool
from farm.scheduler import Decision
from farm.serve.contexts import ContextStore, check_digest
from farm.serve.history import INTERRUPTED_QUEUED, INTERRUPTED_RUNNING, BuildRow, PlatformRow
from farm.serve.queue import FairQueue
from farm.serve.registries import RegistryPolicy
from farm.serve.state import StateFolder
from farm.serve.wire import event_to_json, result_to_json

__all__ = ["BuildFunction", "Coordinator", "CoordinatorOptions", "Job"]

log = logging.getLogger("farm.serve")

_KEEP_FINISHED = 32  # finished builds whose full event stream stays in memory
_MAX_LOG_LINES = 20_000  # log lines kept per build (its state events are always kept)
_PING_SECONDS = 15.0  # an idle event stream says it is alive this often
_PROBE_TIMEOUT = 60.0  # seconds a probe may take before the node counts as down
_MAX_SUBMITTER = 128  # characters of a submitter's name (the queue's lanes, the history)


# How the server builds: ``farm.build.run_build``; tests give their own.
BuildFunction = Callable[[BuildRequest, NodePool, EventSink], Awaitable[BuildResult]]


class CoordinatorOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_builds: int | None = Field(default=None, ge=1, description="None: the inventory's slots in all")
    probe_interval: float = Field(default=15.0, gt=0, description="seconds between node probes")
    store_limit: int = Field(default=10 * 1024**3, ge=0, description="bytes of context blobs kept")
    allow_host_network: bool = Field(
        default=False, description="may builds ask for --network host (RUN steps on the node's own network)"
    )


@dataclass
class LivePlatform:
    """One platform of a build the server runs, as its events tell it."""

    platform: str
    state: str = "queued"
    node: str | None = None
    mode: str | None = None
    started: float | None = None  # monotonic: when its current attempt began building
    seconds: float | None = None
    attempt_open: bool = False  # counted as started in the metrics, not yet as finished
    digest: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        seconds = self.seconds
        if seconds is None and self.started is not None:
            seconds = time.monotonic() - self.started
        return {
            "platform": self.platform,
            "state": self.state,
            "node": self.node,
            "mode": self.mode,
            "seconds": seconds,
            "digest": self.digest,
            "error": self.error,
        }


@dataclass
class Job:
    """A build the server holds in memory: queued, running, or recently ended."""

    id: str
    submitter: str
    options: dict[str, Any]
    context: str
    dockerfile: str
    tags: list[str]
    platform_names: list[str]
    submitted_at: float  # epoch seconds
    submitted_mono: float
    state: str = "queued"
    started_at: float | None = None
    ended_at: float | None = None
    error: FarmError | None = None
    result: BuildResult | None = None
    exit_code: int | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    platforms: dict[str, LivePlatform] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    log_lines: int = 0
    cancelled_by: str | None = None
    position: int | None = None  # in the queue, as last told to its followers

    def emit(self, line: dict[str, Any]) -> None:
        line["seq"] = len(self.lines)
        self.lines.append(line)
        self.wake.set()
        self.wake = asyncio.Event()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "submitter": self.submitter,
            "tags": self.tags,
            "platforms": self.platform_names,
            "context": self.context,
            "state": self.state,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "error": self.error.message if self.error else None,
            "exit_code": self.exit_code,
            "index_digest": self.result.index_digest if self.result else None,
            "platform_results": [
                self.platforms.get(name, LivePlatform(name)).to_json() for name in self.platform_names
            ],
        }


class Coordinator:
    def __init__(
        self,
        inventory: Inventory,
        state: StateFolder,
        options: CoordinatorOptions,
        version: str,
        registries: RegistryPolicy,
        *,
        pool: NodePool | None = None,
        build: BuildFunction = run_build,
    ) -> None:
        self.inventory = inventory
        self.state = state
        self.options = options
        self.registries = registries
        self.history = state.history
        self.metrics = Metrics(version, self.snapshot)
        self.contexts = ContextStore(state.store, options.store_limit, needed=self._needed)
        self.queue = FairQueue()
        self.jobs: dict[str, Job] = {}
        # The only node state the server has: builds, the prober, the API and the metrics read it.
        self.pool = pool or NodePool(
            inventory, probe_timeout=_PROBE_TIMEOUT, on_ssh_connect=self._ssh_connected
        )
        self._run_build = build
        self.max_builds = options.max_builds or max(1, sum(spec.slots for spec in inventory.nodes))
        self._finished: deque[str] = deque()
        self._running = 0
        self._wake = asyncio.Event()
        self._prune_due = True
        self._stopping = False

    # --- life ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Coordinator]:
        """Recover the history, then run the dispatcher and the prober until the block ends; the
        pool's connections close once every build has stopped."""
        interrupted = self.history.recover(time.time())
        if interrupted:
            log.warning("marked %d build(s) a previous run left unfinished as failed", len(interrupted))
        self._reconcile_drain()
        async with self.pool, asyncio.TaskGroup() as tasks:
            dispatcher = tasks.create_task(self._dispatch(tasks))
            prober = tasks.create_task(self._probe_forever())
            try:
                yield self
            finally:
                self._stop(dispatcher, prober)

    def _stop(self, *loops: asyncio.Task[None]) -> None:
        """Stop taking work; fail what waits; stop what runs (the TaskGroup waits for it)."""
        self._stopping = True
        for loop in loops:
            loop.cancel()
        while (build_id := self.queue.pop()) is not None:
            self._end(self.jobs[build_id], self._stopped(self.jobs[build_id], before_it_ran=True))
        for job in self.jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()

    async def _dispatch(self, tasks: asyncio.TaskGroup) -> None:
        while True:
            started = False
            while self._running < self.max_builds and (build_id := self.queue.pop()) is not None:
                job = self.jobs[build_id]
                self._running += 1
                job.task = tasks.create_task(self._run_job(job), name=f"build {job.id}")
                job.task.add_done_callback(functools.partial(self._reap, job))
                started = True
            if started:
                self._announce_positions()
            if self._prune_due:
                self._prune_due = False
                await self._prune()
            await self._wake.wait()
            self._wake.clear()

    def _needed(self) -> set[str]:
        """The contexts of the builds that wait or run: their blobs stay in the store."""
        return {job.context for job in self.jobs.values() if job.state in ("queued", "running")}

    async def _prune(self) -> None:
        try:
            await self.contexts.prune(self._needed(), self.options.store_limit)
        except OSError as exc:
            log.warning("could not prune the context store: %s", exc)

    # --- builds -------------------------------------------------------------------------------------

    async def submit(self, submitter: str, context: str, options: dict[str, Any], dockerfile: str) -> Job:
        if not submitter or len(submitter) > _MAX_SUBMITTER or not submitter.isprintable():
            raise InputError(f"a submitter is named by 1 to {_MAX_SUBMITTER} printable characters")
        check_digest(context)
        checked = self._check_options(options)
        builds = set(KNOWN_PLATFORMS)
        for node in self.pool.nodes:
            if node.facts is not None:
                builds |= _native_platforms(node.facts)
        await asyncio.to_thread(self._check_dockerfile, checked, dockerfile, sorted(builds))
        if self._stopping:
            raise ServerError("the server is stopping", status=503, hint="submit again once it is back")
        # Kept and run as checked: platforms normalised, defaults filled in.
        options = checked.model_dump(mode="json")
        if not self.contexts.has_context(context):
            raise ServerError(
                f"the server lacks part of context {context}", status=409, hint="sync the context again"
            )
        job = Job(
            id=uuid.uuid4().hex[:16],
            submitter=submitter,
            options=options,
            context=context,
            dockerfile=dockerfile,
            tags=list(checked.tags),
            platform_names=[str(p) for p in checked.platforms],
            submitted_at=time.time(),
            submitted_mono=time.monotonic(),
        )
        self.history.add(
            job.id,
            submitter=submitter,
            tags=job.tags,
            platforms=job.platform_names,
            options=options,
            context=context,
            submitted_at=job.submitted_at,
        )
        self.jobs[job.id] = job
        self.queue.push(submitter, job.id)
        job.position = self.queue.position(job.id)
        job.emit({"type": "queued", "position": job.position})
        log.info("build %s from %s queued: %s", job.id, submitter, ", ".join(job.tags))
        self._wake.set()
        return job

    async def plan(self, options: dict[str, Any]) -> list[Decision]:
        """What a build with these options would do now (``farm build --dry-run``)."""
        checked = self._check_options(options)
        self.pool.set_drained(self.state.drain.load())
        return await plan_build(checked, self.pool)

    def _check_options(self, options: dict[str, Any]) -> BuildOptions:
        """The options as ``run_build`` will get them, refused now if they cannot be."""
        document = dict(options)
        if "platforms" in options:
            document["platforms"] = _normalized_platforms(options["platforms"])
        try:
            checked = BuildOptions.model_validate(document)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise InputError(f"bad build options: {where}: {problem['msg']}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"bad build options: {exc}") from exc
        self.registries.check_options(checked.tags, checked.insecure_registries)
        if checked.network == "host" and not self.options.allow_host_network:
            raise InputError(
                "this farm server does not let builds use the nodes' own network (--network host)",
                hint="build with the default network, or ask its operator for --allow-host-network",
            )
        return checked

    def _check_dockerfile(self, options: BuildOptions, dockerfile: str, builds: list[Platform]) -> None:
        """Refuse a Dockerfile the build could not start from, or whose bases the server may not fetch
        (``builds``: the platforms a node may build on). Pure: run in a worker thread."""
        try:
            self.registries.check_dockerfile(dockerfile, options.build_args, options.platforms, builds)
        except InputError:
            raise
        except FarmError as exc:
            raise InputError(f"the Dockerfile cannot be built: {exc.message}", hint=exc.hint) from exc

    async def cancel(self, build_id: str, by: str) -> dict[str, Any]:
        """Cancel a queued or running build; return its status once it has stopped."""
        job = self.jobs.get(build_id)
        if job is None:
            row = self._row(build_id)
            return row.to_json()
        job.cancelled_by = by
        if self.queue.remove(build_id):
            self._end(job, self._stopped(job, before_it_ran=True))
            self._announce_positions()
        elif job.task is not None and not job.task.done():
            job.task.cancel()
            # Not cancelled with the request: a client that gives up waiting stops nothing.
            await asyncio.wait([job.task], timeout=120)
        return job.to_json()

    async def _run_job(self, job: Job) -> None:
        job.state = "running"
        job.started_at = time.time()
        self.history.start(job.id, job.started_at)
        self.metrics.queue_waited(time.monotonic() - job.submitted_mono)
        job.emit({"type": "started"})
        log.info("build %s started", job.id)
        try:
            result = await self._build(job)
        except asyncio.CancelledError:
            self._end(job, self._stopped(job, before_it_ran=False))
            raise
        except Exception as exc:  # the one place where a build's end, bug or not, is recorded
            self._end(job, outcome_of(self._as_farm_error(job, exc)))
        else:
            self._end(job, outcome_of(result))

    def _reap(self, job: Job, _: object = None) -> None:
        """A build's task is done: free its place; end it if it was cancelled before it began."""
        self._running -= 1
        self._prune_due = True
        self._wake.set()
        if not job.done.is_set():
            self._end(job, self._stopped(job, before_it_ran=True))

    def _stopped(self, job: Job, before_it_ran: bool) -> Failed | Cancelled:
        """How a build stopped by a client or by the server's own stop ends."""
        if self._stopping:
            return Failed(ServerError(INTERRUPTED_QUEUED if before_it_ran else INTERRUPTED_RUNNING))
        message = f"build {job.id} was cancelled by {job.cancelled_by or 'a client'}"
        return Cancelled(BuildCancelledError(message + (" before it ran" if before_it_ran else "")))

    async def _build(self, job: Job) -> BuildResult:
        async with self.contexts.context(job.context) as context:
            request = BuildRequest(BuildOptions.model_validate(job.options), context, job.dockerfile)
            self.pool.set_drained(self.state.drain.load())
            return await self._run_build(request, self.pool, lambda e: self._on_event(job, e))

    @staticmethod
    def _as_farm_error(job: Job, exc: Exception) -> FarmError:
        """The error a build ended with; a bug anywhere in it (a group's other errors aside) is a
        ``ServerBugError``, as a bug ends a local ``farm build`` with exit 70."""
        bug = bug_in(exc)
        failures = [leaf for leaf in error_leaves(exc) if isinstance(leaf, FarmError)]
        if bug is None and failures:
            return failures[0]
        bug = bug or exc
        log.error("build %s hit a bug in farm:\n%s", job.id, "".join(traceback.format_exception(exc)))
        return ServerBugError(
            f"internal error in farm serve while running build {job.id}: {type(bug).__name__}: {bug}",
            hint="the server's log has the traceback; this is a bug, please report it",
        )

    def _end(self, job: Job, outcome: Outcome) -> None:
        """Record how a build ended: memory, metrics, history, and the last line of its stream."""
        result = outcome.result if isinstance(outcome, Pushed | Partial) else None
        error = outcome.error if isinstance(outcome, Failed | Cancelled) else None
        state = job.state = outcome.state
        job.ended_at = time.time()
        job.error, job.result = error, result
        job.exit_code = outcome.exit_code
        rows = self._close_platforms(job, state, error, result)
        self.metrics.build_finished(
            {"succeeded": "success", "partial": "partial", "cancelled": "cancelled"}.get(state, "failure")
        )
        if result is not None:
            self.metrics.index_pushed(True)
        elif isinstance(outcome, Failed) and job.started_at is not None and _index_push_failed(job, error):
            self.metrics.index_pushed(False)
        self.history.finish(
            job.id,
            state=state,
            ended_at=job.ended_at,
            platforms=rows,
            exit_code=job.exit_code,
            error=error.to_json() if error else None,
            result=result_to_json(result) if result else None,
        )
        if result is not None:
            job.emit({"type": "result", "result": result_to_json(result)})
        else:
            assert error is not None
            job.emit({"type": "error", "error": error.to_json()})
        job.done.set()
        log.info("build %s %s%s", job.id, state, f": {error.message}" if error else "")
        self._finished.append(job.id)
        while len(self._finished) > _KEEP_FINISHED:
            self.jobs.pop(self._finished.popleft(), None)

    def _close_platforms(
        self, job: Job, state: str, error: FarmError | None, result: BuildResult | None
    ) -> list[PlatformRow]:
        """Every platform's row for the history, and the metrics of attempts still open."""
        rows: dict[str, PlatformRow] = {}
        for item in result.platforms if result else ():
            name = str(item.platform)
            live = job.platforms.setdefault(name, LivePlatform(name))
            live.node, live.mode, live.seconds = item.node, item.mode, item.seconds
            live.state, live.digest = "reused" if item.reused else "success", item.digest
            if item.reused:
                self.metrics.platform_reused(name)
            else:
                self.metrics.platform_finished(name, item.mode, "success", item.seconds)
                live.attempt_open = False
            rows[name] = PlatformRow(
                name, item.node, item.mode, item.seconds, item.digest, "reused" if item.reused else "success"
            )
        failures = error.failures if isinstance(error, BuildFailedError) else {}
        missing = result.missing if result else {}
        for name in job.platform_names:
            live = job.platforms.setdefault(name, LivePlatform(name))
            if name in rows:
                continue
            if live.attempt_open:
                if state == "cancelled" or self._stopping:
                    outcome = "cancelled"
                else:
                    outcome = "success" if live.state == "verifying" else "failure"
                self.metrics.platform_finished(name, live.mode or "native", outcome)
                live.attempt_open = False
            if name in missing:
                why: str | None = missing[name]
                kind = "missing"
            elif name in failures:
                why, kind = failures[name].message, "failure"
            else:
                why = error.message if error else None
                kind = "cancelled" if state == "cancelled" else "failure"
            live.state, live.error = kind, why
            if live.started is not None and live.seconds is None:
                live.seconds = time.monotonic() - live.started
            rows[name] = PlatformRow(name, live.node, live.mode, live.seconds, None, kind, why)
        return [rows[name] for name in job.platform_names if name in rows]

    def _on_event(self, job: Job, event: PlatformEvent) -> None:
        """One event of a running build: its stream, its platform, the metrics (what it says of its
        node, the build told the pool itself)."""
        name = str(event.platform)
        live = job.platforms.setdefault(name, LivePlatform(name))
        node = event.node if event.node in self.pool else None
        if isinstance(event, LogLine):
            job.log_lines += 1
            if job.log_lines > _MAX_LOG_LINES:
                if job.log_lines == _MAX_LOG_LINES + 1:
                    note = f"(farm serve keeps {_MAX_LOG_LINES} log lines per build; the rest is dropped)"
                    job.emit({"type": "event", **event_to_json(LogLine(event.platform, event.node, note))})
                return
        else:
            live.state = event.state
        match event:
            case Assigned():
                live.node, live.mode, live.seconds = node, None, None
            case Syncing(sent=sent) if sent is not None:
                self.metrics.context_synced(sent.sent_bytes, sent.skipped_bytes)
            case Building(mode=mode):
                live.node, live.mode, live.started = event.node, mode, time.monotonic()
                if not live.attempt_open:
                    live.attempt_open = True
                    self.metrics.platform_started(name, mode)
                self.history.platform_started(job.id, name, event.node, mode)
                if mode == "emulated":
                    self.metrics.emulation_fallback(name, self._fallback_reason(name))
            case Verifying():
                if live.started is not None:
                    live.seconds = time.monotonic() - live.started
            case PlatformFailed() | Retrying():
                if live.attempt_open:
                    self.metrics.platform_finished(name, live.mode or "native", "failure")
                    live.attempt_open = False
            case Reused():
                live.node = event.node
        job.emit({"type": "event", **event_to_json(event)})

    def _fallback_reason(self, platform: str) -> str:
        """Why a platform is emulated, from what the server knows of its nodes."""
        native = [
            node
            for node in self.pool.nodes
            if node.facts is not None and platform in {str(p) for p in _native_platforms(node.facts)}
        ]
        if not native:
            return "no_native_node"
        if any(node.health.state == "up" for node in native):
            return "native_busy"
        return "native_unavailable"

    def _announce_positions(self) -> None:
        """Tell each waiting build where it stands now, if that changed."""
        for position, build_id in enumerate(self.queue.items()):
            job = self.jobs[build_id]
            if job.position != position:
                job.position = position
                job.emit({"type": "queued", "position": position})

    # --- what clients read ------------------------------------------------------------------------------

    def status(self, build_id: str) -> dict[str, Any]:
        job = self.jobs.get(build_id)
        if job is not None:
            document = job.to_json()
            if build_id in self.queue:
                document["position"] = self.queue.position(build_id)
            return document
        return self._row(build_id).to_json()

    def builds(self, limit: int) -> list[dict[str, Any]]:
        """The latest builds, newest first; the ones in memory as they are now."""
        rows = self.history.recent(limit)
        return [self.jobs[row.id].to_json() if row.id in self.jobs else row.to_json() for row in rows]

    def _row(self, build_id: str) -> BuildRow:
        row = self.history.get(build_id)
        if row is None:
            raise ServerError(f"no build {build_id} on this server", status=404)
        return row

    async def follow(self, build_id: str, after: int = 0) -> AsyncIterator[dict[str, Any] | None]:
        """The build's stream lines from ``after`` on, as they come; None now and then when idle."""
        job = self.jobs.get(build_id)
        if job is None:
            row = self._row(build_id)
            if row.result is not None:
                yield {"type": "result", "result": row.result, "seq": 0}
            else:
                error = row.error_json or ServerError(row.error or f"the build {row.state}").to_json()
                yield {"type": "error", "error": error, "seq": 0}
            return
        index = max(0, after)
        while True:
            while index < len(job.lines):
                yield job.lines[index]
                index += 1
            if job.done.is_set():
                return
            wake = job.wake
            try:
                async with asyncio.timeout(_PING_SECONDS):
                    await wake.wait()
            except TimeoutError:
                yield None

    # --- nodes ------------------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        if name not in self.pool:
            raise ServerError(f"no node named {name!r} in {self.inventory.source}", status=404)
        return self.pool.node(name)

    def nodes_json(self) -> list[dict[str, Any]]:
        """Every node as ``/api/nodes`` and the status page show it, in inventory order."""
        return [self.node_json(node) for node in self.pool.nodes]

    def set_drained(self, name: str, drained: bool) -> dict[str, Any]:
        node = self.node(name)
        self.state.drain.set(name, drained)
        self._reconcile_drain()
        return self.node_json(node)

    def node_json(self, node: Node) -> dict[str, Any]:
        age = _heartbeat_age(node, self.pool.clock())
        try:
            emulated = sorted(str(p) for p in node.facts.emulated_platforms) if node.facts else []
        except FarmError:
            emulated = []
        return {
            "name": node.name,
            "address": "local" if node.spec.local else node.spec.host,
            "state": node.health.state,
            "platform": _platform(node),
            "emulates": emulated,
            "slots": node.spec.slots,
            "busy": node.busy,
            "heartbeat_age": age,
            "last_seen": None if age is None else time.time() - age,
            "probed_at": node.probed_at,
            "builder": node.builder or None,
            "problem": node.problem.message if node.problem is not None else None,
            "labels": dict(node.spec.labels),
        }

    def snapshot(self) -> FarmSnapshot:
        now = self.pool.clock()
        return FarmSnapshot(
            nodes=tuple(
                NodeSnapshot(
                    name=node.name,
                    state=node.health.state,
                    platform=_platform(node),
                    slots=node.spec.slots,
                    busy=node.busy,
                    heartbeat_age=_heartbeat_age(node, now),
                )
                for node in self.pool.nodes
            ),
            queue_length=len(self.queue),
            builds_running=self._running,
        )

    def _reconcile_drain(self) -> None:
        """Follow the drained list (changed by the API or by ``farm nodes drain`` alike)."""
        try:
            drained = self.state.drain.load()
        except InputError as exc:
            log.warning("%s", exc.message)
            return
        self.pool.set_drained(drained)

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self.probe_nodes()
            except Exception:  # a bug in probing must not take the builds down with it: say it, go on
                log.exception("probing the nodes failed (a bug in farm; please report it)")
            await asyncio.sleep(self.options.probe_interval)

    async def probe_nodes(self) -> None:
        """Probe, concurrently, every node up or due (not cordoned nor held back)."""
        self._reconcile_drain()
        await self.pool.refresh(watch=True)

    def _ssh_connected(self, node: str, seconds: float | None) -> None:
        if seconds is None:
            self.metrics.ssh_failed(node)
        else:
            self.metrics.ssh_connected(node, seconds)


def _normalized_platforms(value: Any) -> list[Platform]:
    """The platforms a client asked for, as ``parse_platform`` spells them (``linux/arm64/v8`` is
    ``linux/arm64``), each once: given as strings or as ``{os, architecture, variant}``."""
    if not isinstance(value, list):
        raise InputError("bad build options: platforms must be a list")
    platforms: list[Platform] = []
    for item in value:
        if isinstance(item, dict) and set(item) <= {"os", "architecture", "variant"}:
            parts = [item.get("os"), item.get("architecture"), item.get("variant") or ""]
            if not all(isinstance(part, str) and "/" not in part for part in parts):
                raise InputError(f"bad build options: malformed platform {str(item)[:100]}")
            text = "/".join(part for part in parts if part)
        elif isinstance(item, str):
            text = item
        else:
            raise InputError(f"bad build options: malformed platform {str(item)[:100]}")
        if len(text) > 100:
            raise InputError(f"bad build options: malformed platform {text[:100]!r}…")
        platform = parse_platform(text)
        if platform not in platforms:
            platforms.append(platform)
    return platforms


def _platform(node: Node) -> str:
    """The node's native platform, "unknown" before its first probe."""
    if node.facts is None:
        return "unknown"
    try:
        return str(node.facts.native_platform)
    except FarmError:
        return "unknown"


def _heartbeat_age(node: Node, now: float) -> float | None:
    seen = node.health.last_seen
    return None if seen is None else max(0.0, now - seen)


def _native_platforms(facts: NodeFacts) -> frozenset[Any]:
    try:
        return facts.native_platforms
    except FarmError:
        return frozenset()


def _index_push_failed(job: Job, error: FarmError | None) -> bool:
    """A failure after every platform was built and verified: the index could not be pushed."""
    if error is None or isinstance(error, BuildFailedError | ServerError):
        return False
    states = {name: job.platforms.get(name, LivePlatform(name)).state for name in job.platform_names}
    return all(state in ("verifying", "done") for state in states.values())
