"""CDB field decoding: precompiled structs for the block commands' (flags, LBA, transfer length) triples.

Each `*_fields(cdb)` returns (byte 1 flags, LBA, number of blocks). The 6-byte forms keep their quirks
(21-bit LBA; a transfer length of 0 means 256 blocks for READ/WRITE(6)).
"""

from __future__ import annotations

import struct

RW10 = struct.Struct(">xBIxHx")     # flags, LBA, length (READ/WRITE/VERIFY/PRE-FETCH/SYNC CACHE/WRITE SAME 10)
RW12 = struct.Struct(">xBIIxx")     # flags, LBA, length
RW16 = struct.Struct(">xBQIxx")     # flags, LBA, length
CAW = struct.Struct(">xBQxxxBxx")   # COMPARE AND WRITE: flags, LBA, number of blocks (byte 13)
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

GROUP_10 = frozenset((0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35, 0x41))
GROUP_12 = frozenset((0xA8, 0xAA, 0xAE, 0xAF))
GROUP_16 = frozenset((0x88, 0x8A, 0x8B, 0x8E, 0x8F, 0x90, 0x91, 0x93))


def rw6_fields(cdb) -> tuple[int, int, int]:
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return 0, lba, cdb[4] or 256


def lba_fields(cdb) -> tuple[int, int, int]:
    """(flags, LBA, blocks) of any block command that carries them."""
    op = cdb[0]
    if op in GROUP_10:
        return RW10.unpack_from(cdb)
    if op in GROUP_16:
        return RW16.unpack_from(cdb)
    if op in GROUP_12:
        return RW12.unpack_from(cdb)
    if op in (0x08, 0x0A):
        return rw6_fields(cdb)
    if op == 0x89:
        return CAW.unpack_from(cdb)
    raise ValueError(f"opcode {op:#04x} has no LBA field")


def cdb_length(opcode: int) -> int:
    """The CDB size its group code implies (SPC-4 4.2.5.1)."""
    group = opcode >> 5
    return (6, 10, 10, 0, 16, 12, 0, 0)[group]
