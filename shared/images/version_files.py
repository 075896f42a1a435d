"""A version file's bytes: reflink or sparse copy, an overlay's granules merged in, the checksum.

File descriptors in, no manifest: the store (shared/images/store.py) decides what is copied where.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from shared.images import overlay_format as F
from shared.images.errors import ImageStoreError

CHUNK = 1 << 20
_FICLONE = 0x40049409


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reflink(src: int, dst: int) -> bool:
    """Clone src into dst (XFS, btrfs): instant and shares every extent. False where unsupported."""
    try:
        fcntl.ioctl(dst, _FICLONE, src)
        return True
    except OSError:
        return False


def can_reflink(base: Path, d: Path) -> bool:
    probe = d / "versions" / ".reflink-probe"
    try:
        with open(base, "rb") as src, open(probe, "wb") as dst:
            return reflink(src.fileno(), dst.fileno())
    finally:
        probe.unlink(missing_ok=True)


def copy_range(src: int, dst: int, start: int, end: int) -> None:
    off = start
    while off < end:
        n = os.copy_file_range(src, dst, min(end - off, 1 << 30), off, off)
        if n <= 0:  # not supported across these files: by hand
            data = os.pread(src, min(end - off, CHUNK), off)
            n = os.pwrite(dst, data, off)
        off += n


def sparse_copy(src: int, dst: int, size: int, progress, phase: str) -> None:
    """Copy src's data extents to the same offsets in dst; its holes stay holes."""
    os.ftruncate(dst, size)
    for start, end in F.data_extents(src, size):
        copy_range(src, dst, start, end)
        progress(end, size, phase)
    progress(size, size, phase)


def merge(ov: int, dst: int, bits, header: F.Header, progress) -> None:
    """Lay the overlay's owned granules over dst: zeros (a hole) where the overlay holds none (unmapped
    granules read zeros), its data where it has some. Granules it does not own stay the base's."""
    g_size, size = header.granule, header.size
    for g0, g1 in F.runs(bits, header.granules, 1):
        start, end = g0 * g_size, min(g1 * g_size, size)
        F.punch_hole(dst, start, end - start)
        for ds, de in F.data_extents(ov, end, start):
            copy_range(ov, dst, ds, de)
        progress(end, size, "merge")
    progress(size, size, "merge")


_ZERO_MIB = hashlib.sha256(bytes(CHUNK)).digest()


def digest(fd: int, size: int, progress) -> str:
    """sha256 of the concatenated sha256 digests of each MiB of the file (the last piece may be shorter).

    A function of the content alone, but a MiB that is a hole is known without reading or hashing it: an
    empty 40 GiB version is checksummed at once, and publish and verify cost what a version's data does.
    By hand (docs/images.md): python3 -c 'import hashlib,sys; f=open(sys.argv[1],"rb"); o=hashlib.sha256();
    [o.update(hashlib.sha256(c).digest()) for c in iter(lambda: f.read(1<<20), b"")]; print(o.hexdigest())' FILE
    """
    outer = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    off = 0
    data = next_data(fd, 0, size)
    while off < size:
        n = min(CHUNK, size - off)
        if data >= off + n:  # all hole
            outer.update(_ZERO_MIB if n == CHUNK else hashlib.sha256(bytes(n)).digest())
        else:
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:n]], off + got)
                if k <= 0:
                    raise ImageStoreError(f"short read at {off + got} of {size} while checksumming")
                got += k
            outer.update(hashlib.sha256(view[:n]).digest())
        off += n
        if data < off:
            data = next_data(fd, off, size)
        if not off & ((256 << 20) - 1):
            progress(off, size, "checksum")
    progress(size, size, "checksum")
    return outer.hexdigest()


def next_data(fd: int, off: int, size: int) -> int:
    if off >= size:
        return size
    try:
        return os.lseek(fd, off, F.SEEK_DATA)
    except OSError:  # ENXIO: a hole to the end
        return size
