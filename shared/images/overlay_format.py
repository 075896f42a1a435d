"""The on-disk format of a PC's overlay: one sparse data file and one bitmap file.

`<pc>.overlay` is a sparse file the size of the disk; a granule's data sits at the disk's own offset.
`<pc>.bitmap` is a 4096-byte header and then one bit per granule (bit g is bit g % 8, least significant
first, of byte HEADER_SIZE + g // 8): 1 = the overlay owns the granule (reads come from the data file, where
a hole reads as zeros: an UNMAPped granule), 0 = the granule is the base version's.

Invariants (what makes a crash harmless):
- A bit goes from 0 to 1 only after the granule's data is durable in the data file (the target writes the
  data, fdatasyncs it, then writes the bitmap page and fdatasyncs the bitmap). Bits never go back to 0
  while the overlay exists; a reset deletes both files.
- So the bitmap on disk is the truth: after a crash, a granule whose bit is 0 is the base's even if the data
  file holds something there (an unsynced write: the opener punches it away). A torn bitmap sector holds
  either its old or its new bits, and both are consistent, because the new bits only add granules.

Header (little-endian): magic b"BFOVL001", u32 format version (1), u32 granule, u64 disk size,
64 bytes of base id (ASCII, NUL padded: which version this overlay sits on, e.g. "demo@3:1a2b3c4d..."),
zeros to 4096.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"BFOVL001"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
PAGE = 4096  # the bitmap is written back in pages of this many bytes
_HEADER = struct.Struct("<8sIIQ64s")
BASE_ID_MAX = 64

_NOT_ZERO = re.compile(rb"[^\x00]")
_NOT_ONES = re.compile(rb"[^\xff]")

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


class OverlayFormatError(Exception):
    """A bitmap file that is not ours, or does not match the disk it is opened for (the message says which)."""


@dataclass(frozen=True)
class Header:
    granule: int
    size: int
    base_id: str

    @property
    def granules(self) -> int:
        return -(-self.size // self.granule)

    @property
    def bitmap_bytes(self) -> int:
        return -(-self.granules // 8)

    def pack(self) -> bytes:
        base = self.base_id.encode("ascii")
        if len(base) > BASE_ID_MAX:
            raise OverlayFormatError(f"base id {self.base_id!r} is longer than {BASE_ID_MAX} bytes")
        return _HEADER.pack(MAGIC, FORMAT_VERSION, self.granule, self.size, base).ljust(HEADER_SIZE, b"\0")


def bitmap_path(path: str | os.PathLike) -> Path:
    """The bitmap beside a data file: `x.overlay` -> `x.bitmap`."""
    return Path(path).with_suffix(".bitmap")


def read_header(fd: int, where: str) -> Header:
    raw = os.pread(fd, HEADER_SIZE, 0)
    if len(raw) < _HEADER.size:
        raise OverlayFormatError(f"{where}: bitmap file is {len(raw)} bytes, shorter than its header")
    magic, version, granule, size, base = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise OverlayFormatError(f"{where}: not an overlay bitmap (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise OverlayFormatError(f"{where}: overlay format version {version}, this code reads {FORMAT_VERSION}")
    if granule < 512 or granule & (granule - 1):
        raise OverlayFormatError(f"{where}: granule {granule} is not a power of two >= 512")
    return Header(granule, size, base.rstrip(b"\0").decode("ascii", "replace"))


def read_bits(fd: int, header: Header) -> bytearray:
    n = header.bitmap_bytes
    bits = bytearray(n)
    got = os.preadv(fd, [bits], HEADER_SIZE)
    if got < n:  # a file cut short reads as zeros: those granules are the base's
        bits[got:] = bytes(n - got)
    tail = header.granules % 8
    if tail and n:
        bits[-1] &= (1 << tail) - 1  # bits past the disk's end mean nothing
    return bits


def bit(bits, g: int) -> int:
    return (bits[g >> 3] >> (g & 7)) & 1


def set_range(bits: bytearray, g0: int, g1: int) -> None:
    """Set bits [g0, g1)."""
    while g0 < g1 and g0 & 7:
        bits[g0 >> 3] |= 1 << (g0 & 7)
        g0 += 1
    whole = (g1 - g0) >> 3
    if whole:
        bits[g0 >> 3:(g0 >> 3) + whole] = b"\xff" * whole
        g0 += whole << 3
    while g0 < g1:
        bits[g0 >> 3] |= 1 << (g0 & 7)
        g0 += 1


def clear_range(bits: bytearray, g0: int, g1: int) -> None:
    """Clear bits [g0, g1)."""
    while g0 < g1 and g0 & 7:
        bits[g0 >> 3] &= ~(1 << (g0 & 7)) & 0xFF
        g0 += 1
    whole = (g1 - g0) >> 3
    if whole:
        bits[g0 >> 3:(g0 >> 3) + whole] = bytes(whole)
        g0 += whole << 3
    while g0 < g1:
        bits[g0 >> 3] &= ~(1 << (g0 & 7)) & 0xFF
        g0 += 1


def field(bits, g0: int, g1: int) -> int:
    """Bits [g0, g1) as an int (bit 0 = granule g0)."""
    b0 = g0 >> 3
    value = int.from_bytes(bits[b0:((g1 - 1) >> 3) + 1], "little") >> (g0 & 7)
    return value & ((1 << (g1 - g0)) - 1)


def count(bits, g0: int, g1: int) -> int:
    """How many bits of [g0, g1) are set."""
    if g1 <= g0:
        return 0
    return field(bits, g0, g1).bit_count()


def run_end(bits, g: int, limit: int) -> int:
    """The first granule in [g, limit) whose bit differs from bit g's (or limit)."""
    value = bit(bits, g)
    g += 1
    while g < limit and g & 7:
        if bit(bits, g) != value:
            return g
        g += 1
    if g >= limit:
        return limit
    m = (_NOT_ONES if value else _NOT_ZERO).search(bits, g >> 3, -(-limit // 8))
    if m is None:
        return limit
    g = m.start() << 3
    while g < limit and bit(bits, g) == value:
        g += 1
    return min(g, limit)


def runs(bits, granules: int, value: int = 1):
    """(g0, g1) runs of granules whose bit is `value`."""
    g = 0
    while g < granules:
        end = run_end(bits, g, granules)
        if bit(bits, g) == value:
            yield g, end
        g = end


def data_extents(fd: int, size: int, start: int = 0):
    """(start, end) byte ranges of a sparse file within [start, size) that hold data (SEEK_DATA/SEEK_HOLE)."""
    offset = start
    while offset < size:
        try:
            begin = os.lseek(fd, offset, SEEK_DATA)
        except OSError:  # ENXIO: only a hole from here on
            return
        if begin >= size:
            return
        try:
            end = os.lseek(fd, begin, SEEK_HOLE)
        except OSError:
            end = size
        end = min(end, size)
        yield begin, end
        offset = end


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _fallocate = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of a file, keeping its size (reads then return zeros)."""
    if length <= 0:
        return
    if _fallocate is None:
        raise OSError(95, "fallocate(PUNCH_HOLE) is not available (not Linux/glibc)")
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot punch a hole: {os.strerror(err)}")
