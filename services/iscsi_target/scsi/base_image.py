"""An image version as a PC's overlay disk reads it: read-only, mmap'd shared, one per version file per process.

`open_base` gives the process's one BaseImage of a version (refcounted: every overlay on it holds one; 20 PCs
on one version read the same pages of one mapping). A BaseImage is also a `readonly` PC's backstore alone.
"""

from __future__ import annotations

import mmap
import os
import threading

from services.iscsi_target.scsi.backstore import (POPULATE_LIMIT, Backstore, BackstoreError, close_mapping,
                                                  file_mapped)
from services.iscsi_target.scsi.overlay_errors import OverlayError


class BaseImage(Backstore):
    """A published version: read-only, mmap'd shared. Also usable alone as a `readonly` PC's backstore."""

    readonly = True
    write_through = False
    thin = False

    def __init__(self, path, block_size: int = 512):
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OverlayError(f"{self.path}: cannot open image version: {exc.strerror}") from exc
        try:
            st = os.fstat(self.fd)
            self.key = (st.st_dev, st.st_ino)
            super().__init__(st.st_size, block_size)
            flags = mmap.MAP_SHARED
            if self.size <= POPULATE_LIMIT:  # prefaulted, as FileBackstore: no page fault per first READ
                flags |= getattr(mmap, "MAP_POPULATE", 0)
            self.map = mmap.mmap(self.fd, self.size, flags=flags, prot=mmap.PROT_READ)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.map)
        self.refs = 1  # the opener's; close() drops it, each overlay on it holds one more

    def read(self, offset: int, length: int):
        return self.view[offset:offset + length]

    def write(self, offset: int, data) -> None:
        raise BackstoreError(f"{self.path}: an image version is read-only")

    def sync(self) -> None:
        """Nothing is ever written."""

    def unmap(self, offset: int, length: int) -> None:
        raise BackstoreError(f"{self.path}: an image version is read-only")

    def mapped(self, offset: int) -> tuple[bool, int]:
        return file_mapped(self.fd, offset, self.size)

    def resize(self, size: int) -> None:
        raise BackstoreError(f"{self.path}: an image version is immutable; it cannot be resized")

    def close(self) -> None:
        release_base(self)


_bases: dict = {}
_bases_lock = threading.Lock()


def open_base(path, block_size: int = 512) -> BaseImage:
    """The process's one BaseImage of this version file (shared by every overlay on it; refcounted)."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, block_size)
    with _bases_lock:
        base = _bases.get(key)
        if base is None:
            base = BaseImage(path, block_size)
            _bases[key] = base
        else:
            base.refs += 1
        return base


def retain_base(base: BaseImage) -> BaseImage:
    """One more holder of an open BaseImage (an overlay given the object itself)."""
    with _bases_lock:
        base.refs += 1
    return base


def release_base(base: BaseImage) -> None:
    with _bases_lock:
        base.refs -= 1
        if base.refs > 0:
            return
        if _bases.get(base.key + (base.block_size,)) is base:
            del _bases[base.key + (base.block_size,)]
    close_mapping(base.view, base.map)
    os.close(base.fd)
