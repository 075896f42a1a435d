"""The VHD format (Microsoft Virtual Hard Disk, spec 1.0): footer, dynamic header, block allocation table,
sector bitmaps and parent locators. Sans-IO: functions over bytes; vhd_backstore.py does the file I/O.

Layout. A fixed VHD is the raw disk followed by a 512-byte footer. A dynamic or differencing VHD is a copy of
the footer at offset 0, a 1024-byte dynamic header (at the footer's data_offset), the BAT (one big-endian u32
per block: the block's sector number in the file, 0xFFFFFFFF for none), blocks, and the footer at the end.
A block is its sector bitmap (one bit per 512-byte sector, most significant bit first, padded to 512 bytes)
followed by block_size bytes of data. A set bit means the sector is in this file; a clear bit reads as zeros
(dynamic) or from the parent (differencing). Every field is big-endian. The footer and the dynamic header
carry a checksum: the one's complement of the byte sum of the structure without its checksum field.

Every parse function raises VhdFormatError(field, why): the field is named so the operator knows what is
wrong with the file (the backstore adds the path).
"""

from __future__ import annotations

import itertools
import struct
import time
import uuid as uuidlib
from array import array
from dataclasses import dataclass, field

SECTOR = 512
COOKIE = b"conectix"
SPARSE_COOKIE = b"cxsparse"
VERSION = 0x00010000
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
UNUSED = 0xFFFFFFFF  # a BAT entry with no block
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
DISK_TYPES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}
FEATURE_RESERVED = 0x2  # "must always be set"
DEFAULT_BLOCK_SIZE = 2 << 20
EPOCH = 946684800  # 2000-01-01 00:00:00 UTC, the VHD timestamp origin
# qemu sizes a VHD by its CHS geometry (rounded down) unless the creator is one it knows to use current_size,
# as Hyper-V does; "win " makes qemu and Windows see the size we wrote (the field is informative only)
CREATOR_APP = b"win "
HEADER_SIZE = 1024

FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
DYN_HEADER = struct.Struct(">8sQQIIII16sII512s")  # the first 576 bytes; 8 locators and 256 reserved follow
LOCATOR = struct.Struct(">4sIIIQ")
LOCATORS_AT = 576
FOOTER_CHECKSUM_AT = 64
HEADER_CHECKSUM_AT = 36

# locator platform codes, in the order a differencing disk's parent is looked for (relative first)
W2RU, W2KU, MACX = b"W2ru", b"W2ku", b"MacX"
LOCATOR_ORDER = (W2RU, W2KU, MACX)


class VhdFormatError(ValueError):
    """The bytes are not a usable VHD; `field` names the structure field that is wrong."""

    def __init__(self, field_name: str, why: str):
        super().__init__(f"{field_name}: {why}")
        self.field = field_name


def checksum(buf, at: int) -> int:
    """One's complement of the byte sum of `buf` without the 4-byte checksum field at `at`."""
    return ~(sum(buf) - sum(buf[at:at + 4])) & 0xFFFFFFFF


def bitmap_size(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit per sector, padded to a whole sector."""
    return -(-(block_size // SECTOR // 8) // SECTOR) * SECTOR


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of `size` bytes, as the VHD spec's appendix computes
    them (the geometry is informative: we use current_size as the disk's size, as Hyper-V does)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


# ---------------------------------------------------------------------------------------------- footer
@dataclass(frozen=True)
class Footer:
    disk_type: int
    current_size: int
    uuid: bytes
    data_offset: int = NO_OFFSET
    original_size: int = 0
    features: int = FEATURE_RESERVED
    version: int = VERSION
    timestamp: int = 0
    creator_app: bytes = CREATOR_APP
    creator_version: int = 0x00010000
    creator_os: bytes = b"Wi2k"
    geometry: tuple = (0, 0, 0)
    saved_state: int = 0

    def pack(self) -> bytes:
        c, h, s = self.geometry
        raw = bytearray(FOOTER.pack(COOKIE, self.features, self.version, self.data_offset, self.timestamp,
                                    self.creator_app, self.creator_version, self.creator_os, self.original_size,
                                    self.current_size, c, h, s, self.disk_type, 0, self.uuid, self.saved_state,
                                    bytes(427)))
        struct.pack_into(">I", raw, FOOTER_CHECKSUM_AT, checksum(raw, FOOTER_CHECKSUM_AT))
        return bytes(raw)


def parse_footer(buf) -> Footer:
    if len(buf) < FOOTER.size:
        raise VhdFormatError("footer", f"{len(buf)} bytes, a footer is {FOOTER.size}")
    (cookie, features, version, data_offset, timestamp, app, app_version, host, original, current, c, h, s,
     disk_type, stored, uid, saved, _) = FOOTER.unpack_from(buf)
    if cookie != COOKIE:
        raise VhdFormatError("footer cookie", f"{cookie!r}, not {COOKIE!r}")
    computed = checksum(memoryview(buf)[:FOOTER.size], FOOTER_CHECKSUM_AT)
    if stored != computed:
        raise VhdFormatError("footer checksum", f"stored {stored:#010x}, computed {computed:#010x}")
    if version >> 16 != 1:
        raise VhdFormatError("footer file_format_version", f"{version:#010x}, only major version 1 is known")
    if disk_type not in DISK_TYPES:
        raise VhdFormatError("footer disk_type", f"{disk_type} (2 fixed, 3 dynamic and 4 differencing are known)")
    if current <= 0 or current % SECTOR:
        raise VhdFormatError("footer current_size", f"{current} is not a positive multiple of {SECTOR}")
    if disk_type == FIXED and data_offset != NO_OFFSET:
        # some old tools wrote 0 here; anything else in a fixed disk points at nothing we know
        if data_offset != 0:
            raise VhdFormatError("footer data_offset", f"{data_offset:#x} in a fixed disk (expected none)")
    if disk_type != FIXED and (data_offset == NO_OFFSET or data_offset % SECTOR):
        raise VhdFormatError("footer data_offset", f"{data_offset:#x} is not the sector offset of a dynamic header")
    return Footer(disk_type=disk_type, current_size=current, uuid=uid, data_offset=data_offset,
                  original_size=original, features=features, version=version, timestamp=timestamp,
                  creator_app=app, creator_version=app_version, creator_os=host, geometry=(c, h, s),
                  saved_state=saved)


# ---------------------------------------------------------------------------------------------- dynamic header
@dataclass(frozen=True)
class Locator:
    code: bytes
    data_space: int  # in sectors, as the spec says (some writers store bytes; nothing here depends on it)
    data_length: int
    data_offset: int


@dataclass(frozen=True)
class DynamicHeader:
    table_offset: int
    max_table_entries: int
    block_size: int = DEFAULT_BLOCK_SIZE
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: tuple = field(default_factory=tuple)  # Locator, at most 8
    data_offset: int = NO_OFFSET
    version: int = VERSION

    def pack(self) -> bytes:
        raw = bytearray(HEADER_SIZE)
        name = self.parent_name.encode("utf-16-be")[:512]
        DYN_HEADER.pack_into(raw, 0, SPARSE_COOKIE, self.data_offset, self.table_offset, self.version,
                             self.max_table_entries, self.block_size, 0, self.parent_uuid,
                             self.parent_timestamp, 0, name)
        for i, loc in enumerate(self.locators[:8]):
            LOCATOR.pack_into(raw, LOCATORS_AT + i * LOCATOR.size, loc.code, loc.data_space, loc.data_length, 0,
                              loc.data_offset)
        struct.pack_into(">I", raw, HEADER_CHECKSUM_AT, checksum(raw, HEADER_CHECKSUM_AT))
        return bytes(raw)


def parse_dynamic_header(buf) -> DynamicHeader:
    if len(buf) < HEADER_SIZE:
        raise VhdFormatError("dynamic header", f"{len(buf)} bytes, the header is {HEADER_SIZE} (file truncated?)")
    (cookie, data_offset, table_offset, version, entries, block_size, stored, parent_uuid, parent_ts, _,
     name) = DYN_HEADER.unpack_from(buf)
    if cookie != SPARSE_COOKIE:
        raise VhdFormatError("dynamic header cookie", f"{cookie!r}, not {SPARSE_COOKIE!r}")
    computed = checksum(memoryview(buf)[:HEADER_SIZE], HEADER_CHECKSUM_AT)
    if stored != computed:
        raise VhdFormatError("dynamic header checksum", f"stored {stored:#010x}, computed {computed:#010x}")
    if version >> 16 != 1:
        raise VhdFormatError("dynamic header header_version", f"{version:#010x}, only major version 1 is known")
    if block_size < SECTOR or block_size & (block_size - 1):
        raise VhdFormatError("dynamic header block_size", f"{block_size} is not a power of two >= {SECTOR}")
    if table_offset % SECTOR or table_offset == NO_OFFSET:
        raise VhdFormatError("dynamic header table_offset", f"{table_offset:#x} is not a sector offset")
    locators = []
    for i in range(8):
        code, space, length, _, offset = LOCATOR.unpack_from(buf, LOCATORS_AT + i * LOCATOR.size)
        if code != bytes(4):
            locators.append(Locator(code, space, length, offset))
    return DynamicHeader(table_offset=table_offset, max_table_entries=entries, block_size=block_size,
                         parent_uuid=parent_uuid, parent_timestamp=parent_ts,
                         parent_name=name.decode("utf-16-be", "replace").split("\0", 1)[0],
                         locators=tuple(locators), data_offset=data_offset, version=version)


# ---------------------------------------------------------------------------------------------- BAT
def bat_bytes(entries: int) -> int:
    """Bytes the BAT takes in the file (whole sectors)."""
    return -(-entries * 4 // SECTOR) * SECTOR


def parse_bat(buf, entries: int) -> array:
    """The BAT as an array of native u32 (0xFFFFFFFF: no block)."""
    bat = array("I")
    if bat.itemsize != 4:  # pragma: no cover - every platform we run on has a 4-byte unsigned int
        bat = array("L")
    bat.frombytes(bytes(buf[:entries * 4]))
    if len(bat) != entries:
        raise VhdFormatError("BAT", f"{len(bat)} of {entries} entries present (file truncated?)")
    if struct.pack("=I", 1) != struct.pack(">I", 1):
        bat.byteswap()
    return bat


def pack_bat(bat: array, first: int = 0, count: int | None = None) -> bytes:
    """Entries [first, first+count) as big-endian bytes."""
    part = array(bat.typecode, bat[first:None if count is None else first + count])
    if struct.pack("=I", 1) != struct.pack(">I", 1):
        part.byteswap()
    return part.tobytes()


def check_bat(bat: array, size: int, block_size: int, reserved: list[tuple[int, int]], data_end: int) -> int:
    """Check every used BAT entry: its block lies inside [.., data_end), overlaps no metadata range
    (`reserved`: (start, end) byte ranges) and no other block. Returns the first free byte after the
    highest block (where the next block is allocated)."""
    needed = -(-size // block_size)
    if len(bat) < needed:
        raise VhdFormatError("dynamic header max_table_entries",
                             f"{len(bat)} entries cannot map {size} bytes in {block_size}-byte blocks ({needed})")
    span = bitmap_size(block_size) + block_size
    used = sorted((sector, i) for i, sector in enumerate(bat) if sector != UNUSED)
    free = max(end for _, end in reserved)
    previous_end, previous = 0, None
    for sector, i in used:
        start = sector * SECTOR
        if i >= needed:
            raise VhdFormatError(f"BAT entry {i}", f"maps block {i}, beyond the disk's {needed} blocks")
        # the last block of a disk whose size is not a multiple of the block size may stop at the disk's end
        data = min(block_size, size - i * block_size)
        end = start + bitmap_size(block_size) + data
        if end > data_end:
            raise VhdFormatError(f"BAT entry {i}", f"block at {start:#x} ends at {end:#x}, beyond the data's end "
                                                   f"{data_end:#x}")
        for lo, hi in reserved:
            if start < hi and end > lo:
                raise VhdFormatError(f"BAT entry {i}", f"block at {start:#x} overlaps metadata at {lo:#x}..{hi:#x}")
        if start < previous_end:
            raise VhdFormatError(f"BAT entry {i}", f"block at {start:#x} overlaps block {previous}")
        previous_end, previous = start + span, i
        free = max(free, start + span)
    return -(-free // SECTOR) * SECTOR


# ---------------------------------------------------------------------------------------------- sector bitmaps
_FULL = b"\xff" * 4096


def _mask(bm, first_sector: int, end_sector: int) -> tuple[int, int]:
    """(bits of sectors [first, end) of `bm` as an int aligned at bit 0 of the last byte, their mask)."""
    lo, hi = first_sector >> 3, (end_sector - 1 >> 3) + 1
    value = int.from_bytes(bm[lo:hi], "big")
    nbits = (hi - lo) * 8
    n = end_sector - first_sector
    shift = nbits - (end_sector - lo * 8)
    return value, ((1 << n) - 1) << shift


def bits_state(bm, first: int, end: int) -> int:
    """Sectors [first, end) of a bitmap: 1 all set, 0 none set, -1 mixed."""
    if not first & 7 and not end & 7 and end - first <= 8 * len(_FULL):
        chunk = bm[first >> 3:end >> 3]
        if chunk == _FULL[:len(chunk)]:
            return 1
        if not any(chunk):
            return 0
        return -1
    value, mask = _mask(bm, first, end)
    got = value & mask
    return 1 if got == mask else 0 if not got else -1


def set_bits(bm: bytearray, first: int, end: int) -> None:
    """Set the bits of sectors [first, end)."""
    lo, hi = first >> 3, end >> 3
    if lo == hi:
        bm[lo] |= (0xFF >> (first & 7)) & ~(0xFF >> (end & 7)) & 0xFF
        return
    if first & 7:
        bm[lo] |= 0xFF >> (first & 7)
        lo += 1
    if hi > lo:
        bm[lo:hi] = _FULL[:hi - lo] if hi - lo <= len(_FULL) else b"\xff" * (hi - lo)
    if end & 7:
        bm[hi] |= ~(0xFF >> (end & 7)) & 0xFF


def bit_runs(bm, first: int, end: int):
    """Runs (present, start sector, end sector) covering [first, end), in order."""
    value, mask = _mask(bm, first, end)
    n = end - first
    shift = (mask & -mask).bit_length() - 1
    bits = format((value & mask) >> shift, f"0{n}b")
    at = first
    for bit, group in itertools.groupby(bits):
        k = sum(1 for _ in group)
        yield bit == "1", at, at + k
        at += k


# ---------------------------------------------------------------------------------------------- parent locators
def decode_locator(code: bytes, data: bytes) -> str | None:
    """The path a locator holds, as written (Windows separators kept), or None for a kind we cannot use."""
    if code in (W2RU, W2KU):
        return data.decode("utf-16-le", "replace").split("\0", 1)[0]
    if code == MACX:
        from urllib.parse import unquote, urlsplit

        text = data.decode("utf-8", "replace").split("\0", 1)[0]
        parts = urlsplit(text)
        return unquote(parts.path) if parts.scheme == "file" else text
    return None


def windows_path(path: str) -> str:
    return path.replace("/", "\\")


def posix_path(path: str) -> str:
    return path.replace("\\", "/")


# ---------------------------------------------------------------------------------------------- building images
def timestamp(now: float | None = None) -> int:
    return max(0, int(time.time() if now is None else now) - EPOCH) & 0xFFFFFFFF


def new_uuid() -> bytes:
    return uuidlib.uuid4().bytes


def fixed_footer(size: int, uid: bytes | None = None, now: float | None = None) -> bytes:
    """The footer to append to `size` bytes of raw data to make a fixed VHD."""
    return Footer(disk_type=FIXED, current_size=size, original_size=size, uuid=uid or new_uuid(),
                  timestamp=timestamp(now), geometry=chs_geometry(size)).pack()


@dataclass(frozen=True)
class Layout:
    """A new dynamic or differencing VHD with no blocks: `head` is written at 0, `footer` at `footer_at`."""
    head: bytes
    footer: bytes
    footer_at: int
    footer_record: Footer
    header: DynamicHeader


def dynamic_layout(size: int, block_size: int = DEFAULT_BLOCK_SIZE, uid: bytes | None = None,
                   parent: Footer | None = None, parent_name: str = "", parent_locators: tuple = (),
                   now: float | None = None) -> Layout:
    """An empty dynamic VHD (or, with `parent`, a differencing VHD over it): footer copy, header, BAT, the
    parent locators' data (each `(code, bytes)`), each piece on sector boundaries, then the footer."""
    if size <= 0 or size % SECTOR:
        raise VhdFormatError("current_size", f"{size} is not a positive multiple of {SECTOR}")
    if block_size < SECTOR or block_size & (block_size - 1):
        raise VhdFormatError("block_size", f"{block_size} is not a power of two >= {SECTOR}")
    entries = -(-size // block_size)
    table = 3 * SECTOR
    at = table + bat_bytes(entries)
    locators, blobs = [], []
    for code, data in parent_locators:
        space = -(-len(data) // SECTOR) or 1
        locators.append(Locator(code, space, len(data), at))
        blobs.append(data + bytes(space * SECTOR - len(data)))
        at += space * SECTOR
    footer = Footer(disk_type=DIFFERENCING if parent else DYNAMIC, current_size=size, original_size=size,
                    uuid=uid or new_uuid(), data_offset=SECTOR, timestamp=timestamp(now),
                    geometry=chs_geometry(size))
    header = DynamicHeader(table_offset=table, max_table_entries=entries, block_size=block_size,
                           parent_uuid=parent.uuid if parent else bytes(16),
                           parent_timestamp=parent.timestamp if parent else 0, parent_name=parent_name,
                           locators=tuple(locators))
    packed = footer.pack()
    head = packed + header.pack() + b"\xff" * (entries * 4) + bytes(bat_bytes(entries) - entries * 4) + b"".join(blobs)
    return Layout(head=head, footer=packed, footer_at=at, footer_record=footer, header=header)

