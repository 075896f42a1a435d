"""A dynamic VHD and a VHDX served as LUNs by the running target, read and written by real initiators
(qemu-img and qemu-io over iscsi://, libiscsi's iscsi-readcapacity16); qemu-img reads the VHD file back.
Every tool is required: a missing one fails the test (deploy/system-deps.sh installs them)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.iscsi_target.scsi.vhd_backstore import create_differencing
from tests.iscsi.scsi.test_vhd import libvhdi_read
from support import tool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IQN = "iqn.2026-11.org.bootfleet.test:vhd"
MiB = 1 << 20



def run(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=60)


def raw_of(path: Path, fmt: str, out: Path) -> bytes:
    run(tool("qemu-img"), "convert", "-f", fmt, "-O", "raw", str(path), str(out))
    return out.read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_target(tmp: Path, port: int) -> subprocess.Popen:
    config = tmp / "bootfleet.yaml"
    config.write_text(f"""version: 1
logging: {{level: info}}
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  io_stats_interval: 0
  targets:
    - name: {IQN}
      luns:
        - {{id: 0, backstore: {{type: vhd, path: disk.vhd}}}}
        - {{id: 1, backstore: {{type: vhd, path: disk.vhdx}}}}
        - {{id: 2, backstore: {{type: vhd, path: child.vhd}}}}
""")
    log = open(tmp / "target.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "services.iscsi_target", "--config", str(config), "--state-dir",
                             str(tmp)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"target exited: {(tmp / 'target.log').read_text()[-2000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("target did not listen within 15 s")


def test_dynamic_vhd_lun_read_and_written_by_initiators(tmp_path):
    qimg, qio = tool("qemu-img"), tool("qemu-io")
    vhd, vhdx = tmp_path / "disk.vhd", tmp_path / "disk.vhdx"
    run(qimg, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", str(vhd), "32M")
    run(qio, "-f", "vpc", "-c", "write -P 0x31 0 1M", "-c", "write -P 0x32 3M 4k", str(vhd))
    run(qimg, "create", "-q", "-f", "vhdx", str(vhdx), "16M")
    run(qio, "-f", "vhdx", "-c", "write -P 0x41 1M 64k", str(vhdx))
    expect = bytearray(raw_of(vhd, "vpc", tmp_path / "expect.raw"))
    expect_x = raw_of(vhdx, "vhdx", tmp_path / "expect-x.raw")
    base = tmp_path / "base.vhd"  # a differencing VHD over a base: LUN 2
    run(qimg, "create", "-q", "-f", "vpc", "-o", "force_size=on", str(base), "16M")
    run(qio, "-f", "vpc", "-c", "write -P 0x61 0 2M", "-c", "write -P 0x62 5M 64k", str(base))
    base_raw = raw_of(base, "vpc", tmp_path / "base.raw")
    create_differencing(tmp_path / "child.vhd", base)
    expect_child = bytearray(base_raw)
    port = free_port()
    url = f"iscsi://127.0.0.1:{port}/{IQN}/0"
    proc = start_target(tmp_path, port)
    try:
        cap = run(tool("iscsi-readcapacity16"), url).stdout
        assert f"Total size:{32 * MiB}\n" in cap, cap
        assert raw_of(url, "raw", tmp_path / "served.raw") == bytes(expect)
        assert raw_of(f"iscsi://127.0.0.1:{port}/{IQN}/1", "raw", tmp_path / "served-x.raw") == expect_x
        # writes: into a new block (9 MiB), across a block edge, an overwrite; then a flush
        out = run(qio, "-f", "raw", "-c", "write -P 0x5a 9M 64k", "-c", f"write -P 0x5b {2 * MiB - 4096} 8k",
                  "-c", "write -P 0x5c 4k 4k", "-c", "flush", "-c", "read -P 0x5a 9M 64k", url)
        assert "Pattern verification failed" not in out.stdout + out.stderr, out.stdout + out.stderr
        for at, n, value in ((9 * MiB, 65536, 0x5A), (2 * MiB - 4096, 8192, 0x5B), (4096, 4096, 0x5C)):
            expect[at:at + n] = bytes([value]) * n
        child_url = f"iscsi://127.0.0.1:{port}/{IQN}/2"
        assert raw_of(child_url, "raw", tmp_path / "served-child.raw") == base_raw
        run(qio, "-f", "raw", "-c", "write -P 0x71 1M 8k", "-c", "write -P 0x72 12M 4k", "-c", "flush", child_url)
        expect_child[MiB:MiB + 8192] = b"\x71" * 8192
        expect_child[12 * MiB:12 * MiB + 4096] = b"\x72" * 4096
        assert raw_of(child_url, "raw", tmp_path / "served-child2.raw") == bytes(expect_child)
        # the VHDX LUN is write-protected
        denied = run(qio, "-f", "raw", "-c", "write -P 0x01 0 4k", f"iscsi://127.0.0.1:{port}/{IQN}/1", check=False)
        assert denied.returncode and "write protected" in denied.stderr, denied.stdout + denied.stderr
        # the flush made data and metadata durable: a target killed now (no close, no commit) loses nothing
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    assert raw_of(vhd, "vpc", tmp_path / "after.raw") == bytes(expect)
    assert raw_of(base, "vpc", tmp_path / "base-after.raw") == base_raw  # the parent is never written
    assert libvhdi_read([tmp_path / "child.vhd", base]) == bytes(expect_child)


def test_vhd_backstore_config_names_the_field():
    from pydantic import ValidationError

    from shared.config.iscsi import IscsiConfig
    from shared.config.model import BootfleetConfig

    def target(**backstore):
        return {"targets": [{"name": IQN, "luns": [{"id": 0, "backstore": {"type": "vhd", **backstore}}]}]}

    assert IscsiConfig(**target(path="a.vhd")).targets[0].luns[0].backstore.type == "vhd"
    with pytest.raises(ValidationError, match="path: a vhd backstore needs a path"):
        IscsiConfig(**target())
    with pytest.raises(ValidationError, match="size: a vhd backstore takes its size from the VHD"):
        IscsiConfig(**target(path="a.vhd", size="1MiB"))
    # at any scale only the target's owner opens its LUNs (and a VHD's flock refuses a second writer)
    BootfleetConfig(version=1, scale={"iscsi_target": 2}, iscsi=target(path="a.vhd"))
