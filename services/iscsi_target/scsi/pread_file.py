"""A raw image file read with pread instead of through an mmap: an I/O error is an OSError, never a SIGBUS.

FileBackstore reads are slices of a shared mapping: no copy, but a read that fails (EIO, the file truncated
under us, a tmpfs with no page left to fault in) kills the process with SIGBUS. Where a failing read must
be survived — a mirror leg (the mirror drops it and serves from the other), an ISO an administrator may
overwrite in place — the copy pread costs is the price. Writes, sync, unmap and sizing are FileBackstore's.
"""

from __future__ import annotations

import errno
import os

from services.iscsi_target.scsi.backstore import BackstoreError, FileBackstore


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
    """FileBackstore without the mapping: reads return bytes from pread."""

    def _map(self) -> None:
        self.map = None
        self.view = None

    def read(self, offset: int, length: int) -> bytes:
        return pread_exact(self.fd, length, offset)

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
            self.size = size
        self._notify_resize()

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
        os.close(self.fd)
