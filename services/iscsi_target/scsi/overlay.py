"""A PC's disk: a read-only image version (the base) plus the PC's own copy-on-write overlay.

Same surface as FileBackstore (read, write, sync, unmap, mapped, resize, close; block_size, size, readonly,
thin, write_through), so a LogicalUnit serves it unchanged.

Theory of operation
-------------------
The base is a published version file, mmap'd shared and read-only (BaseImage, in base_image.py; one
mapping per version per process through `open_base`, and one page-cache copy for every process: 20 PCs on
one version read the same pages). The overlay is a sparse file the size of the disk, a granule's data at the disk's own offset,
plus a bitmap of one bit per granule (the format, and why a crash is harmless, in
shared/images/overlay_format.py). Three bitmaps live in memory:

- `owned` (persisted): the overlay holds the granule; reads come from the overlay file (a hole there reads
  as zeros: an UNMAPped granule). Bits only go 0 -> 1.
- `alloc`: the granule holds data in the overlay file; what the quota counts (granules x granule size).
  Rebuilt at open from SEEK_DATA/SEEK_HOLE.
- dirty bitmap pages: what the next sync() writes back.

READ: one bit test (or one int of bits for a multi-granule read). All base: a slice of the base's mmap, no
copy; all overlay: a slice of the overlay file's mmap, no copy; mixed: `readv` gives the pieces and `read`
joins them (the only copy, and only for reads that straddle both layers).

WRITE: into granules the overlay owns and has allocated, one pwrite and nothing else (no lock). Otherwise,
under the stripe locks of the granules touched: reserve quota for granules not yet allocated (OverlayFull
before any byte is written), fill a partial head and tail granule that the overlay does not own from the
base (one pwritev of [base head, data, base tail]: the read-modify-write of a granule), then set the owned
bits. The stripe lock serialises a partial write against any other write to an unowned granule of its
stripe, so two partial writes to one granule cannot each merge the base over the other's bytes.

UNMAP (and WRITE SAME with UNMAP): whole granules are punched out of the overlay file, marked owned and
no longer allocated: they read as zeros, take no space, and the quota gets them back. So LBPRZ=1 is true:
an unmapped block reads zeros, not the base's data (falling back to the base would make the block's
content after UNMAP depend on the image below, which LBPRZ=1 forbids and libiscsi checks). A part of a
granule is zeroed: punched if the overlay owns the granule, else written as zeros (a read-modify-write,
which allocates and so can raise OverlayFull). GET LBA STATUS: owned and allocated = mapped; owned
and not allocated = deallocated; not owned = what the base says (a hole in the base reads zeros too).

Durability (`durable=True`, for `persistent` and `super`): sync() fdatasyncs the overlay data, then writes
the dirty bitmap pages and fdatasyncs the bitmap: data durable before the bit that points at it. Syncs
are serialised, so a sync never returns while an earlier one's bitmap is still in flight. With
`durable=False` (`discard`), sync() still writes the bitmap pages (into the page cache: a `kill -9` of the
target loses nothing, the reconnecting PC finds its writes) but never fsyncs: a power loss may lose the
overlay, which the next power-on discards anyway.

Granule: 4 KiB (GRANULE). NTFS and ext4 write 4 KiB clusters, so an OS's write is a whole granule (no
read of the base, no write amplification, the quota counts what was written); the bitmap is 32 KiB per GiB.
Measured (bench/overlay.py, docs/images.md "The granule"): 2048 scattered 4 KiB writes into a fresh overlay
allocated 8 MiB at 4 KiB and 128 MiB at 64 KiB (16x), and ran 1.4-3.6x slower at 64 KiB (each one reads and
writes 64 KiB); 64 KiB only catches up once the overlay holds nearly the whole disk.

One opener: the overlay flocks its bitmap while open, so a second Overlay on the same files (another
target process, or this one twice) is refused, and the image store refuses to publish or reset an open one.

Quota and space: `quota` bytes of allocated granules; crossing `soft_threshold` sets `threshold_crossed` and
calls `on_threshold(overlay)` once (re-armed when UNMAP brings the use back below); a write that would pass
the quota, or that `space_guard(nbytes)` refuses (the store's free-space reserve), raises OverlayFull before
writing anything. The reserve is claimed from the guard SPACE_CHUNK (1 MiB) at a time and spent granule by
granule (asking the guard for each 4 KiB granule was a sixth of a new granule's write); near the reserve, a
refused chunk is asked again for just what the write needs, so the reserve is held as before, late by at
most one unspent chunk per open overlay. ENOSPC from the file system despite the reserve also raises
OverlayFull, then possibly after part of the range was written (the command fails; its blocks are undefined,
as SBC allows). A WRITE and an UNMAP of the same granule in flight at once may leave the count one granule
off until the overlay is reopened (the data is right; initiators do not issue those together).

The soft threshold's unit attention is THIN PROVISIONING SOFT THRESHOLD REACHED, SOFT_THRESHOLD_ASC_ASCQ.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from pathlib import Path

from services.iscsi_target.scsi.backstore import Backstore, BackstoreError, close_mapping, pwrite_all
from services.iscsi_target.scsi.base_image import BaseImage, open_base, release_base, retain_base
from services.iscsi_target.scsi.overlay_errors import OverlayError, OverlayFull
from shared.atomic_file import fsync_dir
from shared.images import overlay_format as F

GRANULE = 4096
MAX_GRANULE = 64 * 1024
STRIPES = 64          # locks for writes into unowned granules
STRIPE_SHIFT = 4      # 16 consecutive granules share a stripe, so a 1 MiB write takes 16 locks, not 256
_PAGE_SHIFT = 15      # granules per bitmap page: 4096 bytes x 8 bits
SPACE_CHUNK = 1 << 20  # bytes of the store's reserve claimed from space_guard at a time
SOFT_THRESHOLD_ASC_ASCQ = (0x38, 0x07)  # UNIT ATTENTION: THIN PROVISIONING SOFT THRESHOLD REACHED

__all__ = ["Overlay", "BaseImage", "open_base", "release_base", "OverlayError", "OverlayFull", "GRANULE",
           "SOFT_THRESHOLD_ASC_ASCQ"]


_punch = F.punch_hole


# ---------------------------------------------------------------------------------------------- the overlay
class Overlay(Backstore):
    """A version plus a PC's copy-on-write layer. `path` is the data file (`<pc>.overlay`); the bitmap is
    beside it (`<pc>.bitmap`). Created when missing (if `create`); reopened as the bitmap on disk says."""

    readonly = False

    @property
    def waits_on_disk(self) -> bool:
        return self.durable  # discard never fsyncs: its PCs may share the loop

    def __init__(self, base, path, *, block_size: int = 512, granule: int = GRANULE, base_id: str = "",
                 durable: bool = True, write_through: bool = False, quota: int | None = None,
                 soft_threshold: int | None = None, on_threshold=None, space_guard=None, create: bool = True):
        if F._fallocate is None:
            raise OverlayError("overlays need fallocate(PUNCH_HOLE) (Linux, glibc)")
        if granule < 512 or granule > MAX_GRANULE or granule & (granule - 1):
            raise OverlayError(f"granule {granule} is not a power of two in 512..{MAX_GRANULE}")
        if isinstance(base, BaseImage):
            self.base = retain_base(base)
        else:
            self.base = open_base(base, block_size)
        try:
            super().__init__(self.base.size, block_size)
            self.path = os.fspath(path)
            self.bitmap_path = os.fspath(F.bitmap_path(path))
            self.durable = durable
            self.write_through = write_through
            self.thin = True
            self.quota = quota
            self.soft_threshold = soft_threshold
            self.on_threshold = on_threshold
            self.space_guard = space_guard
            self._space_credit = 0  # claimed from space_guard, not yet spent on granules
            self.threshold_crossed = False
            self._open(granule, base_id, create)
        except BaseException:
            release_base(self.base)
            raise
        self._base_view = self.base.view
        self._meta = threading.Lock()       # alloc and the counters (the owned bits: the stripe locks)
        self._sync_lock = threading.Lock()  # one sync at a time
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        if soft_threshold is not None and self.used >= soft_threshold:
            self.threshold_crossed = True

    # ------------------------------------------------------------------ open, create, recover
    def _open(self, granule: int, base_id: str, create: bool) -> None:
        if not os.path.exists(self.bitmap_path):
            if not create:
                raise OverlayError(f"{self.bitmap_path}: overlay does not exist (and create is off)")
            self._create(granule, base_id)
            return
        try:
            self._bm_fd = os.open(self.bitmap_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise OverlayError(f"{self.bitmap_path}: cannot open overlay bitmap: {exc.strerror}") from exc
        try:
            try:  # one opener at a time: one target process serves a PC's disk; the store resets only closed ones
                fcntl.flock(self._bm_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OverlayError(f"{self.bitmap_path}: overlay is open elsewhere (another target process, or "
                                   f"an image command such as publish, holds it)") from None
            try:  # locked, but is it still the file at that name (not reset or re-created meanwhile)?
                same = os.stat(self.bitmap_path).st_ino == os.fstat(self._bm_fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                raise OverlayError(f"{self.bitmap_path}: overlay was reset or re-created while being opened")
            header = F.read_header(self._bm_fd, self.bitmap_path)
            if header.size != self.size:
                raise OverlayError(f"{self.bitmap_path}: overlay is for a {header.size}-byte disk, "
                                   f"the base {self.base.path} is {self.size} bytes")
            if base_id and header.base_id != base_id:
                raise OverlayError(f"{self.bitmap_path}: overlay sits on {header.base_id!r}, not {base_id!r}")
            self._use_header(header, F.read_bits(self._bm_fd, header))
            self._open_data()
        except BaseException:
            os.close(self._bm_fd)
            raise

    def _use_header(self, header, bits: bytearray) -> None:
        self.header = header
        self.granule = header.granule
        self._shift = header.granule.bit_length() - 1
        self._granules = header.granules
        self._bits = bits
        # one flag per bitmap page: set after a bit is set, cleared by sync() before it copies the page
        self._dirty = bytearray(-(-len(bits) // F.PAGE))

    def _create(self, granule: int, base_id: str) -> None:
        """A new overlay, opened as it is made (a discard PC's every power-on makes one): the data file
        first, then the bitmap, locked before it is renamed into place, since its existence is the
        overlay's. Not durable (discard: thrown away at the next power-on): without the fsyncs, which took
        ~50 ms of each PC's login in a boot storm."""
        header = F.Header(granule, self.size, base_id)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.size)
            if self.durable:
                os.fsync(fd)
            bits = bytearray(header.bitmap_bytes)
            tmp = self.bitmap_path + ".tmp"
            bm = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(bm, fcntl.LOCK_EX | fcntl.LOCK_NB)
                pwrite_all(bm, header.pack() + bits, 0)
                if self.durable:
                    os.fsync(bm)
                os.replace(tmp, self.bitmap_path)
                if self.durable:
                    fsync_dir(os.path.dirname(self.bitmap_path))
                self._use_header(header, bits)
                self._map_data(fd, bytearray(len(bits)))
            except BaseException:
                os.close(bm)
                raise
        except BaseException:
            os.close(fd)
            raise
        self._bm_fd = bm

    def _open_data(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if any(self._bits):
                raise OverlayError(f"{self.path}: overlay data file is missing but its bitmap "
                                   f"{self.bitmap_path} names granules in it") from None
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)
            self._fd = fd
            alloc = self._recover()
            self._map_data(fd, alloc)
        except BaseException:
            os.close(fd)
            raise

    def _map_data(self, fd: int, alloc: bytearray) -> None:
        self._fd = fd
        self._alloc = alloc
        self.used = F.count(alloc, 0, self._granules) * self.granule
        self.map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self._view = memoryview(self.map)

    def _recover(self) -> bytearray:
        """The alloc bitmap from the data file's extents; data in granules the bitmap does not own is a
        write that never reached a sync: punched away (it is not the disk's content and would count)."""
        alloc = bytearray(len(self._bits))
        sh, bits = self._shift, self._bits
        for start, end in F.data_extents(self._fd, self.size):
            g, g1 = start >> sh, ((end - 1) >> sh) + 1
            while g < g1:
                run = F.run_end(bits, g, g1)
                if F.bit(bits, g):
                    F.set_range(alloc, g, run)
                else:
                    _punch(self._fd, max(start, g << sh), min(end, run << sh) - max(start, g << sh))
                g = run
        return alloc

    # ------------------------------------------------------------------ reads
    def read(self, offset: int, length: int):
        sh = self._shift
        g0 = offset >> sh
        last = (offset + length - 1) >> sh
        if g0 == last:  # the common case: one bit
            if (self._bits[g0 >> 3] >> (g0 & 7)) & 1:
                return self._view[offset:offset + length]
            return self._base_view[offset:offset + length]
        if length <= 0:
            return self._view[offset:offset]
        g1 = last + 1
        f = F.field(self._bits, g0, g1)
        if f == 0:
            return self._base_view[offset:offset + length]
        if f == (1 << (g1 - g0)) - 1:
            return self._view[offset:offset + length]
        return b"".join(self.readv(offset, length))  # both layers: the one copy

    def readv(self, offset: int, length: int) -> list:
        """The pieces of [offset, offset+length), each a slice of one layer's mapping (no copy)."""
        sh, bits = self._shift, self._bits
        end = offset + length
        pieces = []
        g, g1 = offset >> sh, ((end - 1) >> sh) + 1
        pos = offset
        while pos < end:
            run = F.run_end(bits, g, g1)
            stop = min(end, run << sh)
            pieces.append((self._view if F.bit(bits, g) else self._base_view)[pos:stop])
            pos, g = stop, run
        return pieces

    # ------------------------------------------------------------------ writes
    def write(self, offset: int, data) -> None:
        n = len(data)
        if not n:
            return
        sh = self._shift
        g0 = offset >> sh
        g1 = ((offset + n - 1) >> sh) + 1
        if g1 - g0 == 1:
            i, m = g0 >> 3, 1 << (g0 & 7)
            if self._bits[i] & self._alloc[i] & m:
                self._pwrite(data, offset)
            else:
                self._write_one(offset, data, g0, i, m)
        else:
            full = (1 << (g1 - g0)) - 1
            if F.field(self._bits, g0, g1) == full and F.field(self._alloc, g0, g1) == full:
                self._pwrite(data, offset)
            else:
                self._write_cow(offset, data, g0, g1)
        if self.write_through:
            self.sync()

    def _locks(self, g0: int, g1: int) -> list:
        s0, s1 = g0 >> STRIPE_SHIFT, ((g1 - 1) >> STRIPE_SHIFT) + 1
        if s1 - s0 == 1:
            return [self._stripes[s0 & (STRIPES - 1)]]
        if s1 - s0 >= STRIPES:
            return self._stripes
        return [self._stripes[i] for i in sorted({s & (STRIPES - 1) for s in range(s0, s1)})]

    def _write_one(self, offset: int, data, g: int, i: int, m: int) -> None:
        """_write_cow for a write within one granule (an OS's 4 KiB write), without its generality: the
        hot path of a PC's new data, so its steps are inline. The owned bit is set after the data is in the
        file: reads take no lock, and a bit set first would let one read the granule's hole as zeros."""
        with self._stripes[(g >> STRIPE_SHIFT) & (STRIPES - 1)]:
            if not self._alloc[i] & m:
                self._reserve(g, g + 1)
            if self._bits[i] & m:
                self._pwrite(data, offset)
                return
            start = g << self._shift
            stop = min(start + self.granule, self.size)
            end = offset + len(data)
            if offset == start and end == stop:
                try:
                    n = os.pwrite(self._fd, data, offset)
                except OSError as exc:
                    self._raise_write(exc, len(data))
                if n < len(data):
                    self._pwrite(memoryview(data)[n:], offset + n)
            else:  # a part: merged with the base's rest of the granule
                base = self._base_view
                self._pwritev([base[start:offset], data, base[end:stop]], start)
            self._bits[i] |= m
            self._dirty[g >> _PAGE_SHIFT] = 1

    def _write_cow(self, offset: int, data, g0: int, g1: int) -> None:
        locks = self._locks(g0, g1)
        for lock in locks:
            lock.acquire()
        try:
            self._reserve(g0, g1)
            sh, bits, base = self._shift, self._bits, self._base_view
            end = offset + len(data)
            pieces, start = [data], offset
            if offset & (self.granule - 1) and not F.bit(bits, g0):
                start = g0 << sh
                pieces.insert(0, base[start:offset])
            stop = min(g1 << sh, self.size)
            if end < stop and not F.bit(bits, g1 - 1):
                pieces.append(base[end:stop])
            self._pwritev(pieces, start)
            F.set_range(bits, g0, g1)  # under the stripe locks: a bitmap byte is 8 granules of one stripe
            for p in range(g0 >> _PAGE_SHIFT, ((g1 - 1) >> _PAGE_SHIFT) + 1):
                self._dirty[p] = 1
        finally:
            for lock in locks:
                lock.release()

    def _reserve(self, g0: int, g1: int) -> None:
        """Count the granules of [g0, g1) not yet allocated against the quota and the reserve."""
        crossed = False
        with self._meta:
            if g1 - g0 == 1:
                new = 0 if self._alloc[g0 >> 3] & (1 << (g0 & 7)) else 1
            else:
                new = (g1 - g0) - F.count(self._alloc, g0, g1)
            if not new:
                return
            need = new * self.granule
            if self.quota is not None and self.used + need > self.quota:
                raise OverlayFull(self.path, "quota", need, self.used, self.quota)
            if self.space_guard is not None:
                if self._space_credit < need:
                    self._claim_space(need)
                self._space_credit -= need
            if g1 - g0 == 1:
                self._alloc[g0 >> 3] |= 1 << (g0 & 7)
            else:
                F.set_range(self._alloc, g0, g1)
            self.used += need
            if self.soft_threshold is not None and not self.threshold_crossed and self.used >= self.soft_threshold:
                self.threshold_crossed = crossed = True
        if crossed and self.on_threshold is not None:
            self.on_threshold(self)

    def _claim_space(self, need: int) -> None:
        """More credit from the store's reserve (under _meta): a chunk, or near the reserve just `need`."""
        chunk = max(need, SPACE_CHUNK)
        if self.space_guard(chunk):
            self._space_credit += chunk
        elif chunk > need and self.space_guard(need):
            self._space_credit += need
        else:
            raise OverlayFull(self.path, "reserve", need, self.used, self.quota)

    def _pwrite(self, data, offset: int) -> None:
        try:
            pwrite_all(self._fd, data, offset)
        except OSError as exc:
            self._raise_write(exc, len(data))

    def _pwritev(self, pieces: list, offset: int) -> None:
        total = sum(len(p) for p in pieces)
        try:
            n = os.pwritev(self._fd, pieces, offset)
        except OSError as exc:
            self._raise_write(exc, total)
        if n < total:  # short: the rest in one buffer
            self._pwrite(memoryview(b"".join(pieces))[n:], offset + n)

    def _raise_write(self, exc: OSError, need: int):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OverlayFull(self.path, "enospc", need, self.used, self.quota) from exc
        raise exc

    # ------------------------------------------------------------------ thin provisioning
    def unmap(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        end = offset + length
        g_size, sh = self.granule, self._shift
        a = -(-offset // g_size)
        b = self._granules if end >= self.size else end >> sh
        if a >= b:  # no whole granule: one part, or two on either side of a granule boundary
            mid = a << sh
            if offset < mid < end:
                self._zero_part(offset, mid)
                self._zero_part(mid, end)
            else:
                self._zero_part(offset, end)
            return
        if offset < a << sh:
            self._zero_part(offset, a << sh)
        if b < self._granules and b << sh < end:
            self._zero_part(b << sh, end)
        locks = self._locks(a, b)
        for lock in locks:
            lock.acquire()
        try:
            _punch(self._fd, a << sh, min(b << sh, self.size) - (a << sh))
            F.set_range(self._bits, a, b)
            for p in range(a >> _PAGE_SHIFT, ((b - 1) >> _PAGE_SHIFT) + 1):
                self._dirty[p] = 1
            with self._meta:
                freed = F.count(self._alloc, a, b)
                F.clear_range(self._alloc, a, b)
                self.used -= freed * g_size
                if self.threshold_crossed and self.used < (self.soft_threshold or 0):
                    self.threshold_crossed = False  # re-armed: the next crossing reports again
        finally:
            for lock in locks:
                lock.release()
        if self.write_through:
            self.sync()

    def _zero_part(self, start: int, end: int) -> None:
        """Zero part of one granule: punched where the overlay owns it, written (copy-on-write) where not."""
        g = start >> self._shift
        if F.bit(self._bits, g):
            _punch(self._fd, start, end - start)
            if self.write_through:
                self.sync()
        else:
            self.write(start, bytes(end - start))

    def mapped(self, offset: int) -> tuple[bool, int]:
        """(holds data, bytes from offset with the same answer)."""
        sh = self._shift
        g = offset >> sh
        limit = min(self._granules, g + (1 << 20))
        end = F.run_end(self._bits, g, limit)
        if F.bit(self._bits, g):
            end = min(end, F.run_end(self._alloc, g, end))
            return bool(F.bit(self._alloc, g)), min(end << sh, self.size) - offset
        here, run = self.base.mapped(offset)
        return here, min(run, min(end << sh, self.size) - offset)

    # ------------------------------------------------------------------ durability, life cycle
    def sync(self) -> None:
        """Make every completed write durable (durable mode): data first, then the bitmap naming it."""
        with self._sync_lock:
            dirty, snap = self._dirty, []
            p = dirty.find(1)
            while p >= 0:
                dirty[p] = 0  # first: a bit set from now on sets the flag again for the next sync
                snap.append((p, bytes(self._bits[p << 12:(p + 1) << 12])))
                p = dirty.find(1, p + 1)
            try:
                if self.durable:
                    os.fdatasync(self._fd)
                for p, chunk in snap:
                    os.pwrite(self._bm_fd, chunk, F.HEADER_SIZE + (p << 12))
                if self.durable and snap:
                    os.fdatasync(self._bm_fd)
            except OSError:
                for p, _ in snap:
                    dirty[p] = 1
                raise

    def resize(self, size: int) -> None:
        raise BackstoreError(f"{self.path}: an overlay has its image version's size; it cannot be resized")

    @property
    def allocated(self) -> int:
        """Bytes the overlay file really takes on disk (st_blocks)."""
        return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        try:
            self.sync()
        finally:
            close_mapping(self._view, self.map)
            os.close(self._fd)
            os.close(self._bm_fd)
            release_base(self.base)
