"""A VHDX file served read-only as a LUN's blocks (fixed or dynamic, no parent, an empty log).

The format is parsed by vhdx.py (sans-IO); a differencing VHDX, or one whose log was not replayed, is refused
there with a message naming `qemu-img` as the way to convert or repair it. open_image (vhd_backstore.py) tells
a VHDX from a VHD and opens it here.
"""

from __future__ import annotations

import mmap
import os

from services.iscsi_target.scsi import vhdx as X
from services.iscsi_target.scsi.backstore import Backstore, BackstoreError
from services.iscsi_target.scsi.vhd_backstore import _pread_exact, _zeros


class VhdxBackstore(Backstore):
    """A VHDX file, read-only: fixed or dynamic, without a parent, with an empty log."""

    readonly = True

    def __init__(self, path, block_size: int = 512):
        self.path = os.fspath(path)
        self.write_through = False
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise BackstoreError(f"{self.path}: cannot open VHDX: {exc.strerror}") from exc
        try:
            file_size = os.fstat(self.fd).st_size
            self.image = X.parse(lambda offset, length: _pread_exact(self.fd, length, offset), file_size)
            super().__init__(self.image.size, block_size)
            self.block = self.image.block_size
            self.map = mmap.mmap(self.fd, file_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            self.view = memoryview(self.map)
        except X.VhdxFormatError as exc:
            os.close(self.fd)
            raise BackstoreError(f"{self.path}: {exc}") from exc
        except BaseException:
            os.close(self.fd)
            raise
        self.thin = False

    def read(self, offset: int, length: int):
        block = self.block
        inner = offset % block
        if inner + length <= block:
            at = self.image.offsets[offset // block]
            return self.view[at + inner:at + inner + length] if at else _zeros(length)
        out = bytearray(length)
        done = 0
        while done < length:
            pos = offset + done
            inner = pos % block
            k = min(length - done, block - inner)
            at = self.image.offsets[pos // block]
            if at:
                out[done:done + k] = self.view[at + inner:at + inner + k]
            done += k
        return memoryview(out)

    def write(self, offset: int, data) -> None:
        raise BackstoreError(f"{self.path}: a VHDX is served read-only")

    unmap = write

    def sync(self) -> None:
        """Nothing is ever written."""

    def mapped(self, offset: int) -> tuple[bool, int]:
        index = offset // self.block
        answer = bool(self.image.offsets[index])
        i = index + 1
        while i < len(self.image.offsets) and bool(self.image.offsets[i]) == answer:
            i += 1
        return answer, min(i * self.block, self.size) - offset

    def resize(self, size: int) -> None:
        raise BackstoreError(f"{self.path}: a VHDX is served read-only")

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------- creating
