"""Where a logical unit's blocks live: a raw image file or memory.

Both expose the same small surface the block commands use:
`read(offset, length)` returns a memoryview slice of an mmap (no copy: the transport sends it as is);
`write(offset, data)`; `sync()` makes every completed write durable; `unmap(offset, length)` deallocates
(reads return zeros afterwards); `mapped(offset)` tells GET LBA STATUS whether a range holds data; `resize`.

FileBackstore: the image is opened once, mmap'd shared with MAP_POPULATE (prefaulted, so the first READs
do not fault page by page), read through the mapping and written with os.pwrite (the page cache is one, so
the mapping sees the write at once). Durability is fdatasync: on SYNCHRONIZE CACHE, on an FUA write, and
after every write when `write_through` is set. New images are preallocated with posix_fallocate (no
ENOSPC in the middle of an OS install) unless `sparse`, which only sets the size. UNMAP punches holes
(fallocate PUNCH_HOLE|KEEP_SIZE) where the file system can, else writes zeros.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading

from shared.failures import Failure

ZERO_CHUNK = 1 << 20
POPULATE_LIMIT = 1 << 30  # prefault mappings up to this size; larger ones fault in as they are read
_ZEROS = bytes(ZERO_CHUNK)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None
_fallocate = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc: UNMAP writes zeros instead
    _fallocate = None

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite until all of `data` is written (pwrite may stop short: signals, large writes)."""
    n = os.pwrite(fd, data, offset)
    while n < len(data):
        n += os.pwrite(fd, memoryview(data)[n:], offset + n)


def file_mapped(fd: int, offset: int, size: int) -> tuple[bool, int]:
    """A file's `mapped(offset)` from SEEK_DATA/SEEK_HOLE: (holds data, bytes from offset with the same
    answer), never past `size`."""
    try:
        data = os.lseek(fd, offset, SEEK_DATA)
    except OSError:  # ENXIO: only a hole from here to the end
        return False, size - offset
    if data > offset:
        return False, min(data, size) - offset
    try:
        hole = os.lseek(fd, offset, SEEK_HOLE)
    except OSError:
        hole = size
    return True, min(hole, size) - offset


def close_mapping(view: memoryview, map_: mmap.mmap) -> None:
    """Release a mapping's view and close it; one a read's slice still holds (being sent) the GC closes later."""
    view.release()
    try:
        map_.close()
    except BufferError:
        pass


class BackstoreError(Failure):  # its message is the sentence `bootfleet status` shows (shared/failures.py)
    """The backing store cannot be opened or used as configured (the message names the path and why)."""


class Backstore:
    """Common part: size bookkeeping and the durability flags."""

    block_size: int
    size: int
    readonly: bool = False
    write_through: bool = False
    thin: bool = False  # deallocating really frees space (GET LBA STATUS can report unmapped ranges)

    def __init__(self, size: int, block_size: int):
        if block_size not in (512, 4096):
            raise BackstoreError(f"block_size {block_size} is not 512 or 4096")
        if size <= 0 or size % block_size:
            raise BackstoreError(f"size {size} is not a positive multiple of block_size {block_size}")
        self.block_size = block_size
        self.size = size
        self.resize_listeners: list = []  # called with the new size after a resize (capacity-changed UA)

    @property
    def blocks(self) -> int:
        return self.size // self.block_size

    @property
    def waits_on_disk(self) -> bool:
        """Whether SYNCHRONIZE CACHE or an FUA write waits for the disk (an fdatasync): a connection to such a
        LUN keeps a thread of its own, so that its flushes never stall the shared loop (io_loop.py)."""
        return not self.readonly

    def _notify_resize(self) -> None:
        for listener in list(self.resize_listeners):
            listener(self.size)

    def write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            self.write(offset, memoryview(_ZEROS)[:n])
            offset += n


class RamBackstore(Backstore):
    """Blocks in anonymous shared memory; lost when the process ends. Pages are allocated on first write."""

    def __init__(self, size: int, block_size: int = 512):
        super().__init__(size, block_size)
        self.map = mmap.mmap(-1, size)
        self.view = memoryview(self.map)
        self.thin = False

    def read(self, offset: int, length: int):
        return self.view[offset:offset + length]

    def write(self, offset: int, data) -> None:
        self.view[offset:offset + len(data)] = data

    waits_on_disk = False  # memory: nothing to wait for

    def sync(self) -> None:
        """Memory is as durable as it gets."""

    def unmap(self, offset: int, length: int) -> None:
        self.write_zeros(offset, length)

    def mapped(self, offset: int) -> tuple[bool, int]:
        """(holds data, bytes from offset with the same answer)."""
        return True, self.size - offset

    def resize(self, size: int) -> None:
        if size <= 0 or size % self.block_size:
            raise BackstoreError(f"size {size} is not a positive multiple of block_size {self.block_size}")
        new = mmap.mmap(-1, size)
        keep = min(size, self.size)
        new[:keep] = self.view[:keep]
        self.map, self.view, self.size = new, memoryview(new), size  # old views stay valid until released
        self._notify_resize()

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # a read's slice is still being sent; the GC closes it later
            pass


class FileBackstore(Backstore):
    """A raw image file, mmap'd for reads and written with pwrite."""

    def __init__(self, path, size: int | None = None, block_size: int = 512, readonly: bool = False,
                 sparse: bool = False, create: bool = True, write_through: bool = False):
        self.path = os.fspath(path)
        self.readonly = readonly
        self.write_through = write_through
        self.sparse = sparse
        exists = os.path.exists(self.path)
        if not exists and (not create or readonly):
            raise BackstoreError(f"{self.path}: image does not exist (and create is off or it is read-only)")
        if not exists and not size:
            raise BackstoreError(f"{self.path}: image does not exist and no size is given to create it")
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        try:
            self.fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise BackstoreError(f"{self.path}: cannot open image: {exc.strerror}") from exc
        try:
            current = os.fstat(self.fd).st_size
            if size is None:
                size = current - current % block_size
                if size <= 0:
                    raise BackstoreError(f"{self.path}: image is smaller than one {block_size}-byte block")
            super().__init__(size, block_size)
            if current < size:
                if readonly:
                    raise BackstoreError(f"{self.path}: read-only image is {current} bytes, smaller than size {size}")
                self._grow(current, size)
            self.thin = _fallocate is not None
            self._map()
        except BaseException:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()  # resize against itself

    def _grow(self, current: int, size: int) -> None:
        try:
            if self.sparse:
                os.ftruncate(self.fd, size)
            else:
                os.posix_fallocate(self.fd, current, size - current)
        except OSError as exc:
            raise BackstoreError(f"{self.path}: cannot extend image to {size} bytes: {exc.strerror}") from exc

    def _map(self) -> None:
        prot = mmap.PROT_READ if self.readonly else mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED
        if self.size <= POPULATE_LIMIT:  # a bigger image would be read whole at start-up
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        self.map = mmap.mmap(self.fd, self.size, flags=flags, prot=prot)
        self.view = memoryview(self.map)

    def read(self, offset: int, length: int):
        return self.view[offset:offset + length]

    def write(self, offset: int, data) -> None:
        pwrite_all(self.fd, data, offset)
        if self.write_through:
            os.fdatasync(self.fd)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def unmap(self, offset: int, length: int) -> None:
        if _fallocate is not None:
            if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                if self.write_through:
                    os.fdatasync(self.fd)
                return
            self.thin = False  # this file system cannot punch holes
        self.write_zeros(offset, length)

    def mapped(self, offset: int) -> tuple[bool, int]:
        """(holds data, bytes from offset with the same answer), from SEEK_DATA/SEEK_HOLE."""
        return file_mapped(self.fd, offset, self.size)

    def resize(self, size: int) -> None:
        if size <= 0 or size % self.block_size:
            raise BackstoreError(f"size {size} is not a positive multiple of block_size {self.block_size}")
        if self.readonly:
            raise BackstoreError(f"{self.path}: a read-only image cannot be resized")
        with self._lock:
            current = os.fstat(self.fd).st_size
            if size > current:
                self._grow(current, size)
            else:
                os.ftruncate(self.fd, size)
            self._remap(size)
        self._notify_resize()

    def _remap(self, size: int) -> None:
        """The mapping at the new size (under the resize lock)."""
        old = self.map
        self.size = size
        self._map()
        try:
            old.close()
        except BufferError:  # a read's slice is still being sent; the GC closes it later
            pass

    def close(self) -> None:
        close_mapping(self.view, self.map)
        os.close(self.fd)
