"""The local node: the agent zipapp run as a subprocess of the coordinator."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from pathlib import Path

from farm.paths import CACHE_DIR
from farm.transport.bundle import agent_bundle

__all__ = ["LocalTransport", "SubprocessAgent"]

_STDERR_LINES = 40


class SubprocessAgent:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        assert process.stderr is not None
        self._stderr_task = asyncio.ensure_future(self._collect_stderr(process.stderr))

    async def _collect_stderr(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    async def write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(data)
        await self._process.stdin.drain()

    async def readline(self) -> bytes:
        assert self._process.stdout is not None
        return await self._process.stdout.readline()

    async def readexactly(self, size: int) -> bytes:
        assert self._process.stdout is not None
        return await self._process.stdout.readexactly(size)

    def close_stdin(self) -> None:
        if self._process.stdin is not None and not self._process.stdin.is_closing():
            self._process.stdin.close()

    async def wait(self) -> int:
        code = await self._process.wait()
        await self._stderr_task
        return code

    def kill(self) -> None:
        if self._process.returncode is None:
            self._process.kill()

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)


class LocalTransport:
    """Runs the agent with this interpreter; the zipapp is cached by hash like on any node."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self._cache_dir = cache_dir or CACHE_DIR / "agent"

    async def start_agent(self, workdir: str) -> SubprocessAgent:
        bundle = agent_bundle()
        path = self._cache_dir / bundle.file_name
        if not path.exists():
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            partial.write_bytes(bundle.data)
            partial.replace(path)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", str(path), "--workdir", workdir,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,
            # Its own session: a Ctrl-C on the terminal reaches the coordinator only, which then
            # stops the agent through the protocol, in order.
            start_new_session=True,
        )  # fmt: skip
        return SubprocessAgent(process)
