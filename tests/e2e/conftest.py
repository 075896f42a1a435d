"""Fixtures of the end-to-end boot tests: the boot disk (built once per session) and a per-test work dir.

Each test builds its own lab (network namespace, bridge, taps) and tears it down in `finally`, also on failure.
A missing tool (QEMU, iPXE ROM, dnsmasq, tgtd, apt-get ...) fails the test with a message naming the package.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from lab import image


@pytest.fixture(scope="session")
def boot_disk() -> Path:
    return image.build(log=lambda msg: None)


@pytest.fixture
def workdir():
    # short and unique: the stack's ipc sockets live under it (a Unix socket path has at most 107 bytes)
    path = Path(tempfile.mkdtemp(prefix="bf-e2e-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
