"""The VHDX format (MS-VHDX), as much as a read-only reader of fixed and dynamic disks needs. Sans-IO:
`parse(read, file_size)` takes a function read(offset, length) -> bytes.

Layout (every field little-endian, GUIDs in Windows byte order): the file identifier "vhdxfile" at 0; two
4 KiB headers at 64 and 128 KiB (CRC-32C; the valid one with the higher sequence number is current); two
64 KiB region tables at 192 and 256 KiB (CRC-32C) locating the BAT and the metadata region; the metadata
table (file parameters: block size, has-parent; virtual disk size; logical sector size); the BAT, 64-bit
entries (state in bits 0-2, file offset in MiB in bits 20-63) where every `chunk_ratio` payload entries are
followed by one sector-bitmap entry.

Refused, each with the field named: a header or region table with a bad CRC, a non-empty log (log_guid set:
the file was not closed cleanly and its log must be replayed first, e.g. by `qemu-img check -r all`), an
unknown required region or metadata item, a differencing VHDX (has_parent; convert it to a flat image
first), a partially present block without a parent, a block beyond the end of the file.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

import crc32c

SIGNATURE = b"vhdxfile"
KiB, MiB = 1024, 1024 * 1024
HEADER_AT = (64 * KiB, 128 * KiB)
REGION_AT = (192 * KiB, 256 * KiB)
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
REGION_HEADER = struct.Struct("<4sIII")
REGION_ENTRY = struct.Struct("<16sQII")
META_HEADER = struct.Struct("<8sHH20s")
META_ENTRY = struct.Struct("<16sIII4x")


def _guid(text: str) -> bytes:
    return uuidlib.UUID(text).bytes_le


BAT_REGION = _guid("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_REGION = _guid("8b7ca206-4790-4b9a-b8fe-575f050f886e")
FILE_PARAMETERS = _guid("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE = _guid("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
LOGICAL_SECTOR_SIZE = _guid("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_SIZE = _guid("cda348c7-445d-4471-9cc9-e9885251c556")
VIRTUAL_DISK_ID = _guid("beca12ab-b2e6-4523-93ef-c309e000c746")
PAGE_83 = _guid("f148cd2a-8e74-4eea-a1f9-4fbfc23b6c87")
PARENT_LOCATOR = _guid("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
KNOWN_ITEMS = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE, VIRTUAL_DISK_ID,
               PAGE_83, PARENT_LOCATOR}

# payload block states
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7


class VhdxFormatError(ValueError):
    def __init__(self, field_name: str, why: str):
        super().__init__(f"{field_name}: {why}")
        self.field = field_name


@dataclass(frozen=True)
class Image:
    size: int
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    offsets: list  # file offset of each payload block's data, 0 for a block that reads as zeros


def _crc_ok(buf: bytes) -> bool:
    stored = struct.unpack_from("<I", buf, 4)[0]
    return crc32c.crc32c(buf[:4] + bytes(4) + buf[8:]) == stored


def parse(read, file_size: int) -> Image:
    if read(0, 8) != SIGNATURE:
        raise VhdxFormatError("file identifier", "no 'vhdxfile' signature")
    headers = []
    for at in HEADER_AT:
        raw = read(at, 4 * KiB)
        if len(raw) == 4 * KiB and raw[:4] == b"head" and _crc_ok(raw):
            headers.append(HEADER.unpack_from(raw))
    if not headers:
        raise VhdxFormatError("header checksum", "neither header has the 'head' signature and a valid CRC-32C")
    _, _, _seq, _fw, _dw, log_guid, _lv, version, _ll, _lo = max(headers, key=lambda h: h[2])
    if version != 1:
        raise VhdxFormatError("header version", f"{version}, only version 1 is known")
    if log_guid != bytes(16):
        raise VhdxFormatError("header log_guid", "the log holds entries not yet replayed (the file was not closed "
                                                 "cleanly); replay it first, e.g. with qemu-img check -r all")
    regions = None
    for at in REGION_AT:
        raw = read(at, 64 * KiB)
        if len(raw) == 64 * KiB and raw[:4] == b"regi" and _crc_ok(raw):
            regions = raw
            break
    if regions is None:
        raise VhdxFormatError("region table checksum", "neither region table has the 'regi' signature and a valid "
                                                       "CRC-32C")
    count = REGION_HEADER.unpack_from(regions)[2]
    if count > 2047:
        raise VhdxFormatError("region table entry_count", f"{count} > 2047")
    found = {}
    for i in range(count):
        guid, offset, length, required = REGION_ENTRY.unpack_from(regions, 16 + i * REGION_ENTRY.size)
        if guid in (BAT_REGION, METADATA_REGION):
            if offset + length > file_size:
                raise VhdxFormatError("region table entry", f"region {uuidlib.UUID(bytes_le=guid)} at {offset:#x} "
                                                            f"({length} bytes) ends past the file")
            found[guid] = (offset, length)
        elif required & 1:
            raise VhdxFormatError("region table entry", f"unknown required region {uuidlib.UUID(bytes_le=guid)}")
    if BAT_REGION not in found or METADATA_REGION not in found:
        raise VhdxFormatError("region table", "no BAT or no metadata region")
    meta_at, meta_len = found[METADATA_REGION]
    meta = read(meta_at, meta_len)
    sig, _, entries, _ = META_HEADER.unpack_from(meta)
    if sig != b"metadata":
        raise VhdxFormatError("metadata table signature", f"{sig!r}")
    items = {}
    for i in range(entries):
        guid, offset, length, flags = META_ENTRY.unpack_from(meta, 32 + i * META_ENTRY.size)
        if guid not in KNOWN_ITEMS and flags & 0x4:
            raise VhdxFormatError("metadata item", f"unknown required item {uuidlib.UUID(bytes_le=guid)}")
        if offset + length > meta_len:
            raise VhdxFormatError("metadata item", f"item {uuidlib.UUID(bytes_le=guid)} ends past its region")
        items[guid] = meta[offset:offset + length]
    for need, name, n in ((FILE_PARAMETERS, "file parameters", 8), (VIRTUAL_DISK_SIZE, "virtual disk size", 8),
                          (LOGICAL_SECTOR_SIZE, "logical sector size", 4)):
        if len(items.get(need, b"")) < n:
            raise VhdxFormatError(f"metadata {name}", "missing")
    block_size, params = struct.unpack_from("<II", items[FILE_PARAMETERS])
    size = struct.unpack_from("<Q", items[VIRTUAL_DISK_SIZE])[0]
    logical = struct.unpack_from("<I", items[LOGICAL_SECTOR_SIZE])[0]
    physical = struct.unpack_from("<I", items[PHYSICAL_SECTOR_SIZE])[0] if len(
        items.get(PHYSICAL_SECTOR_SIZE, b"")) >= 4 else logical
    if params & 0x2:
        raise VhdxFormatError("metadata file parameters has_parent", "a differencing VHDX is not served; "
                              "convert it to a flat image first (qemu-img convert -O vpc or raw)")
    if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
        raise VhdxFormatError("metadata file parameters block_size", f"{block_size}: not a power of two in 1-256 MiB")
    if logical not in (512, 4096):
        raise VhdxFormatError("metadata logical sector size", f"{logical}, not 512 or 4096")
    if size <= 0 or size % logical:
        raise VhdxFormatError("metadata virtual disk size", f"{size} is not a positive multiple of {logical}")
    chunk_ratio = (1 << 23) * logical // block_size
    blocks = -(-size // block_size)
    bat_entries = blocks + (blocks - 1) // chunk_ratio
    bat_at, bat_len = found[BAT_REGION]
    if bat_entries * 8 > bat_len:
        raise VhdxFormatError("region table BAT length", f"{bat_len} bytes cannot hold {bat_entries} entries")
    raw = read(bat_at, bat_entries * 8)
    offsets = [0] * blocks
    for i in range(blocks):
        entry = struct.unpack_from("<Q", raw, (i + i // chunk_ratio) * 8)[0]
        state = entry & 7
        if state in (NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED):
            continue
        if state != FULLY_PRESENT:
            raise VhdxFormatError(f"BAT entry {i}", f"state {state} (only fully present blocks are possible "
                                                    "without a parent)")
        at = (entry >> 20) * MiB
        if at < MiB or at + min(block_size, size - i * block_size) > file_size:
            raise VhdxFormatError(f"BAT entry {i}", f"block at {at:#x} is outside the file ({file_size} bytes)")
        offsets[i] = at
    return Image(size=size, block_size=block_size, logical_sector_size=logical, physical_sector_size=physical,
                 offsets=offsets)
