"""The coordinator's side of the agent protocol (``agent.protocol``), over any transport.

One ``AgentSession`` is one agent process on one node. Failures are typed by whose fault they
are: the node's (``NodeError``: the platform may go elsewhere), the build's (``BuildError``),
the registry's (``RegistryError``) or the request's (``InputError``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from agent import protocol
from farm.context import Context
from farm.errors import BuildError, FarmError, InputError, NodeError, RegistryError
from farm.nodefacts import NodeFacts
from farm.transport import AgentProcess, Transport

__all__ = ["AgentSession", "frame_blobs", "open_session"]

_MARKER_SEARCH_LINES = 200
_BATCH_BYTES = 4 * 1024 * 1024
_BATCH_BLOBS = 512


class AgentSession:
    def __init__(self, node: str, process: AgentProcess) -> None:
        self.node = node
        self._process = process

    async def facts(self) -> NodeFacts:
        await self._send("facts")
        reply = await self._expect("facts")
        return NodeFacts.model_validate(reply)

    async def sync(self, context: Context) -> tuple[int, int]:
        """Send the context's manifest, then only the blobs the node lacks; return (blobs, bytes).

        Blobs are read and framed in batches in a worker thread, the next batch while the current
        one is written: thousands of small files then cost a few large writes, not thousands.
        """
        await self._write(
            protocol.encode("sync", context=context.digest, size=len(context.manifest)) + context.manifest
        )
        needed = (await self._expect("need"))["digests"]
        unknown = [digest for digest in needed if digest not in context.blobs]
        if unknown:
            raise NodeError(f"agent asked for {unknown[0]}, which is not in the context", node=self.node)
        batches = _batches(needed, context.blob_sizes)
        reading = self._read_ahead(context, batches[0]) if batches else None
        try:
            for following in [*batches[1:], []] if batches else []:
                assert reading is not None
                # Shielded: a cancellation here must not leave the read's thread running unowned.
                framed = await asyncio.shield(reading)
                reading = self._read_ahead(context, following) if following else None
                try:
                    await self._process.write(framed)
                except (ConnectionError, OSError) as exc:
                    raise self._lost(f"cannot write to the agent: {exc}") from exc
        finally:
            # A failed write or a cancellation: the batch being read is ours to wait for.
            if reading is not None:
                await asyncio.wait([reading])
                if not reading.cancelled():
                    reading.exception()  # seen: what failed first is what propagates
        await self._expect("synced")
        return len(needed), sum(context.blob_sizes[digest] for digest in needed)

    @staticmethod
    def _read_ahead(context: Context, batch: list[str]) -> asyncio.Task[bytes]:
        """Frame ``batch`` in a worker thread; ``sync`` owns the task and always waits for it."""
        return asyncio.create_task(asyncio.to_thread(frame_blobs, context, batch))

    async def build(
        self,
        request: dict[str, Any],
        on_log: Callable[[str], None],
        authorize: Callable[[], Awaitable[str | None]] | None = None,
    ) -> dict[str, Any]:
        """Run one build; stream its log lines to ``on_log``; return the agent's ``result``.

        ``authorize`` gives the agent a fresh push credential when the registry refuses the one
        it has (a token that expired during a long build).
        """
        await self._send("build", **request)
        # Owned here and always reaped: a TaskGroup would wrap this loop's errors in a group.
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                message = await self._receive()
                if message["type"] == "log":
                    on_log(str(message.get("line", "")))
                    continue
                if message["type"] == "auth":
                    await self._send("auth", authorization=await authorize() if authorize else None)
                    continue
                if message["type"] == "result":
                    return message
                raise self._unexpected(message, "result")
        finally:
            heartbeat.cancel()
            await asyncio.wait([heartbeat])

    async def close(self) -> None:
        """End the agent: closing its stdin is its signal to stop whatever it still runs."""
        self._process.close_stdin()
        try:
            async with asyncio.timeout(30):
                await self._process.wait()
        except TimeoutError:
            self._process.kill()
            await self._process.wait()

    async def _heartbeat(self) -> None:
        """Tell the agent we are alive; a failed write is noticed by the reading side."""
        with contextlib.suppress(NodeError):
            while True:
                await asyncio.sleep(protocol.HEARTBEAT_INTERVAL)
                await self._send("heartbeat")

    async def _send(self, message_type: str, /, **fields: Any) -> None:
        await self._write(protocol.encode(message_type, **fields))

    async def _write(self, data: bytes) -> None:
        try:
            await self._process.write(data)
        except (ConnectionError, OSError) as exc:
            raise self._lost(f"cannot write to the agent: {exc}") from exc

    async def _receive(self) -> protocol.Message:
        try:
            line = await self._process.readline()
        except (ConnectionError, OSError, asyncio.LimitOverrunError, ValueError) as exc:
            raise self._lost(f"cannot read from the agent: {exc}") from exc
        if not line:
            raise self._lost("the agent exited")
        try:
            return protocol.decode(line)
        except protocol.ProtocolError as exc:
            raise NodeError(f"agent on {self.node} broke the protocol: {exc}", node=self.node) from exc

    async def _expect(self, kind: str) -> protocol.Message:
        message = await self._receive()
        if message["type"] != kind:
            raise self._unexpected(message, kind)
        return message

    def _unexpected(self, message: protocol.Message, wanted: str) -> FarmError:
        if message["type"] != "error":
            return NodeError(
                f"agent on {self.node} sent {message['type']!r} where {wanted!r} was due",
                node=self.node,
            )
        text = str(message.get("message", "unknown error"))
        tail = tuple(str(line) for line in message.get("log_tail") or ())
        kind = message.get("kind")
        if kind == "build":
            return BuildError(text, log_tail=tail)
        if kind == "registry":
            return RegistryError(f"pushing from {self.node}: {text}", status=message.get("status"))
        if kind == "input":
            return InputError(f"{self.node} refused the request: {text}")
        last = next((line for line in reversed(tail) if line.strip()), "")
        return NodeError(f"{self.node}: {text}{': ' + last if last else ''}", node=self.node)

    def _lost(self, what: str) -> NodeError:
        stderr = self._process.stderr_tail()
        detail = f"; its stderr ends with:\n{stderr}" if stderr else ""
        return NodeError(f"lost the agent on {self.node}: {what}{detail}", node=self.node)


def _batches(digests: list[str], sizes: dict[str, int]) -> list[list[str]]:
    batches: list[list[str]] = []
    current: list[str] = []
    size = 0
    for digest in digests:
        current.append(digest)
        size += sizes[digest]
        if size >= _BATCH_BYTES or len(current) >= _BATCH_BLOBS:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def frame_blobs(context: Context, digests: list[str]) -> bytes:
    """Blobs as agent-protocol frames, read (and checked) from the context."""
    parts = []
    for digest in digests:
        data = context.read_blob(digest)
        parts += [protocol.encode("blob", digest=digest, size=len(data)), data]
    return b"".join(parts)


@contextlib.asynccontextmanager
async def open_session(node: str, transport: Transport, workdir: str) -> AsyncIterator[AgentSession]:
    """Start an agent, find its marker, agree on the protocol version; close it on exit (the
    transport then ends whatever is left of it, and gives back what it held)."""
    async with transport.open_agent(workdir) as process:
        session = AgentSession(node, process)
        try:
            for _ in range(_MARKER_SEARCH_LINES):
                line = await process.readline()
                if not line:
                    raise session._lost("the agent exited before it started talking")
                if line.rstrip(b"\r\n") == protocol.MARKER:
                    break
            else:
                raise NodeError(f"no farm agent answered on {node}", node=node)
            await session._send("hello", version=protocol.PROTOCOL_VERSION)
            await session._expect("hello")
            yield session
        finally:
            await session.close()
