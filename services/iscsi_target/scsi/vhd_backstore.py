"""VHD (fixed, dynamic, differencing; read and write) and VHDX (read-only) files served as a LUN's blocks.

The same surface as FileBackstore: read(offset, length) -> memoryview/bytes, write, sync, unmap, mapped,
resize (refused: a VHD's BAT has a fixed size), close. Offsets and lengths are whole 512-byte sectors (the
block commands only ask for whole logical blocks).

Checked at open, each failure a BackstoreError naming the file and the field: the footer's cookie,
checksum, version, disk type and size; the dynamic header's cookie, checksum, version, block size and
table offset; every BAT entry (inside the file, over no metadata and no other block, within the disk);
for a differencing disk, the parent (found through its locators, relative first), its UUID against the
header's parent_uuid and its size, recursively down the chain.

Allocating writes (theory of operation). The on-disk order that survives a crash at any point is: the
block's data, then its sector bitmap, then the footer moved to the new end of the file, then the BAT
entry that points at the block. Until the BAT entry is durable the block is unreferenced: a crash leaves
an orphan that the next allocation reuses (the free offset is computed from the BAT, not the file size),
and while the data overwrote the old footer and the new footer is not yet written, the file is opened
from the footer copy at offset 0. A sector bitmap bit is written only after the sector's data is durable.

Durability is batched as a disk with a volatile write cache (and dm-thin) does it: write() puts the data
in place with pwrite at once and records the new bitmap bits and BAT entries in memory (reads see them at
once); sync() (SYNCHRONIZE CACHE, FUA, write-through) commits: fdatasync (data), the dirty bitmaps and the
moved footer, fdatasync, the BAT sectors with new entries, fdatasync. A flush is acknowledged only after
that. An overwrite of sectors already present needs no metadata, so sync() is one fdatasync then. A
commit also runs when more than COMMIT_LIMIT blocks wait, so memory stays bounded without a flush.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from array import array

from services.iscsi_target.scsi import vhd as V
from services.iscsi_target.scsi import vhdx as X
from services.iscsi_target.scsi.backstore import POPULATE_LIMIT, Backstore, BackstoreError
from services.iscsi_target.scsi import backstore as _bs

COMMIT_LIMIT = 4096       # blocks with bitmaps not yet on disk (new ones included) before a write commits itself
REMAP_STEP = 64 << 20     # reads past the mapping use pread until the file grew this much past it
BITMAP_CACHE = 65536      # clean bitmaps kept in memory (512 bytes each at 2 MiB blocks) before trimming
MAX_CHAIN = 32            # differencing depth: deeper is taken as a loop of parents
_ZEROS = bytes(1 << 20)
_ZERO_VIEW = memoryview(_ZEROS)


def _zeros(n: int):
    return _ZERO_VIEW[:n] if n <= len(_ZEROS) else bytes(n)


def _pwrite_all(fd: int, data, offset: int) -> None:
    n = os.pwrite(fd, data, offset)
    while n < len(data):  # pwrite may stop short (signals, large writes)
        n += os.pwrite(fd, memoryview(data)[n:], offset + n)


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _punch(fd: int, offset: int, length: int) -> bool:
    f = _bs._fallocate
    return f is not None and f(fd, _bs._FALLOC_FL_PUNCH_HOLE | _bs._FALLOC_FL_KEEP_SIZE, offset, length) == 0


def open_image(path, block_size: int = 512, readonly: bool = False, write_through: bool = False) -> Backstore:
    """A VHD or a VHDX, told apart by the VHDX file identifier at offset 0. A VHDX is served read-only."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as exc:
        raise BackstoreError(f"{path}: cannot open image: {exc.strerror}") from exc
    if magic == X.SIGNATURE:
        from services.iscsi_target.scsi.vhdx_backstore import VhdxBackstore  # it uses this module's helpers

        return VhdxBackstore(path, block_size=block_size)
    return VhdBackstore(path, block_size=block_size, readonly=readonly, write_through=write_through)


class VhdBackstore(Backstore):
    """A fixed, dynamic or differencing VHD file."""

    def __init__(self, path, block_size: int = 512, readonly: bool = False, write_through: bool = False,
                 _depth: int = 0):
        self.path = os.fspath(path)
        self.readonly = readonly
        self.write_through = write_through
        self.parent: VhdBackstore | None = None
        self.fd = -1
        try:
            self.fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise BackstoreError(f"{self.path}: cannot open VHD: {exc.strerror}") from exc
        try:
            # one writer and no reader, or readers only: a base written while a child reads it through its
            # parent link corrupts the child, and two writers (two LUNs, or two target processes) would
            # allocate the same free offset
            fcntl.flock(self.fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            raise BackstoreError(f"{self.path}: in use by another LUN or process ({'written' if readonly else 'open'} "
                                 "there); a VHD is written by one LUN only, and a parent is never written") from exc
        try:
            self._open(block_size, _depth)
        except V.VhdFormatError as exc:
            self._close_quietly()
            raise BackstoreError(f"{self.path}: {exc}") from exc
        except BaseException:
            self._close_quietly()
            raise

    # ------------------------------------------------------------------------------------------ opening
    def _open(self, block_size: int, depth: int) -> None:
        fd = self.fd
        file_size = os.fstat(fd).st_size
        if file_size < V.SECTOR:
            raise V.VhdFormatError("footer", f"the file is {file_size} bytes, smaller than a footer")
        torn = False
        try:
            footer = V.parse_footer(_pread_exact(fd, V.SECTOR, file_size - V.SECTOR))
        except V.VhdFormatError as exc:
            # an allocation interrupted after its data replaced the footer and before the footer moved:
            # dynamic and differencing disks keep a copy at offset 0 for exactly this
            if exc.field != "footer cookie":
                raise
            try:
                footer = V.parse_footer(_pread_exact(fd, V.SECTOR, 0))
            except V.VhdFormatError:
                raise exc from None
            if footer.disk_type == V.FIXED:
                raise exc from None
            torn = True
        self.footer = footer
        self.disk_type = footer.disk_type
        self.kind = V.DISK_TYPES[footer.disk_type]
        self.thin = footer.disk_type != V.FIXED
        try:
            super().__init__(footer.current_size, block_size)
        except BackstoreError as exc:
            raise V.VhdFormatError("footer current_size", str(exc)) from None
        self._lock = threading.Lock()
        if footer.disk_type == V.FIXED:
            if footer.current_size > file_size - V.SECTOR:
                raise V.VhdFormatError("footer current_size", f"{footer.current_size} is more than the "
                                                              f"{file_size - V.SECTOR} data bytes in the file")
            self._map(file_size)
            self._direct_shift, self._direct = 62, array("q", [0])  # one "block": the disk, at offset 0
            return
        data_end = file_size if torn else file_size - V.SECTOR
        if footer.data_offset + V.HEADER_SIZE > data_end:
            raise V.VhdFormatError("footer data_offset", f"{footer.data_offset:#x}: the dynamic header would "
                                                         f"end past the data's end {data_end:#x}")
        header = V.parse_dynamic_header(_pread_exact(fd, V.HEADER_SIZE, footer.data_offset))
        self.header = header
        entries = header.max_table_entries
        bat_len = V.bat_bytes(entries)
        if header.table_offset + entries * 4 > data_end:
            raise V.VhdFormatError("dynamic header table_offset", f"the BAT at {header.table_offset:#x} "
                                   f"({entries} entries) would end past the data's end {data_end:#x}")
        self.bat = V.parse_bat(_pread_exact(fd, entries * 4, header.table_offset), entries)
        reserved = [(0, V.SECTOR), (footer.data_offset, footer.data_offset + V.HEADER_SIZE),
                    (header.table_offset, header.table_offset + bat_len)]
        for loc in header.locators:
            if loc.data_length:
                reserved.append((loc.data_offset, loc.data_offset + -(-loc.data_length // V.SECTOR) * V.SECTOR))
        self.block = header.block_size
        self.shift = self.block.bit_length() - 1
        self.bm_size = V.bitmap_size(self.block)
        self.span = self.bm_size + self.block
        self.free = V.check_bat(self.bat, self.size, self.block, reserved, data_end)
        self.bitmaps: dict[int, bytearray] = {}
        # where the data of each block whose sectors are all present lies in the file (-1: not known so):
        # such a block's reads are slices of the mapping with no bitmap to look at. Bits are only ever set,
        # so an entry once set stays true; set when a bitmap is loaded or a write fills it.
        self._direct_shift, self._direct = self.shift, array("q", [-1]) * len(self.bat)
        self.dirty: set[int] = set()        # blocks whose bitmap in memory is newer than on disk
        self.new_blocks: set[int] = set()   # blocks whose BAT entry is not yet on disk
        self.footer_moved = False           # the footer must be written at self.free
        if footer.disk_type == V.DIFFERENCING:
            self._open_parent(header, depth)
        if torn and not self.readonly:
            # restore "the footer ends the file, right after the last block" before serving writes
            _pwrite_all(fd, footer.pack(), self.free)
            os.ftruncate(fd, self.free + V.SECTOR)
            os.fdatasync(fd)
            file_size = self.free + V.SECTOR
        self.file_end = file_size  # kept up to date by our own writes (no fstat on the write path)
        self._map(file_size)

    def _open_parent(self, header, depth: int) -> None:
        if depth >= MAX_CHAIN:
            raise V.VhdFormatError("parent locator", f"the parent chain is deeper than {MAX_CHAIN} (a loop?)")
        tried = []
        for candidate in self._parent_candidates(header):
            tried.append(candidate)
            if os.path.isfile(candidate):
                break
        else:
            raise V.VhdFormatError("parent locator", "parent not found; tried " + (", ".join(tried) or "nothing "
                                   "(no W2ru, W2ku or MacX locator and no parent name)"))
        parent = VhdBackstore(candidate, readonly=True, _depth=depth + 1)
        if parent.footer.uuid != header.parent_uuid:
            parent.close()
            raise V.VhdFormatError("dynamic header parent_uuid", f"{header.parent_uuid.hex()} but the parent "
                                   f"{candidate} has UUID {parent.footer.uuid.hex()}")
        if parent.size != self.size:
            parent.close()
            raise V.VhdFormatError("footer current_size", f"{self.size} but the parent {candidate} is "
                                                          f"{parent.size} bytes")
        self.parent = parent
        self.parent_path = candidate

    def _parent_candidates(self, header):
        here = os.path.dirname(os.path.abspath(self.path))
        size = os.fstat(self.fd).st_size
        for code in V.LOCATOR_ORDER:
            for loc in header.locators:
                if loc.code != code or not loc.data_length:
                    continue
                if loc.data_offset + loc.data_length > size or loc.data_length > 65536:
                    raise V.VhdFormatError(f"parent locator {code.decode()}", f"data at {loc.data_offset:#x} "
                                           f"({loc.data_length} bytes) is outside the file")
                text = V.decode_locator(code, _pread_exact(self.fd, loc.data_length, loc.data_offset))
                if not text:
                    continue
                path = V.posix_path(text) if code != V.MACX else text
                yield os.path.normpath(os.path.join(here, path)) if code == V.W2RU else path
        if header.parent_name:
            yield os.path.join(here, V.posix_path(header.parent_name).rsplit("/", 1)[-1])

    def _map(self, length: int) -> None:
        prot = mmap.PROT_READ if self.readonly else mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED
        if length <= POPULATE_LIMIT:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        self.map = mmap.mmap(self.fd, length, flags=flags, prot=prot)
        self.view = memoryview(self.map)

    # ------------------------------------------------------------------------------------------ reading
    def read(self, offset: int, length: int):
        """The hot path, as short as a raw LUN's: a read inside one block whose sectors are all present (or
        any read of a fixed disk) is one table lookup and a slice of the mapping."""
        shift = self._direct_shift
        index = offset >> shift
        at = self._direct[index]
        if at >= 0 and (offset + length - 1) >> shift == index and not (offset | length) & (V.SECTOR - 1):
            at += offset & ((1 << shift) - 1)
            view = self.view
            if at + length <= len(view):
                return view[at:at + length]
        return self._read(offset, length)

    def _read(self, offset: int, length: int):
        if self.disk_type == V.FIXED:
            return self.view[offset:offset + length]
        if (offset | length) & (V.SECTOR - 1):
            raise BackstoreError(f"{self.path}: read of {length} bytes at {offset} is not in whole sectors")
        mask = self.block - 1
        inner = offset & mask
        if inner + length <= self.block:  # the common case: one block
            return self._read_block(offset >> self.shift, inner, length, offset)
        out = bytearray(length)
        done = 0
        while done < length:
            inner = (offset + done) & mask
            k = min(length - done, self.block - inner)
            out[done:done + k] = self._read_block((offset + done) >> self.shift, inner, k, offset + done)
            done += k
        return memoryview(out)

    def _read_block(self, index: int, inner: int, k: int, offset: int):
        sector = self.bat[index]
        if sector == V.UNUSED:
            return self.parent.read(offset, k) if self.parent else _zeros(k)
        bm = self.bitmaps.get(index)
        if bm is None:
            bm = self._load_bitmap(index)
        first, end = inner >> 9, (inner + k) >> 9
        state = V.bits_state(bm, first, end)
        base = sector * V.SECTOR + self.bm_size
        if state == 1:
            return self._file_view(base + inner, k)
        if state == 0:
            return self.parent.read(offset, k) if self.parent else _zeros(k)
        out = bytearray(k)
        for present, a, b in V.bit_runs(bm, first, end):
            at, n = (a - first) << 9, (b - a) << 9
            if present:
                out[at:at + n] = self._file_view(base + (a << 9), n)
            elif self.parent:
                out[at:at + n] = self.parent.read(offset + at, n)
        return memoryview(out)

    def _file_view(self, at: int, n: int):
        view = self.view
        if at + n <= len(view):
            return view[at:at + n]
        # a block allocated since the file was mapped
        size = os.fstat(self.fd).st_size
        if size - len(view) >= REMAP_STEP:
            self._remap(size)
            return self.view[at:at + n]
        return _pread_exact(self.fd, n, at)

    def _remap(self, size: int) -> None:
        prot = mmap.PROT_READ if self.readonly else mmap.PROT_READ | mmap.PROT_WRITE
        new = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=prot)
        self.map, self.view = new, memoryview(new)  # the old map closes when the last read's slice is sent

    def _load_bitmap(self, index: int) -> bytearray:
        """A committed block's bitmap, from the file (readers and the writer may race here: setdefault makes
        them share one object; a new block's bitmap is put in the cache before its BAT entry is set)."""
        loaded = bytearray(_pread_exact(self.fd, self.bm_size, self.bat[index] * V.SECTOR))
        bm = self.bitmaps.setdefault(index, loaded)
        self._note_full(index, bm)
        return bm

    def _note_full(self, index: int, bm) -> None:
        sectors = self.block >> 9
        # the first and last bytes first: a block being filled fails there, at no cost to its writes
        if bm[0] == bm[(sectors - 1) >> 3] == 0xFF and V.bits_state(bm, 0, sectors) == 1:
            self._direct[index] = self.bat[index] * V.SECTOR + self.bm_size

    def _trim_bitmaps(self) -> None:
        """Drop clean cached bitmaps (under the write lock: a writer's bitmap is never dropped under it)."""
        if len(self.bitmaps) >= BITMAP_CACHE:
            for key in [k for k in self.bitmaps if k not in self.dirty]:
                del self.bitmaps[key]

    # ------------------------------------------------------------------------------------------ writing
    def write(self, offset: int, data) -> None:
        if self.readonly:
            raise BackstoreError(f"{self.path}: read-only")
        if self.disk_type == V.FIXED:
            _pwrite_all(self.fd, data, offset)
            if self.write_through:
                os.fdatasync(self.fd)
            return
        data = memoryview(data).cast("B")
        length = len(data)
        if (offset | length) & (V.SECTOR - 1):  # a bitmap bit covers a whole sector
            raise BackstoreError(f"{self.path}: write of {length} bytes at {offset} is not in whole sectors")
        mask = self.block - 1
        with self._lock:
            self._trim_bitmaps()
            done = 0
            while done < length:
                at = offset + done
                index, inner = at >> self.shift, at & mask
                k = min(length - done, self.block - inner)
                sector = self.bat[index]
                if sector == V.UNUSED:
                    sector = self._allocate(index)
                at = sector * V.SECTOR + self.bm_size + inner
                _pwrite_all(self.fd, data[done:done + k], at)
                if at + k > self.file_end:
                    self.file_end = at + k
                bm = self.bitmaps.get(index)
                if bm is None:
                    bm = self._load_bitmap(index)
                first, end = inner >> 9, (inner + k) >> 9
                if V.bits_state(bm, first, end) != 1:
                    V.set_bits(bm, first, end)  # in memory now; on disk only after the data (commit)
                    self.dirty.add(index)
                    self._note_full(index, bm)  # after its data is in place: readers may slice it now
                done += k
            if self.write_through or len(self.dirty) > COMMIT_LIMIT:  # new blocks are dirty too
                self._commit()

    def _allocate(self, index: int) -> int:
        """Place block `index` at the free offset, in memory only: its BAT entry is written by the commit."""
        start = self.free
        if start + self.span + V.SECTOR > (1 << 32) * V.SECTOR:
            raise OSError(errno.EFBIG, "the VHD cannot address a block past 2 TiB")
        data_at = start + self.bm_size
        if self.file_end > data_at:
            # an orphan of an interrupted allocation: its data must read as zeros to readers that ignore the
            # bitmap (qemu). (The old footer lies where the bitmap goes, which the commit writes whole.)
            n = min(self.block, self.file_end - data_at)
            if not _punch(self.fd, data_at, n):
                _pwrite_all(self.fd, _zeros(n) if n <= len(_ZEROS) else bytes(n), data_at)
        sector = start // V.SECTOR
        self.bitmaps[index] = bytearray(self.bm_size)  # before the BAT entry: a reader must not load it
        self.new_blocks.add(index)
        self.dirty.add(index)
        self.bat[index] = sector
        self.free = start + self.span
        self.footer_moved = True
        return sector

    def _commit(self) -> None:
        """Make every completed write durable, in the crash-safe order (see the module docstring)."""
        fd = self.fd
        os.fdatasync(fd)  # 1. the data
        if not self.dirty and not self.footer_moved:
            return
        for index in sorted(self.dirty):  # 2. the bitmaps of that data
            _pwrite_all(fd, self.bitmaps[index], self.bat[index] * V.SECTOR)
        if self.footer_moved:  # 3. the footer at the new end
            _pwrite_all(fd, self.footer.pack(), self.free)
            if self.file_end > self.free + V.SECTOR:
                os.ftruncate(fd, self.free + V.SECTOR)
            self.file_end = self.free + V.SECTOR
        if self.new_blocks:
            os.fdatasync(fd)  # bitmaps and footer before the entries that point at them
            table = self.header.table_offset
            per = V.SECTOR // 4
            for s in sorted({i // per for i in self.new_blocks}):  # 4. the BAT sectors with new entries
                first = s * per
                count = min(per, len(self.bat) - first)
                _pwrite_all(fd, V.pack_bat(self.bat, first, count), table + first * 4)
        os.fdatasync(fd)
        self.dirty.clear()
        self.new_blocks.clear()
        self.footer_moved = False

    def sync(self) -> None:
        if self.disk_type == V.FIXED or self.readonly:
            if not self.readonly:
                os.fdatasync(self.fd)
            return
        with self._lock:
            self._commit()

    def unmap(self, offset: int, length: int) -> None:
        if self.readonly:
            raise BackstoreError(f"{self.path}: read-only")
        if self.disk_type == V.FIXED:
            if not _punch(self.fd, offset, length):
                self.write_zeros(offset, length)
            elif self.write_through:
                os.fdatasync(self.fd)
            return
        if self.disk_type == V.DIFFERENCING:
            self.write_zeros(offset, length)  # the parent's data must stop showing: zeros are data here
            return
        mask = self.block - 1
        with self._lock:
            done = 0
            while done < length:
                at = offset + done
                index, inner = at >> self.shift, at & mask
                k = min(length - done, self.block - inner)
                sector = self.bat[index]
                if sector != V.UNUSED:  # bits stay set: the sectors read as the hole's zeros
                    where = sector * V.SECTOR + self.bm_size + inner
                    if not _punch(self.fd, where, k):
                        _pwrite_all(self.fd, _zeros(k) if k <= len(_ZEROS) else bytes(k), where)
                done += k
            if self.write_through:
                self._commit()

    def mapped(self, offset: int) -> tuple[bool, int]:
        """(holds data, bytes from offset with the same answer): by block, through the parents."""
        if self.disk_type == V.FIXED:
            return True, self.size - offset
        index = offset >> self.shift
        block_end = min((index + 1) << self.shift, self.size)
        if self.bat[index] != V.UNUSED:
            answer = True
        elif self.parent is not None:
            answer, run = self.parent.mapped(offset)
            return answer, min(run, block_end - offset)
        else:
            answer = False
        last = -(-self.size // self.block)
        i = index + 1
        while i < last and (self.bat[i] != V.UNUSED) == answer and (answer or self.parent is None):
            i += 1
        return answer, min(i << self.shift, self.size) - offset

    def resize(self, size: int) -> None:
        raise BackstoreError(f"{self.path}: a VHD is not resized while served (its BAT and footer fix the size); "
                             "resize it offline")

    def _close_quietly(self) -> None:
        if self.parent is not None:
            self.parent.close()
            self.parent = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        try:
            if not self.readonly and self.disk_type != V.FIXED:
                with self._lock:
                    self._commit()
        finally:
            self.view.release()
            try:
                self.map.close()
            except BufferError:  # a read's slice is still being sent; the GC closes it later
                pass
            self._close_quietly()


# ---------------------------------------------------------------------------------------------- VHDX
def _write_new(path: str, head: bytes, footer: bytes, footer_at: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        _pwrite_all(fd, head, 0)
        _pwrite_all(fd, footer, footer_at)
        os.fsync(fd)
    finally:
        os.close(fd)


def create_fixed(path, size: int) -> None:
    """A fixed VHD of `size` zero bytes (sparse on the host)."""
    path = os.fspath(path)
    _write_new(path, b"", V.fixed_footer(size), size)


def create_dynamic(path, size: int, block_size: int = V.DEFAULT_BLOCK_SIZE) -> None:
    layout = V.dynamic_layout(size, block_size)
    _write_new(os.fspath(path), layout.head, layout.footer, layout.footer_at)


def create_differencing(path, parent_path, block_size: int | None = None) -> None:
    """A differencing VHD over `parent_path`, with a relative (W2ru) and an absolute (W2ku) locator."""
    path, parent_path = os.fspath(path), os.fspath(parent_path)
    parent = VhdBackstore(parent_path, readonly=True)
    try:
        footer = parent.footer
        if block_size is None:
            block_size = parent.block if parent.disk_type != V.FIXED else V.DEFAULT_BLOCK_SIZE
    finally:
        parent.close()
    absolute = os.path.abspath(parent_path)
    relative = os.path.relpath(absolute, os.path.dirname(os.path.abspath(path)))
    if not relative.startswith("."):
        relative = os.path.join(".", relative)
    locators = ((V.W2RU, V.windows_path(relative).encode("utf-16-le")),
                (V.W2KU, absolute.encode("utf-16-le")))
    layout = V.dynamic_layout(footer.current_size, block_size, parent=footer, parent_name=absolute,
                              parent_locators=locators)
    _write_new(path, layout.head, layout.footer, layout.footer_at)
