"""farm.elf: the architecture an ELF program is built for, from its first 20 bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.elf import HEADER_SIZE, elf_architecture, is_executable_elf

_SETTINGS = settings(database=None, deadline=None)

ET_REL, ET_EXEC, ET_DYN, ET_CORE = 1, 2, 3, 4
CLASS_32, CLASS_64 = 1, 2
LITTLE, BIG = 1, 2


def header(machine: int, elf_class: int, order: int, elf_type: int = ET_EXEC) -> bytes:
    """e_ident (16 bytes), then e_type and e_machine in the file's byte order: 20 bytes."""
    ident = b"\x7fELF" + bytes([elf_class, order, 1, 0]) + bytes(8)
    return ident + struct.pack(">HH" if order == BIG else "<HH", elf_type, machine)


# What `file` says about real binaries of each platform, reduced to (e_machine, class, byte order).
TABLE = [
    ("amd64", 62, CLASS_64, LITTLE),
    ("386", 3, CLASS_32, LITTLE),
    ("arm64", 183, CLASS_64, LITTLE),
    ("arm", 40, CLASS_32, LITTLE),
    ("s390x", 22, CLASS_64, BIG),
    ("ppc64le", 21, CLASS_64, LITTLE),
    ("ppc64", 21, CLASS_64, BIG),
    ("riscv64", 243, CLASS_64, LITTLE),
    ("mips64le", 8, CLASS_64, LITTLE),
    ("loong64", 258, CLASS_64, LITTLE),
]


def test_crafted_header_is_twenty_bytes() -> None:
    assert HEADER_SIZE == 20
    assert len(header(62, CLASS_64, LITTLE)) == HEADER_SIZE


@pytest.mark.parametrize(("architecture", "machine", "elf_class", "order"), TABLE)
def test_each_architecture_is_recognised(architecture: str, machine: int, elf_class: int, order: int) -> None:
    assert elf_architecture(header(machine, elf_class, order)) == architecture
    assert elf_architecture(header(machine, elf_class, order, ET_DYN)) == architecture
    assert is_executable_elf(header(machine, elf_class, order))


def test_byte_order_decides_how_e_machine_is_read() -> None:
    # s390x is big-endian: 22 read as little-endian would be 0x1600.
    assert header(22, CLASS_64, BIG)[18:20] == b"\x00\x16"
    assert elf_architecture(header(22, CLASS_64, BIG)) == "s390x"
    assert elf_architecture(header(22, CLASS_64, LITTLE)) == "machine-22-64le"
    # loong64's 258 needs both bytes.
    assert header(258, CLASS_64, LITTLE)[18:20] == b"\x02\x01"


@pytest.mark.parametrize(
    ("machine", "elf_class", "order", "expected"),
    [
        (62, CLASS_32, LITTLE, "machine-62-32le"),  # x32 ABI: not amd64
        (183, CLASS_64, BIG, "machine-183-64be"),  # big-endian arm64
        (40, CLASS_32, BIG, "machine-40-32be"),  # armeb
        (8, CLASS_32, BIG, "machine-8-32be"),  # 32-bit MIPS
        (2, CLASS_64, BIG, "machine-2-64be"),  # SPARC
        (62, 0, LITTLE, "machine-62-?le"),
        (62, CLASS_64, 0, "machine-62-64?"),
    ],
)
def test_other_combinations_are_named_not_guessed(
    machine: int, elf_class: int, order: int, expected: str
) -> None:
    assert elf_architecture(header(machine, elf_class, order)) == expected


@pytest.mark.parametrize(
    ("elf_type", "executable"),
    [(0, False), (ET_REL, False), (ET_EXEC, True), (ET_DYN, True), (ET_CORE, False)],
)
@pytest.mark.parametrize("order", [LITTLE, BIG])
def test_only_programs_and_shared_objects_are_executable(elf_type: int, executable: bool, order: int) -> None:
    data = header(22, CLASS_64, order, elf_type)
    assert is_executable_elf(data) is executable
    # The architecture is read whatever the type.
    assert elf_architecture(data) is not None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x7fELF",
        header(62, CLASS_64, LITTLE)[:19],
        b"#!/bin/sh\n" + bytes(10),
        b"\x7fELG" + header(62, CLASS_64, LITTLE)[4:],
        b"MZ" + bytes(18),
        bytes(20),
    ],
)
def test_non_elf_is_none_and_not_executable(data: bytes) -> None:
    assert elf_architecture(data) is None
    assert not is_executable_elf(data)


def test_longer_input_is_fine() -> None:
    data = header(183, CLASS_64, LITTLE) + b"\x00" * 1000
    assert elf_architecture(data) == "arm64"
    assert is_executable_elf(bytearray(data))


@_SETTINGS
@given(st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_any_elf_header_gets_a_name(ident_tail: bytes, elf_type: int, machine: int) -> None:
    ident = b"\x7fELF" + ident_tail[4:]
    order = ">" if ident[5] == BIG else "<"
    data = ident + struct.pack(f"{order}HH", elf_type, machine)
    name = elf_architecture(data)
    assert name is not None
    known = {(m, c, o): a for a, m, c, o in TABLE}
    assert name == known.get((machine, ident[4], ident[5]), name)
    if (machine, ident[4], ident[5]) not in known:
        assert name.startswith(f"machine-{machine}-")
    assert is_executable_elf(data) is (elf_type in (ET_EXEC, ET_DYN))


@_SETTINGS
@given(st.binary(max_size=40).filter(lambda data: not data.startswith(b"\x7fELF")))
def test_anything_without_the_magic_is_not_elf(data: bytes) -> None:
    assert elf_architecture(data) is None
    assert not is_executable_elf(data)
