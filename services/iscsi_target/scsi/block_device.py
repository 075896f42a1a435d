"""A block device or partition (/dev/...) as a backing store.

Size from BLKGETSIZE64, logical and physical block size from BLKSSZGET and BLKPBSZGET (the LU reports the
physical one as LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT in READ CAPACITY(16) and as the optimal transfer
granularity in the Block Limits VPD page). Reads use pread (an I/O error is an OSError, not the SIGBUS a
mapping would give); with `direct` the device is opened O_DIRECT and every transfer goes through a
page-aligned buffer, so nothing of the LUN sits in the host's page cache. UNMAP is BLKZEROOUT (the device
unmaps where it can and the range reads as zeros, as LBPRZ promises).

A device is refused when the host uses it: mounted (itself, one of its partitions, or something built on
it), active swap, a member of a device-mapper or md device (a holder in /sys/class/block/*/holders), or
the device the host's root file system is on. The checks read /proc/self/mountinfo, /proc/swaps and
sysfs, and a last probe opens the device O_EXCL (the kernel refuses it while anything claims the device
or one of its partitions). The probe's claim is dropped at once: several target processes open the same
device (scale.iscsi_target), so none may hold it exclusively.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct

from services.iscsi_target.scsi.backstore import Backstore, BackstoreError
from services.iscsi_target.scsi.pread_file import pread_exact

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKZEROOUT = 0x127F
_U64 = struct.Struct("=Q")
_INT = struct.Struct("=i")
_RANGE = struct.Struct("=QQ")
ZEROOUT_CHUNK = 1 << 30

MOUNTINFO = "/proc/self/mountinfo"
SWAPS = "/proc/swaps"
SYS_BLOCK = "/sys/class/block"


def _ioctl_int(fd: int, request: int, fmt: struct.Struct) -> int:
    return fmt.unpack(fcntl.ioctl(fd, request, bytes(fmt.size)))[0]


def _devno(major_minor: str) -> int:
    major, minor = major_minor.split(":")
    return os.makedev(int(major), int(minor))


def _sys_name(devno: int) -> str | None:
    """The kernel's name of a block device (sda1, loop3p2, dm-0) from its number, via /sys/dev/block."""
    link = f"/sys/dev/block/{os.major(devno)}:{os.minor(devno)}"
    try:
        return os.path.basename(os.path.realpath(link))
    except OSError:
        return None


def _read_devno(name: str) -> int | None:
    try:
        with open(f"{SYS_BLOCK}/{name}/dev") as f:
            return _devno(f.read().strip())
    except (OSError, ValueError):
        return None


def related_devices(name: str) -> dict[int, str]:
    """The device, its partitions and everything stacked on them (holders, recursively): devno -> how."""
    found: dict[int, str] = {}
    todo = [(name, name)]
    while todo:
        current, how = todo.pop()
        devno = _read_devno(current)
        if devno is None or devno in found:
            continue
        found[devno] = how
        base = f"{SYS_BLOCK}/{current}"
        try:
            entries = os.listdir(base)
        except OSError:
            entries = []
        for entry in entries:  # partitions are subdirectories that have a `partition` file
            if os.path.exists(f"{base}/{entry}/partition"):
                todo.append((entry, f"its partition {entry}"))
        try:
            holders = os.listdir(f"{base}/holders")
        except OSError:
            holders = []
        for holder in holders:
            todo.append((holder, f"{holder} (a device-mapper/md device on {current})"))
    return found


def _mounted() -> dict[int, str]:
    """devno -> mount point, for every mounted block device (by its number and by its source path)."""
    out: dict[int, str] = {}
    try:
        with open(MOUNTINFO) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 10:
            continue
        point = fields[4]
        try:
            out.setdefault(_devno(fields[2]), point)
        except ValueError:
            pass
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        source = fields[sep + 2] if len(fields) > sep + 2 else ""
        if source.startswith("/dev/"):  # btrfs and friends show a virtual number; the source names the device
            try:
                st = os.stat(source)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                out.setdefault(st.st_rdev, point)
    return out


def _swaps() -> set[int]:
    out = set()
    try:
        with open(SWAPS) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        path = line.split()[0] if line.split() else ""
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            out.add(st.st_rdev)
    return out


def in_use(path: str, devno: int) -> str | None:
    """Why the host uses this device (so it must not be exported), or None."""
    name = _sys_name(devno)
    related = (related_devices(name) if name else {}) or {devno: path}  # no sysfs entry: the device alone
    mounts = _mounted()
    try:
        root_dev = os.stat("/").st_dev
    except OSError:
        root_dev = None
    for dev, how in related.items():
        if dev == root_dev or mounts.get(dev) == "/":
            return "it holds the host's root file system" + ("" if dev == devno else f" ({how})")
    for dev, how in related.items():
        if dev in mounts:
            return ("it is" if dev == devno else f"{how} is") + f" mounted on {mounts[dev]}"
    swaps = _swaps()
    for dev, how in related.items():
        if dev in swaps:
            return "it is in use as swap" if dev == devno else f"{how} is in use as swap"
    for dev, how in related.items():
        if dev != devno and "device-mapper/md" in how:
            return f"{how} is built on it"
    try:  # the kernel's own view: anything else that claims the device (or one of its partitions)
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return "the kernel reports it busy (claimed by a file system, device-mapper, md or another program)"
        return None
    os.close(fd)
    return None


class BlockBackstore(Backstore):
    """A block device or partition: pread/pwrite (O_DIRECT with aligned buffers when `direct`)."""

    thin = False

    def __init__(self, path, block_size: int | None = None, readonly: bool = False, direct: bool = False,
                 write_through: bool = False, allow_in_use: bool = False):
        self.path = os.fspath(path)
        self.readonly = readonly
        self.write_through = write_through
        self.direct = direct
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise BackstoreError(f"{self.path}: cannot open the device: {exc.strerror}") from exc
        if not stat.S_ISBLK(st.st_mode):
            raise BackstoreError(f"{self.path}: not a block device (use type: file for an image file)")
        self.devno = st.st_rdev
        if not allow_in_use:
            why = in_use(self.path, self.devno)
            if why:
                raise BackstoreError(f"{self.path}: refused: {why}; exporting it would corrupt it")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            raise BackstoreError(f"{self.path}: cannot open the device: {exc.strerror}") from exc
        try:
            size = _ioctl_int(self.fd, BLKGETSIZE64, _U64)
            self.logical_block_size = _ioctl_int(self.fd, BLKSSZGET, _INT)
            self.physical_block_size = max(_ioctl_int(self.fd, BLKPBSZGET, _INT), self.logical_block_size)
            if block_size is None:
                block_size = self.logical_block_size
            if block_size < self.logical_block_size or block_size % self.logical_block_size:
                raise BackstoreError(f"{self.path}: block_size {block_size} is smaller than, or not a multiple of, "
                                     f"the device's logical block size {self.logical_block_size}")
            if block_size not in (512, 4096):
                raise BackstoreError(f"{self.path}: the device's logical block size is {block_size}; "
                                     "a LUN serves 512 or 4096")
            size -= size % block_size
            if size <= 0:
                raise BackstoreError(f"{self.path}: the device is smaller than one {block_size}-byte block")
            super().__init__(size, block_size)
        except OSError as exc:
            os.close(self.fd)
            raise BackstoreError(f"{self.path}: cannot read the device's geometry: {exc.strerror}") from exc
        except BaseException:
            os.close(self.fd)
            raise
        self.physical_block_size = max(self.physical_block_size, block_size)

    # ---------------------------------------------------------------- I/O
    def read(self, offset: int, length: int):
        if not self.direct:
            return pread_exact(self.fd, length, offset)
        buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT needs
        got = 0
        view = memoryview(buf)
        while got < length:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n <= 0:
                raise OSError(errno.EIO, f"short read at offset {offset + got}")
            got += n
        return view

    def write(self, offset: int, data) -> None:
        if self.direct:
            buf = mmap.mmap(-1, len(data))
            buf[:] = data
            data = memoryview(buf)
        n = os.pwrite(self.fd, data, offset)
        while n < len(data):
            n += os.pwrite(self.fd, memoryview(data)[n:], offset + n)
        if self.write_through:
            os.fdatasync(self.fd)

    def sync(self) -> None:
        os.fdatasync(self.fd)  # the device's volatile write cache too (a FLUSH)

    def unmap(self, offset: int, length: int) -> None:
        end = offset + length
        try:
            while offset < end:
                n = min(ZEROOUT_CHUNK, end - offset)
                fcntl.ioctl(self.fd, BLKZEROOUT, _RANGE.pack(offset, n))
                offset += n
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            self.write_zeros(offset, end - offset)
        if self.write_through:
            os.fdatasync(self.fd)

    def mapped(self, offset: int) -> tuple[bool, int]:
        return True, self.size - offset

    def resize(self, size: int) -> None:
        raise BackstoreError(f"{self.path}: a block device's size is the device's own")

    def close(self) -> None:
        os.close(self.fd)
