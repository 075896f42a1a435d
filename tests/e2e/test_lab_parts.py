"""The lab's own parts, without booting anything: the cpio writer, module ordering, token and nonce sectors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lab import image


def test_cpio_archive_lists_with_gnu_cpio(tmp_path):
    cpio = image.Cpio()
    cpio.dir("bin")
    cpio.file("bin/busybox", b"\x7fELF" + b"x" * 1001, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.finish())
    listing = subprocess.run(["cpio", "-itv", "-F", str(archive)], capture_output=True, text=True, check=True).stdout
    lines = listing.splitlines()
    assert [line.split()[-1] for line in lines] == ["bin", "bin/busybox", "busybox", "init"]  # "sh -> busybox"
    assert lines[1].startswith("-rwxr-xr-x") and " 1005 " in lines[1]
    assert lines[2].startswith("lrwxrwxrwx") and "bin/sh -> busybox" in lines[2]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "-F", str(archive)], cwd=out, capture_output=True, check=True)
    assert (out / "bin" / "busybox").read_bytes() == b"\x7fELF" + b"x" * 1001
    assert (out / "bin" / "sh").is_symlink()


def _module(path: Path, depends: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF....\x00license=GPL\x00depends=" + depends.encode() + b"\x00vermagic=6.1\x00")
    return path


def test_load_order_puts_dependencies_first_and_skips_builtins(tmp_path):
    root = tmp_path / "lib/modules/6.1.0/kernel"
    paths = {
        "iscsi_tcp": _module(root / "drivers/scsi/iscsi_tcp.ko", "scsi_transport_iscsi,libiscsi_tcp,libiscsi"),
        "libiscsi_tcp": _module(root / "drivers/scsi/libiscsi_tcp.ko", "libiscsi"),
        "libiscsi": _module(root / "drivers/scsi/libiscsi.ko", "scsi_transport_iscsi,scsi_mod"),
        "scsi_transport_iscsi": _module(root / "drivers/scsi/scsi_transport_iscsi.ko", "scsi_mod"),
        "scsi_mod": _module(root / "drivers/scsi/scsi_mod.ko", "crc_t10dif"),
    }
    assert image.module_paths(tmp_path) == paths
    order = image.load_order(paths, ["iscsi_tcp"], builtin={"crc_t10dif"})
    assert order == ["scsi_mod", "scsi_transport_iscsi", "libiscsi", "libiscsi_tcp", "iscsi_tcp"]
    with pytest.raises(image.ImageError, match="crc_t10dif .*needed by scsi_mod"):
        image.load_order(paths, ["iscsi_tcp"])


def test_token_and_nonce_sectors(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\xff" * (2048 * 512))
    image.write_token(disk, "token-abc123")
    data = disk.read_bytes()
    assert data[1024 * 512 : 1024 * 512 + 13] == b"token-abc123\x00"
    assert data[1025 * 512 : 1026 * 512] == b"\x00" * 512  # the nonce sector is cleared for the guest
    assert data[1026 * 512 : 1026 * 512 + 4] == b"\xff" * 4  # and nothing beyond it is touched
    assert image.parse_nonce(b"BOOTFLEET-NONCE " + b"0123456789abcdef" * 2 + b"\n" + b"\x00" * 463) == "0123456789abcdef" * 2
    assert image.parse_nonce(b"\x00" * 512) is None
    with pytest.raises(ValueError, match="token"):
        image.write_token(disk, "no spaces allowed")
