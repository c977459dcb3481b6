"""``farm build --server``: the client of ``farm serve`` (httpx), as close to a local build as it gets.

    a BuildRequest (its context scanned as for a local build) ─► POST /api/contexts/sync: the manifest
        ─► POST /api/contexts/{digest}/blobs: only the blobs the server lacks
        ─► POST /api/builds ─► GET /api/builds/{id}/events: every PlatformEvent to the renderer,
           then the BuildResult (or the error, raised as the class a local build raises: a build
           another client cancelled raises ``BuildCancelledError``, as Ctrl-C here ends as cancelled)
    Ctrl-C or SIGTERM ─► DELETE /api/builds/{id}: the server stops the build on every node.

httpx errors are translated here, at the edge, into ``ServerError``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from farm.api import BuildOptions, BuildRequest, BuildResult, EventSink
from farm.context import Context
from farm.errors import FarmError, ServerError
from farm.scheduler import Decision
from farm.serve.wire import decision_from_json, error_from_json, event_from_json, result_from_json
from farm.session import frame_blobs

__all__ = ["ServerClient", "ServerOptions", "read_token", "remote_build", "remote_plan"]

_BATCH_BYTES = 4 * 1024 * 1024
_STREAM_IDLE = 90.0  # seconds without a line (the server pings every 15 s): the server is gone
_RECONNECTS = (0.5, 1.0, 2.0, 4.0)  # waits before following a broken event stream again
_SUBMIT_TRIES = 3  # the server may evict blobs between sync and submit: sync again


class ServerOptions(BaseModel):
    """Where the server is and who we are to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="http(s)://HOST:PORT of farm serve")
    token: str = Field(repr=False)
    submitter: str = Field(default="anonymous", description="whom the queue is fair between")


def read_token(path: Path) -> str | None:
    """The token a local server keeps in its state folder, if this user can read it."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class ServerClient:
    def __init__(self, options: ServerOptions) -> None:
        self.url = options.url.rstrip("/")
        self._options = options
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {options.token}"},
            timeout=httpx.Timeout(60.0, connect=10.0),
        )

    async def __aenter__(self) -> ServerClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._http.aclose()

    async def sync_context(self, context: Context) -> tuple[int, int]:
        """Send the manifest, then only the blobs the server lacks; return (blobs, bytes) sent."""
        reply = await self._call(
            "POST",
            "/api/contexts/sync",
            json={"context": context.digest, "entries": [list(entry) for entry in context.entries]},
        )
        missing = [str(digest) for digest in reply.get("missing", [])]
        unknown = [digest for digest in missing if digest not in context.blobs]
        if unknown:
            raise ServerError(f"the server asked for {unknown[0]}, which is not in the context")
        if missing:
            await self._call(
                "POST",
                f"/api/contexts/{context.digest}/blobs",
                content=_frames(context, missing),
                headers={"Content-Type": "application/octet-stream"},
                limits=httpx.Timeout(60.0, connect=10.0, write=300.0),
            )
        return len(missing), sum(context.blob_sizes[digest] for digest in missing)

    async def submit(self, options: BuildOptions, context: str, dockerfile: str) -> dict[str, Any]:
        return await self._call(
            "POST",
            "/api/builds",
            json={
                "submitter": self._options.submitter,
                "context": context,
                "options": _options_json(options),
                "dockerfile": dockerfile,
            },
        )

    async def plan(self, options: BuildOptions) -> list[Decision]:
        reply = await self._call("POST", "/api/plans", json={"options": _options_json(options)})
        return [decision_from_json(document) for document in reply["decisions"]]

    async def cancel(self, build_id: str) -> dict[str, Any]:
        return await self._call(
            "DELETE",
            f"/api/builds/{build_id}",
            params={"by": self._options.submitter},
            limits=httpx.Timeout(150.0, connect=10.0),
        )

    async def follow(self, build_id: str, on_event: EventSink, on_note: Callable[[str], None]) -> BuildResult:
        """Follow the build's event stream to its end, reconnecting if the connection breaks."""
        after = 0
        waits = iter(_RECONNECTS)
        final: dict[str, Any] | None = None
        while final is None:
            try:
                async with contextlib.aclosing(self._lines(build_id, after)) as lines:
                    async for message in lines:
                        after = int(message.get("seq", after)) + 1
                        waits = iter(_RECONNECTS)  # it answered: a later break starts the backoff afresh
                        kind = message.get("type")
                        if kind == "event":
                            event = event_from_json(message)
                            if event is not None:
                                on_event(event)
                        elif kind == "queued":
                            position = int(message.get("position", 0))
                            ahead = f"{position} build(s) ahead of it" if position else "next in line"
                            on_note(f"build {build_id} queued: {ahead}")
                        elif kind == "started":
                            on_note(f"build {build_id} started")
                        elif kind in ("result", "error"):
                            final = message
                            break
                    else:
                        raise _BrokenStream("the event stream ended before the build did")
            except _BrokenStream as exc:
                wait = next(waits, None)
                if wait is None:
                    raise ServerError(
                        f"lost the farm server at {self.url} while following build {build_id}: {exc}",
                        hint=f"the build may go on there: see {self.url}/api/builds/{build_id}",
                    ) from exc
                await asyncio.sleep(wait)
        if final["type"] == "result":
            return result_from_json(final["result"])
        raise error_from_json(final["error"])

    async def _lines(self, build_id: str, after: int) -> AsyncGenerator[dict[str, Any], None]:
        """The stream's messages; a broken connection raises ``_BrokenStream``, a refusal its error."""
        timeout = httpx.Timeout(60.0, connect=10.0, read=_STREAM_IDLE)
        try:
            async with self._http.stream(
                "GET", f"/api/builds/{build_id}/events", params={"after": after}, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        message = json.loads(line)
                        if message.get("type") != "ping":
                            yield message
        except httpx.HTTPError as exc:
            raise _BrokenStream(str(exc) or type(exc).__name__) from exc
        except ValueError as exc:
            raise ServerError(f"the event stream of build {build_id} is not JSON lines: {exc}") from exc

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        limits: httpx.Timeout | None = None,
    ) -> dict[str, Any]:
        with self._translated():
            response = await self._http.request(
                method,
                path,
                json=json,
                content=content,
                params=params,
                headers=headers,
                timeout=limits or self._http.timeout,
            )
        if response.status_code >= 400:
            raise _error(response)
        try:
            document = response.json()
        except ValueError as exc:
            raise ServerError(
                f"{method} {path}: the server's answer is not JSON", status=response.status_code
            ) from exc
        if not isinstance(document, dict):
            raise ServerError(f"{method} {path}: the server's answer is not a JSON object")
        return document

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except httpx.HTTPError as exc:
            raise ServerError(
                f"cannot talk to the farm server at {self.url}: {exc or type(exc).__name__}",
                hint="is farm serve running there? check --server or $FARM_SERVER",
            ) from exc


class _BrokenStream(Exception):
    """The event stream's connection broke (or never came up): follow it again."""


def _error(response: httpx.Response) -> FarmError:
    """The error a server's 4xx/5xx answer describes."""
    try:
        document = response.json()
        described = document["error"]
        if not isinstance(described, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return ServerError(
            f"the farm server answered {response.status_code} to {response.request.method} "
            f"{response.request.url.path}",
            status=response.status_code,
        )
    error = error_from_json(described)
    if isinstance(error, ServerError) and error.status is None:
        error.status = response.status_code
    return error


def _options_json(options: BuildOptions) -> dict[str, Any]:
    return options.model_dump(mode="json")


async def _frames(context: Context, digests: list[str]) -> AsyncIterator[bytes]:
    """The blobs framed as for an agent, read and checked in a worker thread, a batch at a time."""
    batch: list[str] = []
    size = 0
    for digest in digests:
        batch.append(digest)
        size += context.blob_sizes[digest]
        if size >= _BATCH_BYTES:
            yield await asyncio.to_thread(frame_blobs, context, batch)
            batch, size = [], 0
    if batch:
        yield await asyncio.to_thread(frame_blobs, context, batch)


async def remote_build(
    server: ServerOptions, request: BuildRequest, on_event: EventSink, on_note: Callable[[str], None]
) -> BuildResult:
    """Run ``request`` on the server; stream its events to ``on_event``; cancel it if cancelled."""
    context = request.context
    async with ServerClient(server) as client:
        for attempt in range(_SUBMIT_TRIES):
            blobs, size = await client.sync_context(context)
            on_note(
                f"context {context.digest[:19]}: sent {blobs} of {len(context.blobs)} files, {size} bytes"
                f" (the server had the rest)"
                if blobs < len(context.blobs)
                else f"context {context.digest[:19]}: sent {blobs} files, {size} bytes"
            )
            try:
                submitted = await client.submit(request.options, context.digest, request.dockerfile)
                break
            except ServerError as exc:
                if exc.status != 409 or attempt == _SUBMIT_TRIES - 1:
                    raise
        build_id = str(submitted["id"])
        on_note(f"build {build_id} submitted to {client.url}")
        try:
            return await client.follow(build_id, on_event, on_note)
        except asyncio.CancelledError:
            # Ctrl-C or SIGTERM here: stop it there, and wait until it has stopped on every node.
            with contextlib.suppress(FarmError, TimeoutError):
                async with asyncio.timeout(150):
                    await client.cancel(build_id)
            raise


async def remote_plan(server: ServerOptions, options: BuildOptions) -> list[Decision]:
    """``farm build --dry-run --server``: where the server would build each platform now."""
    async with ServerClient(server) as client:
        return await client.plan(options)
