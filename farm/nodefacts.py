"""What a node can build, derived from the raw facts its agent reports.

Pure: no I/O here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from farm.errors import PlatformError
from farm.platforms import KNOWN_PLATFORMS, Platform, platform_from_machine

__all__ = ["NodeFacts"]

# Platforms a CPU runs without emulation besides its own (x86-64 runs i386 code natively).
_COMPATIBLE: dict[Platform, tuple[Platform, ...]] = {
    Platform("linux", "amd64"): (Platform("linux", "386"),),
}


# What a 64-bit kernel with a 32-bit userland builds natively.
_USERLAND_32: dict[Platform, Platform] = {
    Platform("linux", "arm64"): Platform("linux", "arm", "v7"),
    Platform("linux", "amd64"): Platform("linux", "386"),
}


class NodeFacts(BaseModel):
    """The agent's ``facts`` message, validated."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    machine: str
    userland_bits: int = 64
    agent_version: str = ""
    system: str = "linux"
    python: str
    cores: int
    memory_bytes: int
    disk_free_bytes: int
    workdir: str
    builders: tuple[str, ...]
    emulators: tuple[str, ...]
    uid: int = -1  # the agent's user: 0 is root
    user: str = ""
    oci_runtime: str = ""  # runc's path: RUN steps can be sandboxed
    private_network: bool = False  # RUN steps can get a network of their own (slirp4netns)
    rootless_ready: bool = False  # a non-root agent has subordinate ids for a rootless builder

    @property
    def runs_as_root(self) -> bool:
        return self.uid == 0

    @property
    def native_platform(self) -> Platform:
        try:
            kernel = platform_from_machine(self.machine, self.system)
        except PlatformError as exc:
            raise PlatformError(f"the node's machine type {self.machine!r} is unknown to farm") from exc
        if self.userland_bits == 32:
            return _USERLAND_32.get(kernel, kernel)
        return kernel

    @property
    def native_platforms(self) -> frozenset[Platform]:
        native = self.native_platform
        return frozenset({native, *_COMPATIBLE.get(native, ())})

    @property
    def emulated_platforms(self) -> frozenset[Platform]:
        """Foreign platforms whose QEMU handler is registered and enabled."""
        registered = set(self.emulators)
        return frozenset(
            platform
            for platform in KNOWN_PLATFORMS
            if platform.emulator_name in registered and platform not in self.native_platforms
        )
