"""The TFTP root jail: which names may be read or written; a read's source, an upload's end; netascii conversion.

A requested name is refused before any file is touched when it is empty, absolute, holds a `..` component,
a NUL or a backslash-dot-dot. It is then resolved (symlinks followed) and must stay under the root's real
path; the file is opened without following a final symlink swapped in since (O_NOFOLLOW on the resolved
path) and without blocking (a FIFO would hang a blocking open), and `/proc/self/fd` confirms where the opened
descriptor really is, so a rename race cannot lead outside. Only regular files are served.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass

from services.tftp import packets as pk


class Refused(Exception):
    """A request the jail refuses: `code` is the TFTP error code, the message says why (for log and client)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Opened:
    fd: int
    size: int
    path: str


def to_netascii(data: bytes) -> bytes:
    # RFC 764: CR -> CR NUL first, then LF -> CR LF (the CRs inserted are not followed by NUL)
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def from_netascii(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")


def check_name(name: str) -> str:
    """The relative path a request names, or Refused(2) for a name that tries to leave the root."""
    if not name:
        raise Refused(pk.ERR_ACCESS, "empty file name")
    if "\0" in name:
        raise Refused(pk.ERR_ACCESS, "file name holds a NUL")
    if name.startswith("/"):
        raise Refused(pk.ERR_ACCESS, f"absolute path {name!r} is refused (names are relative to the TFTP root)")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise Refused(pk.ERR_ACCESS, f"{name!r} holds '..'")
    return "/".join(p for p in parts if p not in ("", "."))


class Jail:
    def __init__(self, root: str, upload_dir: str | None = None):
        self.root = os.path.realpath(root)
        self.upload_dir = os.path.join(self.root, upload_dir) if upload_dir else None

    def _inside(self, path: str, base: str) -> bool:
        return path == base or path.startswith(base.rstrip("/") + "/")

    def resolve(self, name: str) -> str:
        rel = check_name(name)
        if not rel:
            raise Refused(pk.ERR_ACCESS, f"{name!r} names the root folder")
        real = os.path.realpath(os.path.join(self.root, rel))
        if not self._inside(real, self.root):
            raise Refused(pk.ERR_ACCESS, f"{name!r} resolves outside the TFTP root (symlink to {real})")
        return real

    def exists(self, name: str) -> bool:
        try:
            return os.path.lexists(self.resolve(name))
        except Refused:
            return False

    def open_read(self, name: str) -> Opened:
        real = self.resolve(name)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            raise Refused(pk.ERR_NOT_FOUND, f"{name!r} not found") from None
        except PermissionError:
            raise Refused(pk.ERR_ACCESS, f"{name!r} is not readable by the server") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Refused(pk.ERR_ACCESS, f"{name!r} is a symlink that changed while opening") from None
            raise Refused(pk.ERR_ACCESS, f"{name!r}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise Refused(pk.ERR_ACCESS, f"{name!r} is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise Refused(pk.ERR_ACCESS, f"{name!r} is not a regular file (device, FIFO or socket)")
            where = os.readlink(f"/proc/self/fd/{fd}")
            if not self._inside(where, self.root):
                raise Refused(pk.ERR_ACCESS, f"{name!r} was moved outside the TFTP root while opening")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return Opened(fd, st.st_size, real)

    def open_write(self, name: str, overwrite: bool) -> tuple[int, str, str]:
        """-> (fd of a temporary file, its path, the final path). The caller renames on success."""
        if self.upload_dir is None:
            raise Refused(pk.ERR_ACCESS, "this server is read-only (no tftp.upload_dir)")
        real = self.resolve(name)
        upload_real = os.path.realpath(self.upload_dir)
        if not self._inside(real, upload_real) or real == upload_real:
            raise Refused(pk.ERR_ACCESS, f"{name!r} is outside the upload folder")
        if os.path.isdir(real):
            raise Refused(pk.ERR_ACCESS, f"{name!r} is a directory")
        if os.path.lexists(real):
            if not overwrite:
                raise Refused(pk.ERR_EXISTS, f"{name!r} already exists")
            if not stat.S_ISREG(os.lstat(real).st_mode):
                raise Refused(pk.ERR_ACCESS, f"{name!r} is not a regular file")
        folder = os.path.dirname(real)
        if not os.path.isdir(folder):
            raise Refused(pk.ERR_ACCESS, f"folder of {name!r} does not exist")
        temp = os.path.join(folder, f".{os.path.basename(real)}.part-{os.getpid()}-{id(real):x}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise Refused(pk.ERR_ACCESS, f"{name!r}: cannot create: {exc.strerror}") from None
        return fd, temp, real


def open_source(jail: Jail, cache: FileCache, name: str, netascii: bool,
                netascii_max_size: int) -> tuple[int | memoryview, int]:
    """-> (source, size) of a file to read: the cached bytes, a netascii copy in memory, or else the open
    descriptor (the caller closes it). Refused for a name the jail refuses or a file that cannot be read."""
    opened = jail.open_read(name)
    try:
        cached = cache.get(opened.fd) if not netascii else None
    except OSError as exc:
        os.close(opened.fd)
        raise Refused(pk.ERR_UNDEFINED, f"{name!r} cannot be read: {exc.strerror}") from None
    if cached is not None:
        os.close(opened.fd)
        return cached, len(cached)
    if not netascii:
        return opened.fd, opened.size
    try:
        if opened.size > netascii_max_size:
            raise Refused(pk.ERR_UNDEFINED, f"{name!r} is too large for netascii mode ({opened.size} bytes)")
        body = to_netascii(os.pread(opened.fd, opened.size, 0))
    finally:
        os.close(opened.fd)
    return memoryview(body), len(body)


def finish_upload(fd: int, temp_path: str, final_path: str, netascii: bool) -> None:
    """The last block is in: convert a netascii upload back, close the temporary file, rename it into place."""
    try:
        if netascii:
            size = os.fstat(fd).st_size
            body = from_netascii(os.pread(fd, size, 0))
            os.ftruncate(fd, 0)
            os.pwrite(fd, body, 0)
    finally:
        os.close(fd)
    os.rename(temp_path, final_path)


class FileCache:
    """Whole files kept in memory, shared by every transfer of them: a boot loader asked by a hundred PCs is
    read from disk once, and each block is then a slice of it (no read per block).

    Keyed by (device, inode, size, mtime, ctime): a file replaced or rewritten is read again. At most
    `max_bytes` in total (least recently used first out) and `max_file` per file; a transfer holds its own
    reference, so eviction never pulls data from under a transfer in flight.
    """

    def __init__(self, max_bytes: int, max_file: int):
        self.max_bytes = max_bytes
        self.max_file = max_file
        self.entries: dict[tuple, memoryview] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()  # serving threads share one cache; taken once per request, never per block

    def get(self, fd: int) -> memoryview | None:
        """The file's bytes, or None when it is too large to cache."""
        with self.lock:
            return self._get(fd)

    def _get(self, fd: int) -> memoryview | None:
        st = os.fstat(fd)
        if st.st_size > self.max_file or st.st_size > self.max_bytes:
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        data = self.entries.pop(key, None)
        if data is not None:
            self.hits += 1
            self.entries[key] = data  # most recently used last
            return data
        self.misses += 1
        body = os.pread(fd, st.st_size, 0)
        if len(body) != st.st_size:
            return None  # changing under us: serve it from disk
        data = memoryview(body)
        while self.entries and self.bytes + len(data) > self.max_bytes:
            old_key = next(iter(self.entries))
            self.bytes -= len(self.entries.pop(old_key))
        self.entries[key] = data
        self.bytes += len(data)
        return data
