"""Target ownership as kernel locks: `<state>/iscsi/owners/<hash>.lock`, one file per target name.

The owner holds a write lock on the whole file and has written "<instance> <pid>" into it. The lock is an
open-file-description lock (fcntl F_OFD_SETLK), not flock(): it is dropped by the kernel when the holder's
file closes or its process dies (kill -9 included), like flock, and F_OFD_GETLK can ask whether someone
holds it *without taking it*, so a process that only wants to know whom to hand a connection to never
briefly owns the target itself (a probe by flock would have to lock and unlock, and could make the real
claimant's non-blocking lock fail meanwhile).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import threading
import time
from pathlib import Path

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux/x86-64 and arm64: type, whence, start, len, pid
_WRITE_LOCK = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)


def lock_name(target: str) -> str:
    return hashlib.sha256(target.encode()).hexdigest()[:32] + ".lock"


class OwnerLocks:
    """This process's locks on target lock files under `directory`."""

    def __init__(self, directory: Path, instance: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.instance = instance
        self._held: dict[str, int] = {}  # target -> fd holding its lock
        self._lock = threading.Lock()

    def _path(self, target: str) -> Path:
        return self.directory / lock_name(target)

    def owns(self, target: str) -> bool:
        return target in self._held

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def acquire(self, target: str) -> bool:
        """Take the target's lock if no one holds it; True if this process holds it now."""
        with self._lock:
            if target in self._held:
                return True
            fd = os.open(self._path(target), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WRITE_LOCK)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise
            line = f"{self.instance} {os.getpid()}\n".encode()
            os.pwrite(fd, line, 0)  # then cut: a reader sees a whole first line, never an empty file
            os.ftruncate(fd, len(line))
            self._held[target] = fd
            return True

    def release(self, target: str) -> None:
        with self._lock:
            fd = self._held.pop(target, None)
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the lock

    def release_all(self) -> None:
        for target in self.held():
            self.release(target)

    def holder(self, target: str, settle: float = 0.5) -> int | None:
        """The instance holding the target's lock, or None when no one does (this process included: it
        answers its own instance). A lock just taken whose file is not written yet is waited for up to
        `settle` seconds (the file may name the previous owner for an instant: a hand-over there is
        forwarded, owners.plan)."""
        if target in self._held:
            return self.instance
        try:
            fd = os.open(self._path(target), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            deadline = time.monotonic() + settle
            while True:
                # F_OFD_GETLK needs the descriptor open for writing only to *take* a write lock; asking works
                # on a read-only one.
                answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _WRITE_LOCK)
                if _FLOCK.unpack(answer)[0] == fcntl.F_UNLCK:
                    return None
                text = os.pread(fd, 64, 0).decode(errors="replace").split()
                if text and text[0].isdigit():
                    return int(text[0])
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.005)
        finally:
            os.close(fd)
