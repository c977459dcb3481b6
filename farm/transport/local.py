"""The local node: the agent zipapp run as a subprocess of the coordinator, as its own user.

A build's RUN steps are untrusted code. On the coordinator's machine the agent therefore runs
as an unprivileged user of its own (``farm-build`` when the coordinator is root), never as the
coordinator's user unless the inventory names that user: whatever a build reaches, it cannot
read the coordinator's token, credentials or state. The agent starts through the same stage one
as on SSH nodes, which hash-checks the copy cached in the workdir before running it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import sys
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from farm.errors import NodeError
from farm.inventory import NodeSpec
from farm.transport.bundle import answer_stage_one, stage_one_argv

__all__ = ["BUILD_USER", "AgentAccount", "LocalTransport", "SubprocessAgent", "agent_account"]

BUILD_USER = "farm-build"
_STDERR_LINES = 40
# The PATH an agent started under another user gets: the system's, not the coordinator's.
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class AgentAccount:
    """The user the local agent runs as."""

    name: str
    uid: int
    gid: int
    home: str

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def agent_account(node: str, requested: str | None) -> AgentAccount:
    """Who the local node's agent runs as: the inventory's ``user``, else ``farm-build`` for a root
    coordinator and the coordinator's own user otherwise. Only root can become another user."""
    me = pwd.getpwuid(os.geteuid())
    name = requested or (BUILD_USER if me.pw_uid == 0 else me.pw_name)
    if me.pw_uid != 0 and name != me.pw_name:
        raise NodeError(
            f"{node}: the local agent should run as {name!r}, but farm runs as {me.pw_name!r} and "
            "cannot switch users",
            node=node,
            hint=f"reach this machine over SSH as {name} (host: localhost) instead of 'local: true'",
        )
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise NodeError(
            f"{node}: the local agent runs as the unprivileged user {name!r}, which does not exist here",
            node=node,
            hint="create it with 'deploy/node/setup-node.sh --local' (a user with subordinate "
            "uids for rootless builds), or set 'user: root' on this node to build as root on purpose",
        ) from None
    return AgentAccount(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


class SubprocessAgent:
    """The agent as a subprocess: the ``AgentProcess`` interface over its pipes.

    Its stderr is collected by a task that ``LocalTransport.open_agent`` owns: cancelled, if it
    has not ended, and awaited when the agent is done with.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._pushed_back: deque[bytes] = deque()
        assert process.stderr is not None
        self._stderr_task = asyncio.create_task(self._collect_stderr(process.stderr))

    async def _collect_stderr(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    def push_back(self, line: bytes) -> None:
        self._pushed_back.append(line)

    async def write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(data)
        await self._process.stdin.drain()

    async def readline(self) -> bytes:
        if self._pushed_back:
            return self._pushed_back.popleft()
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

    async def _end(self) -> None:
        """Kill the agent if it still runs, reap it and the stderr task."""
        self.kill()
        self._stderr_task.cancel()
        await asyncio.wait([self._stderr_task])
        await self._process.wait()


class LocalTransport:
    """Runs the agent on this machine, as the user ``agent_account`` gives for the node."""

    def __init__(self, spec: NodeSpec) -> None:
        self._node = spec.name
        self._user = spec.user

    @contextlib.asynccontextmanager
    async def open_agent(self, workdir: str) -> AsyncIterator[SubprocessAgent]:
        """The agent, running for as long as the block runs; killed (if it has not ended) and
        reaped on the way out."""
        account = agent_account(self._node, self._user)
        if account.uid == os.geteuid():
            argv = stage_one_argv(sys.executable, workdir)
            env = None
        else:
            python = shutil.which("python3", path=_SYSTEM_PATH)
            if python is None:
                raise NodeError(f"{self._node}: no python3 on {_SYSTEM_PATH}", node=self._node)
            # The system's interpreter (the coordinator's may live where the agent's user cannot
            # read), and an environment of the agent's user alone: none of the coordinator's.
            argv = [
                "setpriv", f"--reuid={account.uid}", f"--regid={account.gid}", "--init-groups",
                "--", *stage_one_argv(python, workdir),
            ]  # fmt: skip
            env = {
                "PATH": _SYSTEM_PATH,
                "HOME": account.home,
                "USER": account.name,
                "LOGNAME": account.name,
                "LANG": "C.UTF-8",
            }
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd="/",
            limit=64 * 1024 * 1024,
            # Its own session: a Ctrl-C on the terminal reaches the coordinator only, which then
            # stops the agent through the protocol, in order.
            start_new_session=True,
        )
        agent = SubprocessAgent(process)
        try:
            try:
                await answer_stage_one(agent)
            except OSError as exc:  # ConnectionError included: the agent died at once
                raise NodeError(
                    f"{self._node}: lost the agent while starting it: {exc}", node=self._node
                ) from exc
            yield agent
        finally:
            await agent._end()
