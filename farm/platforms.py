"""Platforms: parsing, normalisation and the machine facts they are derived from.

A platform is what an image index descriptor calls it: os, architecture and an optional variant.
Spellings are normalised with containerd's rules (``containerd/platforms``), so ``aarch64``,
``arm64/v8`` and ``linux/arm64`` are one platform, and ``armhf`` is ``linux/arm/v7``. We compare
normalised values but never rewrite what a source image declares.

Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

from farm.errors import PlatformError

__all__ = [
    "KNOWN_PLATFORMS",
    "Platform",
    "parse_platform",
    "parse_platform_list",
    "platform_from_machine",
]

# What ``uname -m`` (or a Debian/QEMU architecture name) says -> (architecture, variant).
_ARCH_ALIASES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "386": ("386", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv6": ("arm", "v6"),
    "armv5l": ("arm", "v5"),
    "armv5tel": ("arm", "v5"),
    "arm": ("arm", ""),
    "s390x": ("s390x", ""),
    "ppc64le": ("ppc64le", ""),
    "ppc64el": ("ppc64le", ""),
    "riscv64": ("riscv64", ""),
    "mips64le": ("mips64le", ""),
    "mips64el": ("mips64le", ""),
    "loong64": ("loong64", ""),
    "loongarch64": ("loong64", ""),
}

_ARM_VARIANTS = {"": "v7", "5": "v5", "6": "v6", "7": "v7", "8": "v8"}
_ARM64_VARIANTS = {"8": "", "v8": "", "v8.0": "", "9": "v9", "9.0": "v9", "v9.0": "v9"}
_OS_ALIASES = {"macos": "darwin"}


@dataclass(frozen=True, order=True)
class Platform:
    """A normalised ``os/architecture[/variant]``, hashable and ordered."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    @property
    def emulator_name(self) -> str:
        """The binfmt_misc handler name QEMU registers for this architecture."""
        return _QEMU_NAMES.get(self.architecture, self.architecture)

    def descriptor(self) -> dict[str, str]:
        """The ``platform`` object of an image index descriptor."""
        fields = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            fields["variant"] = self.variant
        return fields

    def build_args(self, prefix: str) -> dict[str, str]:
        """BuildKit's automatic platform args: ``{prefix}PLATFORM``, ``OS``, ``ARCH``, ``VARIANT``."""
        return {
            f"{prefix}PLATFORM": str(self),
            f"{prefix}OS": self.os,
            f"{prefix}ARCH": self.architecture,
            f"{prefix}VARIANT": self.variant,
        }


_QEMU_NAMES = {
    "arm64": "aarch64",
    "arm": "arm",
    "s390x": "s390x",
    "ppc64le": "ppc64le",
    "riscv64": "riscv64",
    "386": "i386",
    "amd64": "x86_64",
    "mips64le": "mips64el",
    "loong64": "loongarch64",
}

KNOWN_PLATFORMS: tuple[Platform, ...] = (
    Platform("linux", "amd64"),
    Platform("linux", "arm64"),
    Platform("linux", "arm", "v7"),
    Platform("linux", "arm", "v6"),
    Platform("linux", "arm", "v5"),
    Platform("linux", "s390x"),
    Platform("linux", "ppc64le"),
    Platform("linux", "386"),
    Platform("linux", "riscv64"),
    Platform("linux", "mips64le"),
    Platform("linux", "loong64"),
)
_KNOWN = frozenset(KNOWN_PLATFORMS)


def normalize(os: str, architecture: str, variant: str = "") -> Platform:
    """Apply containerd's normalisation to a platform's parts; reject what we cannot name."""
    os = _OS_ALIASES.get(os.lower(), os.lower())
    arch_key = architecture.lower()
    if arch_key not in _ARCH_ALIASES:
        raise PlatformError(
            f"unknown architecture {architecture!r}",
            hint=_valid_spellings(),
        )
    arch, implied_variant = _ARCH_ALIASES[arch_key]
    variant = variant.lower()
    if implied_variant and variant and variant != implied_variant:
        raise PlatformError(
            f"architecture {architecture!r} cannot have variant {variant!r}", hint=_valid_spellings()
        )
    variant = variant or implied_variant
    if arch == "arm":
        variant = _ARM_VARIANTS.get(variant.removeprefix("v"), variant)
    elif arch == "arm64":
        variant = _ARM64_VARIANTS.get(variant, variant)
    elif arch == "amd64" and variant == "v1":
        variant = ""
    platform = Platform(os, arch, variant)
    if platform not in _KNOWN:
        raise PlatformError(f"unknown platform {platform}", hint=_valid_spellings())
    return platform


def parse_platform(text: str) -> Platform:
    """Parse ``os/arch[/variant]`` (or a bare architecture, taken as linux) and normalise it."""
    spelled = text.strip()
    parts = spelled.split("/")
    if not spelled or any(not part for part in parts) or len(parts) > 3:
        raise PlatformError(f"malformed platform {text!r}", hint=_valid_spellings())
    if len(parts) == 1:
        return normalize("linux", parts[0])
    os_name, arch = parts[0], parts[1]
    variant = parts[2] if len(parts) == 3 else ""
    try:
        return normalize(os_name, arch, variant)
    except PlatformError as exc:
        raise PlatformError(f"unknown platform {text!r}: {exc.message}", hint=exc.hint) from exc


def parse_platform_list(values: list[str] | tuple[str, ...]) -> list[Platform]:
    """Parse repeatable, comma-separated ``--platform`` values; keep order, drop repeats."""
    platforms: list[Platform] = []
    for value in values:
        for item in value.split(","):
            if not item.strip():
                raise PlatformError(f"empty platform in {value!r}", hint=_valid_spellings())
            platform = parse_platform(item)
            if platform not in platforms:
                platforms.append(platform)
    return platforms


def platform_from_machine(machine: str, os: str = "linux") -> Platform:
    """The platform a ``uname -m`` value denotes (``armv7l`` -> linux/arm/v7)."""
    return normalize(os, machine)


def _valid_spellings() -> str:
    names = ", ".join(str(p) for p in KNOWN_PLATFORMS)
    return f"valid platforms: {names} (aliases such as aarch64, x86_64, armhf, armel, i386 work too)"
