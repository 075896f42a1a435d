"""Replace a file so that a crash (or `kill -9`) leaves either the old content or the new, never a mix."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, sync: bool = True) -> None:
    """Write a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory.
    `sync=False`: no fsync (still old or new after a `kill -9`; either, or none, after a power loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (a rename into it) durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
