"""What a node is: read from the machine itself, reported raw.

The coordinator turns these facts into platforms (it owns the normalisation rules); the agent
only says what ``uname -m`` and binfmt_misc say, so the two can never disagree about names.
"""

from __future__ import annotations

import os
import platform
import pwd
import shutil
import struct
import subprocess
import sys
from typing import Any

from agent import AGENT_VERSION
from agent.builders import oci_runtime, private_network_ready

__all__ = ["BUILDERS", "probe"]

BUILDERS = ("buildah", "podman", "docker")
_BINFMT = "/proc/sys/fs/binfmt_misc"


def probe(workdir: str) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    disk = shutil.disk_usage(workdir)
    return {
        "machine": platform.machine(),
        # A 64-bit kernel may run a 32-bit userland (a Pi 4 on Raspberry Pi OS 32-bit): the
        # interpreter's word size tells which one builds would run under.
        "userland_bits": struct.calcsize("P") * 8,
        "system": platform.system().lower(),
        "agent_version": AGENT_VERSION,
        "python": ".".join(str(part) for part in sys.version_info[:3]),
        "cores": os.cpu_count() or 1,
        "memory_bytes": _memory_bytes(),
        "disk_free_bytes": disk.free,
        "workdir": os.path.abspath(workdir),
        "builders": [name for name in BUILDERS if _builder_works(name)],
        "emulators": _emulators(),
        # Who builds here, and how RUN steps can be kept from the node (see agent.builders).
        "uid": os.geteuid(),
        "user": _user_name(),
        "oci_runtime": oci_runtime() or "",
        "private_network": private_network_ready(),
        "rootless_ready": os.geteuid() == 0 or _has_subordinate_ids(),
    }


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _has_subordinate_ids() -> bool:
    """A rootless builder maps a build's users to the ranges /etc/subuid and /etc/subgid give this
    user, through the setuid newuidmap and newgidmap."""
    if shutil.which("newuidmap") is None or shutil.which("newgidmap") is None:
        return False
    names = {_user_name(), str(os.geteuid())}
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as ranges:
                if not any(line.split(":", 1)[0] in names for line in ranges):
                    return False
        except OSError:
            return False
    return True


def _memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _emulators() -> list[str]:
    """The QEMU architectures (``aarch64``, ``arm``, ...) with an enabled binfmt_misc handler."""
    try:
        names = sorted(os.listdir(_BINFMT))
    except OSError:
        return []
    found = []
    for name in names:
        if not name.startswith("qemu-"):
            continue
        try:
            with open(os.path.join(_BINFMT, name)) as handler:
                enabled = handler.readline().strip() == "enabled"
        except OSError:
            continue
        if enabled:
            found.append(name[len("qemu-") :])
    return found


def _builder_works(name: str) -> bool:
    if shutil.which(name) is None:
        return False
    if name != "docker":
        return True
    # The docker client is useless without a daemon to talk to.
    try:
        done = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
