"""How the coordinator reaches a node's agent: a process whose stdin and stdout carry the protocol.

A transport only starts the agent, and owns it for an ``async with`` block; everything said to it
goes through ``farm.session``. The local node runs the agent as a subprocess; SSH nodes run the
very same zipapp over an SSH session.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from farm.transport.bundle import AgentBundle, agent_bundle
from farm.transport.local import LocalTransport

__all__ = ["AgentBundle", "AgentProcess", "LocalTransport", "Transport", "agent_bundle"]


class AgentProcess(Protocol):
    """A running agent: its stdio streams, and how to end it."""

    async def write(self, data: bytes) -> None: ...

    async def readline(self) -> bytes: ...

    async def readexactly(self, size: int) -> bytes: ...

    def close_stdin(self) -> None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...

    def stderr_tail(self) -> str: ...


class Transport(Protocol):
    def open_agent(self, workdir: str) -> AbstractAsyncContextManager[AgentProcess]:
        """Start the agent (stage one answered); it is the transport's for the ``async with``
        block, and ended on the way out with whatever it held (an SSH session slot, a task)."""
        ...
