"""Which architecture an ELF file is built for, read from its first 20 bytes.

This is how farm proves that an image labelled linux/s390x really holds s390x programs, whatever
its config claims (a builder that reuses a base image pulled for another platform produces exactly
that lie).

Pure: no I/O here.
"""

from __future__ import annotations

__all__ = ["HEADER_SIZE", "elf_architecture", "is_executable_elf"]

HEADER_SIZE = 20
_MAGIC = b"\x7fELF"
_CLASS_32, _CLASS_64 = 1, 2
_LITTLE, _BIG = 1, 2
_ET_EXEC, _ET_DYN = 2, 3

# (e_machine, class, byte order) -> the architecture an image index would call it.
_ARCHITECTURES: dict[tuple[int, int, int], str] = {
    (62, _CLASS_64, _LITTLE): "amd64",
    (3, _CLASS_32, _LITTLE): "386",
    (183, _CLASS_64, _LITTLE): "arm64",
    (40, _CLASS_32, _LITTLE): "arm",
    (22, _CLASS_64, _BIG): "s390x",
    (21, _CLASS_64, _LITTLE): "ppc64le",
    (21, _CLASS_64, _BIG): "ppc64",
    (243, _CLASS_64, _LITTLE): "riscv64",
    (8, _CLASS_64, _LITTLE): "mips64le",
    (258, _CLASS_64, _LITTLE): "loong64",
}


def is_executable_elf(header: bytes) -> bool:
    """An ELF program or shared object (not an object file or a core dump)."""
    if len(header) < HEADER_SIZE or header[:4] != _MAGIC:
        return False
    return _field(header, 16) in (_ET_EXEC, _ET_DYN)


def elf_architecture(header: bytes) -> str | None:
    """The architecture of an ELF header, a ``machine-N`` name if unknown, None if not ELF."""
    if len(header) < HEADER_SIZE or header[:4] != _MAGIC:
        return None
    elf_class, byte_order = header[4], header[5]
    machine = _field(header, 18)
    known = _ARCHITECTURES.get((machine, elf_class, byte_order))
    if known is not None:
        return known
    bits = {_CLASS_32: "32", _CLASS_64: "64"}.get(elf_class, "?")
    order = {_LITTLE: "le", _BIG: "be"}.get(byte_order, "?")
    return f"machine-{machine}-{bits}{order}"


def _field(header: bytes, offset: int) -> int:
    field = header[offset : offset + 2]
    return int.from_bytes(field, "big") if header[5] == _BIG else int.from_bytes(field, "little")
