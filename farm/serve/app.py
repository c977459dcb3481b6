"""``farm serve``: the HTTP API (aiohttp) in front of the coordinator, and the server's life.

Every request needs ``Authorization: Bearer TOKEN`` (``/metrics`` too: Prometheus sends it with
``authorization: {credentials_file: …}``). The status page also takes ``/?token=TOKEN`` once and
keeps it in a cookie, which is honoured for GET requests only, so no form on another site can
make a browser change anything here.

    GET    /                             the status page (HTML)
    GET    /metrics                      Prometheus exposition
    GET    /api/server                   version, inventory, queue
    POST   /api/contexts/sync            {context, entries} → {missing, missing_bytes}
    POST   /api/contexts/{digest}/blobs  blob frames → {received, bytes, complete}
    POST   /api/builds                   {submitter, context, options, dockerfile} → {id, state, position}
    POST   /api/plans                    {options} → {decisions}  (farm build --dry-run)
    GET    /api/builds?limit=N           the latest builds
    GET    /api/builds/{id}              one build's status
    GET    /api/builds/{id}/events       its event stream, NDJSON, live (``?after=SEQ`` to resume)
    DELETE /api/builds/{id}              cancel it; answers once it has stopped
    GET    /api/nodes                    the nodes as the server last saw them
    POST   /api/nodes/{name}/drain       take no new builds (what runs finishes)
    POST   /api/nodes/{name}/undrain

Errors come back as ``{"error": {...}}`` (``farm.serve.wire.error_to_json``) with a 4xx/5xx status.

Whatever a client sends is bounded (``farm.serve.guard``): connections, the time a request head and
a body may take, each body's size for what it carries (a manifest may be large, the rest is
small); a manifest is checked entry by entry as it is parsed (``farm.serve.contexts``), a build
against the registries the server may contact (``farm.serve.registries``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import json
import logging
import os
import pwd
import re
import resource
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, Field, field_validator

from farm.errors import FarmError, InputError, InventoryError, RegistryError, ServerError
from farm.inventory import Inventory, load_inventory
from farm.registry.credentials import DockerKeychain
from farm.serve.contexts import MAX_ENTRIES
from farm.serve.coordinator import Coordinator, CoordinatorOptions
from farm.serve.guard import ConnectionGuard, RepeatFilter, read_body
from farm.serve.page import render_login, render_status
from farm.serve.registries import RegistryPolicy, normalize_registry
from farm.serve.state import open_state
from farm.serve.wire import decision_to_json, error_to_json

__all__ = ["ServeOptions", "make_app", "parse_size", "serve"]

log = logging.getLogger("farm.serve")

_COOKIE = "farm_token"
# A manifest's entries are ~100-250 bytes of JSON each (escaped non-ASCII paths, more).
_MAX_MANIFEST_BODY = MAX_ENTRIES * 512
_MAX_REQUEST_BODY = 1024 * 1024  # a build's options and its Dockerfile; a plan's options
_BODY_TIMEOUT = 60.0  # seconds a request body may go without a byte
_FILES_KEPT = 256  # file descriptors kept for all but client connections: history, store, SSH, builders
_LOOPBACK = ("127.0.0.1", "::1", "localhost")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ServeOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: str = Field(default="127.0.0.1:8750", description="HOST:PORT, [IPv6]:PORT")
    inventory: Path | None = None
    state_dir: Path
    token: str | None = None
    coordinator: CoordinatorOptions = Field(default_factory=CoordinatorOptions)
    allow_registries: tuple[str, ...] = Field(
        default=(), description="HOST[:PORT] the server may contact; none: docker.io and its docker config's"
    )
    max_connections: int = Field(default=1024, ge=1, description="open client connections at once")
    header_timeout: float = Field(default=10.0, gt=0, description="seconds to send a whole request head")

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        _split_listen(value)
        return value

    @field_validator("allow_registries")
    @classmethod
    def _registries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(normalize_registry(item) for item in value))

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


def refuse_local_nodes_sharing_the_server_user(inventory: Inventory, uid: int, user: str) -> None:
    """A build on a local node running as the server's own user could read the server's token, state
    and credentials: such a node is configured on purpose (its ``user:`` names that user) or not at
    all. A root server's local nodes build as farm-build unless told otherwise."""
    for spec in inventory.nodes:
        if spec.local and spec.user is None and uid != 0:
            raise InventoryError(
                f"{inventory.source}: node {spec.name!r}: its builds would run as {user}, this server's own "
                "user, and could read the server's token and credentials",
                hint="reach this machine over SSH as an unprivileged build user instead, or set "
                f"'user: {user}' on the node to accept that on purpose",
            )


def _split_listen(value: str) -> tuple[str, int]:
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {value!r}: write HOST:PORT, e.g. 127.0.0.1:8750")
    return host.removeprefix("[").removesuffix("]") or "127.0.0.1", int(port)


_SIZE = re.compile(r"([0-9]+)\s*(|B|KiB|MiB|GiB|TiB)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str, option: str) -> int:
    """Bytes from ``10GiB``, ``512MiB``, ``4096`` (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise InputError(
            f"{option} {text!r} is not a size", hint="write e.g. 10GiB, 512MiB or a number of bytes"
        )
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def version() -> str:
    try:
        return importlib.metadata.version("farm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def serve(options: ServeOptions, stop: asyncio.Event, on_ready: Callable[[str], None]) -> None:
    """Run the server until ``stop`` is set; then stop every build and answer what waits."""
    inventory = load_inventory(options.inventory)
    refuse_local_nodes_sharing_the_server_user(inventory, os.geteuid(), pwd.getpwuid(os.geteuid()).pw_name)
    registries = _registry_policy(options)
    state = open_state(options.state_dir, options.token)
    if state.token_file is not None:
        log.info("clients need the token in %s", state.token_file)
    max_connections = _room_for_connections(options.max_connections)
    try:
        with _repeats_limited():
            coordinator = Coordinator(inventory, state, options.coordinator, version(), registries)
            guard = ConnectionGuard(max_connections=max_connections, header_timeout=options.header_timeout)
            runner = web.AppRunner(
                make_app(coordinator, state.token, guard),
                access_log=None,
                shutdown_timeout=10,
                # A head after a response, or on an idle connection, gets as long as the first one.
                keepalive_timeout=options.header_timeout,
            )
            await runner.setup()
            try:
                async with coordinator.running():
                    assert runner.server is not None
                    listener = await _listen(guard.protocols(runner.server), options)
                    try:
                        host = f"[{options.host}]" if ":" in options.host else options.host
                        port = int(listener.sockets[0].getsockname()[1])
                        if options.host not in _LOOPBACK:
                            log.warning("listening beyond loopback, in plain HTTP: put TLS in front of it")
                        on_ready(f"http://{host}:{port}")
                        await stop.wait()
                    finally:
                        listener.close()  # no new connections; those open are closed below
            finally:
                # The builds have ended by now, so every event stream has its last line to send.
                await runner.cleanup()
    finally:
        state.close()


async def _listen(protocols: Callable[[], asyncio.Protocol], options: ServeOptions) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(
            protocols, options.host, options.port, reuse_address=True, backlog=1024
        )
    except OSError as exc:
        raise InputError(
            f"cannot listen on {options.listen}: {exc.strerror or exc}",
            hint="is another server on that port? pass another --listen",
        ) from exc


def _registry_policy(options: ServeOptions) -> RegistryPolicy:
    """The registries given, or by default Docker Hub and those the docker config has credentials for."""
    if options.allow_registries:
        return RegistryPolicy(frozenset(options.allow_registries))
    path = DockerKeychain().config_path()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        document = {}
    except (OSError, ValueError) as exc:
        raise RegistryError(
            f"cannot read docker config {path} for the registries farm serve may contact: {exc}",
            hint="fix it, or name them with --allow-registry",
        ) from None
    policy = RegistryPolicy.default(document if isinstance(document, dict) else {})
    log.info(
        "builds may use the registries %s (--allow-registry to choose)", ", ".join(sorted(policy.allowed))
    )
    return policy


def _room_for_connections(wanted: int) -> int:
    """Raise the open-files limit for ``wanted`` connections if it is lower; how many fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + _FILES_KEPT
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    fitting = max(1, soft - _FILES_KEPT)
    log.warning("the open-files limit (%d) leaves room for %d connections, not %d", soft, fitting, wanted)
    return fitting


@contextlib.contextmanager
def _repeats_limited() -> Iterator[None]:
    """While the server runs, one line per identical warning or error per 10 s on every log handler."""
    limiter = RepeatFilter()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(limiter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(limiter)


def make_app(coordinator: Coordinator, token: str, guard: ConnectionGuard | None = None) -> web.Application:
    """The API; with the ``guard`` that counts its connections' requests in progress."""
    middlewares: list[Middleware] = [_errors, _authenticate(token)]
    if guard is not None:
        middlewares.insert(0, guard.middleware)
    app = web.Application(middlewares=middlewares, client_max_size=_MAX_MANIFEST_BODY)
    api = _Api(coordinator)
    app.router.add_get("/", api.page)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/api/server", api.server)
    app.router.add_post("/api/contexts/sync", api.sync)
    app.router.add_post("/api/contexts/{digest}/blobs", api.blobs)
    app.router.add_post("/api/builds", api.submit)
    app.router.add_post("/api/plans", api.plan)
    app.router.add_get("/api/builds", api.builds)
    app.router.add_get("/api/builds/{id}", api.build)
    app.router.add_get("/api/builds/{id}/events", api.events)
    app.router.add_delete("/api/builds/{id}", api.cancel)
    app.router.add_get("/api/nodes", api.nodes)
    app.router.add_post("/api/nodes/{name}/drain", api.drain)
    app.router.add_post("/api/nodes/{name}/undrain", api.undrain)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A farm error raised by a handler becomes ``{"error": …}`` with its HTTP status."""
    try:
        return await handler(request)
    except FarmError as exc:
        if isinstance(exc, ServerError) and exc.status:
            status = exc.status
        elif isinstance(exc, InputError):
            status = 400
        else:
            status = 500
        return web.json_response({"error": error_to_json(exc)}, status=status)


def _authenticate(token: str) -> Middleware:
    expected = token.encode()

    def matches(presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), expected)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/" and request.method == "GET" and "token" in request.query:
            if not matches(request.query["token"]):
                return web.Response(status=401, text=render_login(), content_type="text/html")
            # Keep it in a cookie and drop it from the address bar (and from the history).
            response = web.Response(status=303, headers={"Location": "/"})
            response.set_cookie(
                _COOKIE, token, httponly=True, samesite="Strict", path="/", max_age=30 * 86400
            )
            return response
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and matches(presented.strip()):
            return await handler(request)
        if request.method in ("GET", "HEAD") and matches(request.cookies.get(_COOKIE)):
            return await handler(request)
        if request.path == "/":
            return web.Response(status=401, text=render_login(), content_type="text/html")
        error = ServerError(
            "the farm server needs its token" if not presented else "the farm server refused the token",
            status=401,
            hint="pass --server-token or set $FARM_SERVER_TOKEN (the server keeps it in STATE/token)",
        )
        return web.json_response(
            {"error": error_to_json(error)},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="farm"'},
        )

    return authenticate


async def _json(request: web.Request, fields: dict[str, type]) -> dict[str, Any]:
    """A small JSON object of these fields (each optional; others refused), its types checked."""
    body = await read_body(request, _MAX_REQUEST_BODY, _BODY_TIMEOUT)
    try:
        document = json.loads(body)
    except json.JSONDecodeError as exc:
        raise InputError(f"the request body is not JSON: {exc.msg} at character {exc.pos}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"the request body is not JSON: not UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise InputError("the request body is not JSON this server takes: nested too deeply") from None
    if not isinstance(document, dict):
        raise InputError("the request body must be a JSON object")
    for name, value in document.items():
        expected = fields.get(name)
        if expected is None:
            raise InputError(f"unexpected field {name[:60]!r} in the request")
        if not isinstance(value, expected):
            raise InputError(f"field {name!r} must be a {'string' if expected is str else 'JSON object'}")
    return document


class _Api:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def _server(self) -> dict[str, Any]:
        c = self.c
        return {
            "version": version(),
            "inventory": c.inventory.source,
            "max_builds": c.max_builds,
            "queue_length": len(c.queue),
            "running": c.snapshot().builds_running,
        }

    async def page(self, request: web.Request) -> web.StreamResponse:
        nodes = self.c.nodes_json()
        html = render_status(self._server(), nodes, self.c.builds(30))
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body, content_type = self.c.metrics.render(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type  # with its version and charset as they are
        return response

    async def server(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._server())

    async def sync(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, _MAX_MANIFEST_BODY, _BODY_TIMEOUT)
        missing, missing_bytes, total = await asyncio.to_thread(self.c.contexts.accept_sync, body)
        del body
        self.c.metrics.context_uploaded(0, total - missing_bytes)
        return web.json_response({"missing": missing, "missing_bytes": missing_bytes})

    async def blobs(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        count, size = await self.c.contexts.receive(digest, request.content)
        self.c.metrics.context_uploaded(size, 0)
        return web.json_response(
            {"received": count, "bytes": size, "complete": self.c.contexts.has_context(digest)}
        )

    async def submit(self, request: web.Request) -> web.StreamResponse:
        document = await _json(
            request, {"submitter": str, "context": str, "options": dict, "dockerfile": str}
        )
        options = document.get("options")
        if options is None:
            raise InputError("a build needs its options")
        job = await self.c.submit(
            submitter=document.get("submitter") or "anonymous",
            context=document.get("context", ""),
            options=options,
            dockerfile=document.get("dockerfile", ""),
        )
        return web.json_response(
            {"id": job.id, "state": job.state, "position": self.c.status(job.id).get("position", 0)},
            status=201,
        )

    async def plan(self, request: web.Request) -> web.StreamResponse:
        document = await _json(request, {"options": dict})
        options = document.get("options")
        if options is None:
            raise InputError("a plan needs the build's options")
        decisions = await self.c.plan(options)
        return web.json_response({"decisions": [decision_to_json(d) for d in decisions]})

    async def builds(self, request: web.Request) -> web.StreamResponse:
        try:
            limit = min(1000, max(1, int(request.query.get("limit", "50"))))
        except ValueError as exc:
            raise InputError("limit must be a number") from exc
        return web.json_response({"builds": self.c.builds(limit)})

    async def build(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.c.status(request.match_info["id"]))

    async def events(self, request: web.Request) -> web.StreamResponse:
        build_id = request.match_info["id"]
        self.c.status(build_id)  # a 404 now, before the stream starts
        try:
            after = int(request.query.get("after", "0"))
        except ValueError as exc:
            raise InputError("after must be a number") from exc
        response = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        try:
            async for line in self.c.follow(build_id, after):
                payload = line if line is not None else {"type": "ping"}
                await response.write(json.dumps(payload, separators=(",", ":")).encode() + b"\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; the build goes on
        return response

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        by = "".join(c for c in request.query.get("by", "")[:128] if c.isprintable()) or "a client"
        return web.json_response(await self.c.cancel(request.match_info["id"], by))

    async def nodes(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"nodes": self.c.nodes_json()})

    async def drain(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.c.set_drained(request.match_info["name"], True))

    async def undrain(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.c.set_drained(request.match_info["name"], False))
