"""A raw image file whose failing reads are OSErrors, never a SIGBUS: for mirror legs and ISO images.

FileBackstore reads are slices of a shared mapping: no copy, but a read that faults and fails (EIO, the
file truncated under us, a tmpfs with no page left to fault in) kills the process with SIGBUS. Where a
failing read must be survived — a mirror leg (the mirror drops it and serves from the other), an ISO an
administrator may overwrite in place — a read is a slice of the mapping only when mincore(2) said every
page of it is in the page cache (nothing to fault in, so nothing to fail); otherwise it is a pread, whose
error is an OSError (and after which the pages are cached). Read-only files (ISOs) always use pread.

mincore costs a system call (3 µs here, more than the whole read path of a file LUN), so it is asked once
for a 2 MiB region (5 µs) and a region found all resident is trusted for WARM_FOR (1 s): reads inside it
are slices with no system call, as a file LUN's. A region not all resident is not trusted; a read in it
checks its own pages (in the same call). UNMAP forgets the regions it punches.

What is left: a page dropped after the check (evicted under memory pressure, or the file truncated by
someone else) within that second, or while the transport's send waits on a slow initiator, is faulted
in by the kernel inside sendmsg, where a failure is an EFAULT for that connection rather than a signal;
only a data digest computed over such a page in user space would still meet the SIGBUS. After the second
the region is checked again and the failing read is a pread's OSError. Writes, sync, unmap and sizing
are FileBackstore's (pwrite; the page cache is one, so the mapping sees them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
import time
from array import array

from services.iscsi_target.scsi.backstore import POPULATE_LIMIT, FileBackstore, close_mapping

PAGE = mmap.PAGESIZE
try:
    _mincore = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).mincore
    _mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    _mincore.restype = ctypes.c_int
except (OSError, AttributeError):  # no mincore: every read is a pread
    _mincore = None
REGION_SHIFT = 21               # residency is asked and trusted for 2 MiB regions
WARM_FOR = 1.0                  # seconds a region found all resident is trusted without asking again
VEC_PAGES = (36 << 20) // PAGE  # mincore's answer for the regions of the largest transfer (32 MiB)
_VECS = threading.local()       # one answer buffer per connection thread
_monotonic = time.monotonic


def _new_vec():
    vec = bytearray(VEC_PAGES)
    _VECS.vec = vec, ctypes.addressof((ctypes.c_char * VEC_PAGES).from_buffer(vec))
    return _VECS.vec


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset`; a short read (the file shrank under us) is an EIO, not a short answer."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"short read: {got} of {length} bytes at offset {offset} (file truncated?)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class PreadFileBackstore(FileBackstore):
    """FileBackstore whose reads never fault: a slice of the mapping when it is all cached, else pread."""

    def _map(self) -> None:
        self.map = self.view = self._anchor = None
        if self.readonly or _mincore is None or not self.size:
            return
        flags = mmap.MAP_SHARED
        st = os.fstat(self.fd)
        if self.size <= POPULATE_LIMIT and st.st_blocks * 512 >= st.st_size:
            # prefaulted, as FileBackstore's (mincore then reads page tables, and a first send takes no
            # fault); only a file without holes: prefaulting a sparse file on tmpfs would allocate it whole
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        self.map = mmap.mmap(self.fd, self.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        self._anchor = ctypes.c_char.from_buffer(self.map)  # the mapping's address, for mincore
        self._base = ctypes.addressof(self._anchor)
        self._warm = array("d", bytes(8 * -(-self.size >> REGION_SHIFT)))  # until when each region is trusted

    def _unmap(self) -> None:
        if self.map is None:
            return
        self._anchor = None
        close_mapping(self.view, self.map)
        self.map = self.view = None

    def read(self, offset: int, length: int):
        view = self.view
        if view is not None and length and offset + length <= self.size:
            region = offset >> REGION_SHIFT
            if (offset + length - 1) >> REGION_SHIFT == region and self._warm[region] > _monotonic():
                return view[offset:offset + length]  # the hot path: as short as a file LUN's
            if self._resident(offset, length):
                return view[offset:offset + length]
        return pread_exact(self.fd, length, offset)

    def read_warm(self, offset: int, length: int):
        """A slice of the mapping when the read lies in a region trusted warm (no system call), else None:
        a mirror's first question to each leg."""
        view = self.view
        if view is not None and length and offset + length <= self.size:
            region = offset >> REGION_SHIFT
            if (offset + length - 1) >> REGION_SHIFT == region and self._warm[region] > _monotonic():
                return view[offset:offset + length]
        return None

    def cached(self, offset: int, length: int) -> bool:
        """Whether mincore says every page of the read is in the page cache now (its regions are then
        trusted): a mirror's second question, when neither leg's region was trusted."""
        return self.view is not None and 0 < length and offset + length <= self.size and \
            self._resident(offset, length)

    def _resident(self, offset: int, length: int) -> bool:
        """Whether every page of the read is cached, asking for its whole regions at once; the regions
        found all resident are trusted for WARM_FOR."""
        first, last = offset >> REGION_SHIFT, (offset + length - 1) >> REGION_SHIFT
        start = first << REGION_SHIFT
        span = min((last + 1) << REGION_SHIFT, self.size) - start
        pages = -(-span // PAGE)
        if pages > VEC_PAGES:
            return False
        vec, addr = _VECS.__dict__.get("vec") or _new_vec()
        if _mincore(self._base + start, span, addr):
            return False
        if vec.find(0, 0, pages) < 0:  # every page of the regions resident (bit 0 set)
            until = _monotonic() + WARM_FOR
            warm = self._warm
            for region in range(first, last + 1):
                warm[region] = until
            return True
        return vec.find(0, (offset - start) // PAGE, -(-(offset + length - start) // PAGE)) < 0

    def unmap(self, offset: int, length: int) -> None:
        """Punched pages are no longer cached: their regions are asked again (before the punch)."""
        if self.view is not None and length:
            warm = self._warm
            for region in range(offset >> REGION_SHIFT, ((offset + length - 1) >> REGION_SHIFT) + 1):
                warm[region] = 0.0
        super().unmap(offset, length)

    def _remap(self, size: int) -> None:
        self._unmap()
        self.size = size
        self._map()

    def gone(self) -> str | None:
        """Why the file can no longer be trusted to keep what is written (unlinked, replaced), or None."""
        try:
            st = os.fstat(self.fd)
        except OSError as exc:
            return exc.strerror
        if st.st_nlink == 0:
            return "the file was removed"
        try:
            now = os.stat(self.path)
        except OSError:
            return "the file was removed"
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return "the file was replaced by another"
        return None

    def close(self) -> None:
        self._unmap()
        os.close(self.fd)
