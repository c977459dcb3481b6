"""The agent as one zipapp, built in memory from the ``agent`` package and named by its sha256.

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

__all__ = ["AgentBundle", "agent_bundle"]

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
