"""The agent as one zipapp, built in memory from the ``agent`` package and named by its sha256,
and the stage one that starts it on a node.

The bytes are reproducible (fixed timestamps, sorted entries), so an unchanged agent keeps its
hash and a node that cached it never receives it again.
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

from agent.protocol import MARKER

__all__ = ["AgentBundle", "agent_bundle", "answer_stage_one", "stage_one_argv"]

_NEED_AGENT = b"FARM-NEED-AGENT"
_MAX_NOISE_LINES = 200

# Stage one, run as `python3 -I -c STAGE1 SHA256 SIZE WORKDIR` by the agent's user on its node
# (over SSH, or by the local transport): run the agent cached in the workdir if it hashes to
# SHA256, else first receive it on stdin (exactly SIZE bytes, read unbuffered so nothing meant
# for the agent is lost) and cache it. A cached file is trusted for its hash, never its name: an
# escaped build may have rewritten it. What runs is the copy that was hashed, held in a memfd,
# so the file cannot be swapped between the check and the exec.
_STAGE1 = """\
import hashlib, os, sys
if sys.version_info < (3, 9):
    sys.stderr.write("farm: python3 is %d.%d; the agent needs 3.9 or newer\\n" % sys.version_info[:2])
    sys.exit(90)
digest, size, workdir = sys.argv[1], int(sys.argv[2]), os.path.expanduser(sys.argv[3])
folder = os.path.join(workdir, "agent")
path = os.path.join(folder, "farm-agent-%s.pyz" % digest[:16])
os.makedirs(folder, mode=0o700, exist_ok=True)
for mine in (workdir, folder):
    os.chmod(mine, 0o700)
try:
    with open(path, "rb") as cached:
        data = cached.read(size + 1)
except OSError:
    data = b""
if hashlib.sha256(data).hexdigest() != digest:
    os.write(1, b"FARM-NEED-AGENT\\n")
    data = b""
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            sys.exit(91)
        data += chunk
    if hashlib.sha256(data).hexdigest() != digest:
        sys.exit(92)
    partial = "%s.%d" % (path, os.getpid())
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        out.write(data)
    os.replace(partial, path)
agent = os.memfd_create("farm-agent", 0)
os.write(agent, data)
os.set_inheritable(agent, True)
os.execv(sys.executable, [sys.executable, "-I", "/proc/self/fd/%d" % agent, "--workdir", workdir])
"""


def stage_one_argv(python: str, workdir: str) -> list[str]:
    """The command that starts the agent of this coordinator in ``workdir`` with ``python``."""
    bundle = agent_bundle()
    return [python, "-I", "-c", _STAGE1, bundle.sha256, str(len(bundle.data)), workdir]


_MAIN = b"import sys\nfrom agent.main import main\nsys.exit(main())\n"
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class AgentBundle:
    data: bytes

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def file_name(self) -> str:
        return f"farm-agent-{self.sha256[:16]}.pyz"


@functools.cache
def agent_bundle() -> AgentBundle:
    package = resources.files("agent")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("__main__.py", _EPOCH), _MAIN)
        for name in sorted(item.name for item in package.iterdir() if item.name.endswith(".py")):
            info = zipfile.ZipInfo(f"agent/{name}", _EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, package.joinpath(name).read_bytes())
    return AgentBundle(buffer.getvalue())


class _StartingAgent(Protocol):
    async def readline(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def push_back(self, line: bytes) -> None: ...


async def answer_stage_one(agent: _StartingAgent) -> None:
    """Stage one either asks for the agent, or runs the cached one, which prints its marker. Lines
    before either (a chatty shell start-up file on an SSH node) are left for the session to skip."""
    for _ in range(_MAX_NOISE_LINES):
        line = await agent.readline()
        if line.rstrip(b"\r\n") == _NEED_AGENT:
            await agent.write(agent_bundle().data)
            return
        agent.push_back(line)
        if not line or line.rstrip(b"\r\n") == MARKER:
            return
