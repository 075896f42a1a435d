"""CDB field decoding: precompiled structs for the block commands' (flags, LBA, transfer length) triples.

The structs unpack (byte 1 flags, LBA, number of blocks); `rw6_fields(cdb)` does the same for the 6-byte
forms, which keep their quirks (21-bit LBA; a transfer length of 0 means 256 blocks for READ/WRITE(6)).
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


def rw6_fields(cdb) -> tuple[int, int, int]:
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return 0, lba, cdb[4] or 256
