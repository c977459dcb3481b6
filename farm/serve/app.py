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
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, Field, field_validator

from farm.errors import FarmError, InputError, ServerError
from farm.inventory import load_inventory
from farm.serve.coordinator import Coordinator, CoordinatorOptions
from farm.serve.page import render_login, render_status
from farm.serve.state import open_state
from farm.serve.wire import decision_to_json, error_to_json

__all__ = ["ServeOptions", "make_app", "serve"]

log = logging.getLogger("farm.serve")

_COOKIE = "farm_token"
_MAX_JSON = 512 * 1024 * 1024  # a manifest of a few hundred thousand files
_LOOPBACK = ("127.0.0.1", "::1", "localhost")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ServeOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: str = Field(default="127.0.0.1:8750", description="HOST:PORT, [IPv6]:PORT")
    inventory: Path | None = None
    state_dir: Path
    token: str | None = None
    coordinator: CoordinatorOptions = Field(default_factory=CoordinatorOptions)

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        _split_listen(value)
        return value

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


def _split_listen(value: str) -> tuple[str, int]:
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {value!r}: write HOST:PORT, e.g. 127.0.0.1:8750")
    return host.removeprefix("[").removesuffix("]") or "127.0.0.1", int(port)


def version() -> str:
    try:
        return importlib.metadata.version("farm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def serve(options: ServeOptions, stop: asyncio.Event, on_ready: Callable[[str], None]) -> None:
    """Run the server until ``stop`` is set; then stop every build and answer what waits."""
    inventory = load_inventory(options.inventory)
    state = open_state(options.state_dir, options.token)
    if state.token_file is not None:
        log.info("clients need the token in %s", state.token_file)
    try:
        coordinator = Coordinator(inventory, state, options.coordinator, version())
        runner = web.AppRunner(make_app(coordinator, state.token), access_log=None, shutdown_timeout=10)
        await runner.setup()
        try:
            async with coordinator.running():
                site = web.TCPSite(runner, options.host, options.port)
                try:
                    await site.start()
                except OSError as exc:
                    raise InputError(
                        f"cannot listen on {options.listen}: {exc.strerror or exc}",
                        hint="is another server on that port? pass another --listen",
                    ) from exc
                host = f"[{options.host}]" if ":" in options.host else options.host
                port = _bound_port(runner) or options.port
                if options.host not in _LOOPBACK:
                    log.warning("listening beyond loopback, in plain HTTP: put TLS in front of it")
                on_ready(f"http://{host}:{port}")
                await stop.wait()
        finally:
            # The builds have ended by now, so every event stream has its last line to send.
            await runner.cleanup()
    finally:
        state.close()


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


def make_app(coordinator: Coordinator, token: str) -> web.Application:
    app = web.Application(middlewares=[_errors, _authenticate(token)], client_max_size=_MAX_JSON)
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


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        document = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the request body is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InputError("the request body must be a JSON object")
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
        nodes = [self.c.node_json(status) for status in self.c.nodes.values()]
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
        document = await _json(request)
        contexts = self.c.contexts
        missing, missing_bytes, total = await asyncio.to_thread(
            contexts.accept_manifest, document.get("context"), document.get("entries")
        )
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
        document = await _json(request)
        options = document.get("options")
        if not isinstance(options, dict):
            raise InputError("a build needs its options")
        job = self.c.submit(
            submitter=str(document.get("submitter") or "anonymous"),
            context=str(document.get("context", "")),
            options=options,
            dockerfile=str(document.get("dockerfile", "")),
        )
        return web.json_response(
            {"id": job.id, "state": job.state, "position": self.c.status(job.id).get("position", 0)},
            status=201,
        )

    async def plan(self, request: web.Request) -> web.StreamResponse:
        document = await _json(request)
        options = document.get("options")
        if not isinstance(options, dict):
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
        by = request.query.get("by") or "a client"
        return web.json_response(await self.c.cancel(request.match_info["id"], by))

    async def nodes(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"nodes": [self.c.node_json(status) for status in self.c.nodes.values()]})

    async def drain(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.c.set_drained(request.match_info["name"], True))

    async def undrain(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.c.set_drained(request.match_info["name"], False))
