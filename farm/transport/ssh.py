"""SSH nodes: the agent zipapp run over one asyncssh connection per node.

* One connection per node, its sessions (one per agent process) bounded below sshd's MaxSessions;
  a bounded number of handshakes at once, so a farm of Pis behind one NAT is not refused by
  sshd's MaxStartups.
* A session's slot is taken and given back by one ``async with`` (``SessionSlots.take`` inside
  ``SshTransport.open_agent``), so it comes back on every path: the agent ending, an error, a
  lost connection, a cancellation. Each connection has slots of its own: a reconnect starts with
  all of them free, whatever the sessions of the dead connection still hold while they end.
* Keepalives every 5 s, three missed: a dead node is found within about 20 s.
* Host keys are verified, always: against the node's ``known_hosts`` or farm's own file plus
  ``~/.ssh/known_hosts``. ``farm nodes add`` pins a new host's key; a changed key is refused,
  naming the host and both fingerprints.
* Zero install: a stage-one script of a few lines (``farm.transport.bundle``), run by the node's
  ``python3``, executes the agent cached in the node's workdir once it hashes to the expected
  sha256, or first receives it on stdin.
* ``~/.ssh/config`` is honoured (host aliases, ProxyJump, IdentityFile, Port, User). An inventory's
  ``proxy_jump`` bastions are connected by farm itself, verified and authenticated as the node is.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shlex
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from farm.errors import NodeError
from farm.inventory import NodeSpec
from farm.paths import FARM_KNOWN_HOSTS, USER_KNOWN_HOSTS
from farm.transport.bundle import answer_stage_one, stage_one_argv

__all__ = [
    "ConnectObserver",
    "HostKey",
    "SessionSlots",
    "SshConnections",
    "SshTransport",
    "fetch_host_key",
    "pin_host_key",
]

MAX_SESSIONS = 9  # sshd's MaxSessions defaults to 10
MAX_HANDSHAKES = 8  # below sshd's MaxStartups (10 unauthenticated connections)
_CONNECT_ATTEMPTS = 3
_STDERR_LINES = 40


@dataclass(frozen=True)
class HostKey:
    host: str  # as known_hosts spells it: "host" or "[host]:port"
    key: asyncssh.SSHKey

    @property
    def fingerprint(self) -> str:
        return str(self.key.get_fingerprint("sha256"))

    @property
    def line(self) -> str:
        return f"{self.host} {self.key.export_public_key().decode().strip()}"


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _VerifyingClient(asyncssh.SSHClient):
    """Remembers the key a host presented when it matched nothing, for a useful error."""

    def __init__(self) -> None:
        self.presented: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.presented = key
        return False


class SshProcess:
    """An agent process on a node: the ``AgentProcess`` interface over an SSH session.

    Its stderr is collected by a task that ``SshTransport.open_agent`` owns: cancelled, if it has
    not ended, and awaited when the session ends.
    """

    def __init__(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self._process = process
        self._pushed_back: deque[bytes] = deque()
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._stderr_task = asyncio.create_task(self._collect_stderr())

    async def _collect_stderr(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            async for line in self._process.stderr:
                self._stderr.append(line.decode("utf-8", "replace").rstrip())

    def push_back(self, line: bytes) -> None:
        self._pushed_back.append(line)

    # asyncssh reports a lost connection as its own error (ConnectionLost, not an OSError): the
    # streams say ConnectionError, as the ``AgentProcess`` interface and the local pipes do.

    async def write(self, data: bytes) -> None:
        try:
            self._process.stdin.write(data)
            await self._process.stdin.drain()
        except asyncssh.Error as exc:
            raise ConnectionError(str(exc)) from exc

    async def readline(self) -> bytes:
        if self._pushed_back:
            return self._pushed_back.popleft()
        try:
            return await self._process.stdout.readline()
        except asyncssh.Error as exc:
            raise ConnectionError(str(exc)) from exc

    async def readexactly(self, size: int) -> bytes:
        try:
            return await self._process.stdout.readexactly(size)
        except asyncssh.Error as exc:
            raise ConnectionError(str(exc)) from exc

    def close_stdin(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            self._process.stdin.write_eof()

    async def wait(self) -> int:
        try:
            completed = await self._process.wait()
            await self._stderr_task
            code = completed.exit_status
            return -1 if code is None else code
        except (asyncssh.Error, OSError):
            return -1

    def kill(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            self._process.close()

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    async def _end(self) -> None:
        """Close the session (if it is still open) and reap the stderr task."""
        self.kill()
        self._stderr_task.cancel()
        await asyncio.wait([self._stderr_task])


class SessionSlots:
    """The sessions one SSH connection may still open, below sshd's MaxSessions.

    A slot is held for the ``async with take()`` block and given back when it ends, however it
    ends (cancellation included).
    """

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self.limit = limit
        self._semaphore = asyncio.Semaphore(limit)
        self._held = 0

    @property
    def free(self) -> int:
        return self.limit - self._held

    @contextlib.asynccontextmanager
    async def take(self) -> AsyncIterator[None]:
        async with self._semaphore:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1


@dataclass
class _Link:
    """One live SSH connection to a node and its session slots."""

    connection: asyncssh.SSHClientConnection
    slots: SessionSlots = field(default_factory=SessionSlots)


@dataclass
class _Node:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one handshake at a time per node
    link: _Link | None = None


# Told of every connection made (the node, the seconds it took) or failed (the node, None).
ConnectObserver = Callable[[str, "float | None"], None]


class SshConnections:
    """The SSH connections of one coordinator: one per node, reused, reconnected when lost.

    ``on_connect`` hears of each connection made (with the seconds its handshakes took, retries
    included) or given up on (None): ``farm serve`` times them for its metrics.
    """

    def __init__(
        self, known_hosts: Path = FARM_KNOWN_HOSTS, on_connect: ConnectObserver | None = None
    ) -> None:
        self._known_hosts = known_hosts
        self._on_connect = on_connect
        self._handshakes = asyncio.Semaphore(MAX_HANDSHAKES)
        self._nodes: dict[str, _Node] = {}

    async def close(self) -> None:
        for entry in self._nodes.values():
            if entry.link is not None:
                entry.link.connection.close()
                await entry.link.connection.wait_closed()

    async def connection(self, spec: NodeSpec) -> tuple[asyncssh.SSHClientConnection, SessionSlots]:
        """The node's connection (made, or made again if it was lost) and its session slots."""
        entry = self._nodes.setdefault(spec.name, _Node())
        async with entry.lock:
            if entry.link is None or entry.link.connection.is_closed():
                # Slots of its own: sessions of the lost connection give theirs back as they end,
                # never holding this one's.
                entry.link = _Link(await self._connect_observed(spec))
            return entry.link.connection, entry.link.slots

    async def _connect_observed(self, spec: NodeSpec) -> asyncssh.SSHClientConnection:
        started = time.monotonic()
        try:
            connection = await self._connect_with_retries(spec)
        except NodeError:
            if self._on_connect is not None:
                self._on_connect(spec.name, None)
            raise
        if self._on_connect is not None:
            self._on_connect(spec.name, time.monotonic() - started)
        return connection

    async def _connect_with_retries(self, spec: NodeSpec) -> asyncssh.SSHClientConnection:
        for attempt in range(_CONNECT_ATTEMPTS):
            try:
                async with self._handshakes:
                    return await connect(spec, self._known_hosts)
            except NodeError as exc:
                if not exc.retryable or attempt == _CONNECT_ATTEMPTS - 1:
                    raise
            # Full jitter: nodes that dropped together do not come back knocking together.
            await asyncio.sleep(random.uniform(0, min(10.0, 2.0**attempt)))
        raise AssertionError("unreachable")


def _options(spec: NodeSpec) -> dict[str, Any]:
    options: dict[str, Any] = {
        "keepalive_interval": 5,
        "keepalive_count_max": 3,
        "connect_timeout": 15,
        "compression_algs": None,
        "encryption_algs": [
            "aes128-gcm@openssh.com",
            "aes256-gcm@openssh.com",
            "chacha20-poly1305@openssh.com",
            "aes128-ctr",
            "aes256-ctr",
        ],
        "request_pty": False,
        "agent_forwarding": False,
    }
    if spec.port is not None:
        options["port"] = spec.port
    if spec.user:
        options["username"] = spec.user
    if spec.identity_file:
        options["client_keys"] = [str(spec.identity_file.expanduser())]
    return options


def _trusted_files(spec: NodeSpec, farm_known_hosts: Path) -> list[str]:
    if spec.known_hosts is not None:
        return [str(spec.known_hosts.expanduser())]
    return [str(path) for path in (farm_known_hosts, USER_KNOWN_HOSTS) if path.exists()]


async def connect(spec: NodeSpec, farm_known_hosts: Path = FARM_KNOWN_HOSTS) -> asyncssh.SSHClientConnection:
    """Connect to a node, through its bastions if it has any, verifying every host key; every
    failure becomes a ``NodeError``."""
    assert spec.host is not None
    files = _trusted_files(spec, farm_known_hosts)
    tunnel = await _open_jumps(spec, files)
    return await _handshake(spec, spec.host, _options(spec), files, tunnel)


async def _open_jumps(spec: NodeSpec, files: Sequence[str]) -> asyncssh.SSHClientConnection | None:
    """The node's bastions, connected one through the other. Each is verified against the node's
    known_hosts files and offered the node's key: asyncssh's own reading of a jump string would
    trust ~/.ssh/known_hosts alone and offer only the default keys. ``None`` without bastions
    (asyncssh then follows a ProxyJump of ~/.ssh/config itself, as ssh does)."""
    tunnel = None
    for hop in spec.jump_hops:
        options = {key: value for key, value in _options(spec).items() if key not in ("port", "username")}
        if hop.port is not None:
            options["port"] = hop.port
        if hop.user is not None:
            options["username"] = hop.user
        tunnel = await _handshake(spec, hop.host, options, files, tunnel)
    return tunnel


async def _handshake(
    spec: NodeSpec,
    host: str,
    options: dict[str, Any],
    files: Sequence[str],
    tunnel: asyncssh.SSHClientConnection | None,
) -> asyncssh.SSHClientConnection:
    """One SSH connection to ``host`` (the node or one of its bastions), over ``tunnel`` if given;
    the tunnel is closed with it, or at once if it fails."""
    client = _VerifyingClient()
    try:
        connection, _ = await asyncssh.create_connection(
            lambda: client,
            host,
            known_hosts=asyncssh.read_known_hosts(list(files)) if files else ([], [], []),
            tunnel=tunnel or (),
            **options,
        )
    except BaseException as exc:
        if tunnel is not None:
            tunnel.close()
        raise _connect_error(spec, host, options.get("port", 22), files, client.presented, exc) from exc
    connection.set_tunnel(tunnel)  # as asyncssh does for the tunnels it opens: closed with this one
    return connection


def _connect_error(
    spec: NodeSpec,
    host: str,
    port: int,
    files: Sequence[str],
    presented: asyncssh.SSHKey | None,
    exc: BaseException,
) -> BaseException:
    via = "" if host == spec.host else " (its jump host)"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return _host_key_error(spec, host, port, files, presented)
    if isinstance(exc, asyncssh.PermissionDenied):
        return NodeError(
            f"{spec.name}: {host}{via} refused our key ({exc.reason})",
            node=spec.name,
            hint="check 'user' and 'identity_file' for this node, and the node's authorized_keys",
        )
    if isinstance(exc, (OSError, asyncssh.Error, TimeoutError)):
        return NodeError(
            f"{spec.name}: cannot connect to {host}{via}: {exc or type(exc).__name__}",
            node=spec.name,
            retryable=True,
        )
    return exc


def _host_key_error(
    spec: NodeSpec, host: str, port: int, files: Sequence[str], presented: asyncssh.SSHKey | None
) -> NodeError:
    offered = presented.get_fingerprint("sha256") if presented else "unknown"
    known = []
    if files:
        trusted, _, _, _, _, _, _ = asyncssh.read_known_hosts(list(files)).match(host, "", port)
        known = [key.get_fingerprint("sha256") for key in trusted]
    if known:
        return NodeError(
            f"{spec.name}: the host key of {host} has CHANGED: it presents {offered}, "
            f"known is {', '.join(known)}; refusing to connect",
            node=spec.name,
            hint="if the node was re-installed, remove its old line from known_hosts and run "
            "'farm nodes add' again; otherwise someone may be impersonating it",
        )
    return NodeError(
        f"{spec.name}: the host key of {host} ({offered}) is not known",
        node=spec.name,
        hint=f"pin it with 'farm nodes add' (it writes {FARM_KNOWN_HOSTS}), or add it to the "
        "node's known_hosts file",
    )


async def fetch_host_key(spec: NodeSpec) -> HostKey:
    """The key a host presents, without trusting it (for ``farm nodes add`` to show and pin)."""
    assert spec.host is not None
    port = spec.port or 22
    # The bastions are trusted already: a key pinned through an unverified one would prove nothing.
    tunnel = await _open_jumps(spec, _trusted_files(spec, FARM_KNOWN_HOSTS))
    try:
        async with asyncio.timeout(15):
            key = await asyncssh.get_server_host_key(spec.host, port, tunnel=tunnel or ())
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise NodeError(f"{spec.name}: cannot reach {spec.host}: {exc}", node=spec.name) from exc
    finally:
        if tunnel is not None:
            tunnel.close()
    if key is None:
        raise NodeError(f"{spec.name}: {spec.host} presented no host key", node=spec.name)
    return HostKey(_known_hosts_name(spec.host, port), key)


def pin_host_key(host_key: HostKey, known_hosts: Path) -> bool:
    """Accept-new: add the key if the host has none yet; refuse a different key. True if added."""
    host, _, port_text = host_key.host.removeprefix("[").partition("]:")
    port = int(port_text) if port_text else 22
    if known_hosts.exists():
        trusted, *_ = asyncssh.read_known_hosts(str(known_hosts)).match(host, "", port)
        if any(key == host_key.key for key in trusted):
            return False
        if trusted:
            raise NodeError(
                f"{host} already has a different key in {known_hosts}: "
                f"{', '.join(key.get_fingerprint('sha256') for key in trusted)}; "
                f"it now presents {host_key.fingerprint}",
                node=host,
                hint="if the node was re-installed, remove its old line first",
            )
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    with known_hosts.open("a") as out:
        out.write(host_key.line + "\n")
    return True


class SshTransport:
    """Starts the agent on a node over the pooled connection."""

    def __init__(self, spec: NodeSpec, connections: SshConnections) -> None:
        self._spec = spec
        self._connections = connections

    @contextlib.asynccontextmanager
    async def open_agent(self, workdir: str) -> AsyncIterator[SshProcess]:
        """An agent on the node, in a session slot of the node's connection for as long as the
        block runs; on the way out the session is closed and the slot given back."""
        connection, slots = await self._connections.connection(self._spec)
        command = " ".join(shlex.quote(part) for part in stage_one_argv("python3", workdir))
        async with slots.take():
            try:
                process = await connection.create_process(command, encoding=None, request_pty=False)
            except (asyncssh.Error, OSError) as exc:
                raise NodeError(
                    f"{self._spec.name}: cannot start the agent: {exc}", node=self._spec.name
                ) from exc
            agent = SshProcess(process)
            try:
                try:
                    await answer_stage_one(agent)
                except (asyncssh.Error, OSError) as exc:  # ConnectionError included
                    raise NodeError(
                        f"{self._spec.name}: lost the agent while starting it: {exc}", node=self._spec.name
                    ) from exc
                yield agent
            finally:
                await agent._end()
