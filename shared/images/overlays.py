"""A PC's overlay files as the image store sees them: which version they sit on, their space on disk, the
flock that tells whether a target has them open, their removal; and the free-space reserve that overlay
writes are held to (SpaceGuard). The overlay's format is shared/images/overlay_format.py; the target's
reads and writes through it are services/iscsi_target/scsi/overlay.py.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from shared.images import overlay_format as F
from shared.images.errors import ImageStoreError
from shared.images.version_files import fsync_dir


class SpaceGuard:
    """The store's free-space reserve as an overlay's `space_guard`: True while `nbytes` more leave at
    least `reserve` bytes free. statvfs is asked again every second or when the cached budget runs out,
    so the hot path is one subtraction; other writers in that second can make it late by what they wrote."""

    def __init__(self, path: Path, reserve: int, interval: float = 1.0):
        self.path, self.reserve, self.interval = path, reserve, interval
        self._budget, self._at = 0, -interval
        self._lock = threading.Lock()

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def __call__(self, nbytes: int) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.interval or self._budget < nbytes:
                self._budget, self._at = self.free() - self.reserve, now
            if self._budget < nbytes:
                return False
            self._budget -= nbytes
            return True


def base_id(path: Path) -> str | None:
    """The base id the overlay's bitmap header records (None: no overlay, or an unreadable one)."""
    bm = F.bitmap_path(path)
    try:
        fd = os.open(bm, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return F.read_header(fd, str(bm)).base_id
    except F.OverlayFormatError:
        return None
    finally:
        os.close(fd)


def disk_usage(path: Path) -> int:
    """Bytes an overlay takes on disk (its data file's blocks plus the bitmap's)."""
    total = 0
    for p in (path, F.bitmap_path(path)):
        try:
            total += os.stat(p).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


@contextmanager
def closed(path: Path, what: str):
    """Hold the overlay's bitmap flock (the one an open Overlay holds): ImageStoreError if a target has it."""
    bm = F.bitmap_path(path)
    try:
        fd = os.open(bm, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImageStoreError(f"{what}: the overlay is open in a target (the PC's disk is being served; "
                                  f"shut the PC down first)") from None
        yield
    finally:
        os.close(fd)


def remove(path: Path) -> bool:
    """Delete an overlay's two files; True when there was one."""
    bm = F.bitmap_path(path)
    existed = bm.exists() or path.exists()
    bm.unlink(missing_ok=True)  # the bitmap first: without it the data file means nothing
    path.unlink(missing_ok=True)
    if existed:
        fsync_dir(path.parent)
    return existed
