"""farm.nodefacts: the platforms a node builds, from the raw facts its agent reports."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from farm.errors import PlatformError
from farm.nodefacts import NodeFacts
from farm.platforms import KNOWN_PLATFORMS, Platform

AMD64 = Platform("linux", "amd64")
I386 = Platform("linux", "386")
ARM64 = Platform("linux", "arm64")
ARM_V7 = Platform("linux", "arm", "v7")
ARM_V6 = Platform("linux", "arm", "v6")
ARM_V5 = Platform("linux", "arm", "v5")
S390X = Platform("linux", "s390x")


def facts(machine: str, *emulators: str, **extra: Any) -> NodeFacts:
    return NodeFacts.model_validate(
        {
            "machine": machine,
            "system": "linux",
            "python": "3.11.2",
            "cores": 4,
            "memory_bytes": 8 << 30,
            "disk_free_bytes": 100 << 30,
            "workdir": "/home/farm/.cache/farm-agent",
            "builders": ["buildah"],
            "emulators": list(emulators),
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("machine", "native"),
    [
        ("x86_64", {AMD64, I386}),  # x86-64 runs i386 code natively
        ("aarch64", {ARM64}),
        ("armv7l", {ARM_V7}),
        ("armv6l", {ARM_V6}),
        ("s390x", {S390X}),
        ("i686", {I386}),
    ],
)
def test_native_platforms(machine: str, native: set[Platform]) -> None:
    assert facts(machine).native_platforms == native


def test_system_is_normalised() -> None:
    assert facts("x86_64", system="Linux").native_platform == AMD64


def test_unknown_machine_is_a_platform_error_naming_it() -> None:
    with pytest.raises(PlatformError, match="'sparc64'"):
        _ = facts("sparc64").native_platform


def test_qemu_handler_names_map_to_platforms() -> None:
    node = facts("x86_64", "aarch64", "arm", "s390x", "ppc64le", "riscv64", "mips64el", "loongarch64")
    assert node.emulated_platforms == {
        ARM64,
        ARM_V7,
        ARM_V6,
        ARM_V5,
        S390X,
        Platform("linux", "ppc64le"),
        Platform("linux", "riscv64"),
        Platform("linux", "mips64le"),
        Platform("linux", "loong64"),
    }


def test_native_platforms_are_never_listed_as_emulated() -> None:
    # A handler for the node's own architecture (or for i386 on x86-64) is not emulation.
    assert facts("x86_64", "x86_64", "i386", "aarch64").emulated_platforms == {ARM64}
    assert facts("aarch64", "x86_64", "i386", "aarch64").emulated_platforms == {AMD64, I386}


def test_unknown_handlers_are_ignored() -> None:
    assert facts("x86_64", "sparc64", "qemu-aarch64", "").emulated_platforms == frozenset()


def test_emulated_platforms_are_known_platforms() -> None:
    every = ("aarch64", "arm", "s390x", "ppc64le", "riscv64", "mips64el", "loongarch64", "i386", "x86_64")
    node = facts("riscv64", *every)
    assert node.emulated_platforms == set(KNOWN_PLATFORMS) - {Platform("linux", "riscv64")}


def test_a_32_bit_userland_on_a_64_bit_kernel_builds_32_bit() -> None:
    assert facts("aarch64", userland_bits=32).native_platforms == {ARM_V7}
    assert facts("x86_64", userland_bits=32).native_platforms == {I386}


def test_extra_facts_are_ignored_and_missing_ones_refused() -> None:
    assert facts("x86_64", kernel="6.1").machine == "x86_64"
    with pytest.raises(ValidationError):
        NodeFacts.model_validate({"machine": "x86_64"})
