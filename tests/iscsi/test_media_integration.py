"""CD/DVD, mirror and block LUNs driven by real initiators: qemu-img info / qemu-io / qemu-img convert over
iscsi:// reading an ISO made by xorriso (a known file's bytes at its place), libiscsi's iscsi-inq showing
device type 5, a mirror and a loop device through qemu-io; and a media change on a running service (a new
revision with another ISO): the logged-in session sees 28h/00h, then the new disc.

Linux's sr driver (the lab PC mounting the ISO over iSCSI) is the e2e lab's part, not here.
Every tool is required: a missing one fails the test (deploy/system-deps.sh installs them).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from services.iscsi_target import pdu as P
from services.iscsi_target.service import IscsiTargetService
from shared.config.model import BootfleetConfig
from shared.service import ServiceContext
from tests.iscsi.target_process import start_target, stop_process
from support import tool

pytestmark = pytest.mark.integration

CD = "iqn.2026-11.org.bootfleet.test:cd"
MIRROR = "iqn.2026-11.org.bootfleet.test:mirror"
BLOCK = "iqn.2026-11.org.bootfleet.test:block"



def run(args, timeout=60, check=True, **kw):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_iso(tmp: Path, name: str, label: str) -> tuple[Path, bytes, int]:
    """An ISO 9660 image (xorriso) holding known.bin (random, 64 KiB); returns it, the bytes and their offset."""
    tree = tmp / f"{name}.d"
    tree.mkdir()
    known = os.urandom(65536)
    (tree / "known.bin").write_bytes(known)
    (tree / "README.TXT").write_text(f"disc {label}\n")
    iso = tmp / f"{name}.iso"
    run([tool("xorriso"), "-as", "mkisofs", "-quiet", "-o", str(iso), "-V", label, "-r", "-J", str(tree)])
    offset = iso.read_bytes().find(known)
    assert offset > 0 and offset % 2048 == 0
    return iso, known, offset


def qemu_read(url: str, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` through qemu-io's hex dump (`read -v`)."""
    r = run([tool("qemu-io"), "-r", "-f", "raw", "-c", f"read -v {offset} {length}", url])
    out = bytearray()
    for line in r.stdout.splitlines():
        m = re.match(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ){1,16})", line)
        if m:
            out += bytes.fromhex(m.group(1).replace(" ", ""))
    return bytes(out)


class Standalone:
    def __init__(self, tmp: Path, config: str):
        self.tmp, self.port = tmp, free_port()
        self.cfg = tmp / "bootfleet.yaml"
        self.cfg.write_text(config.replace("PORT", str(self.port)))
        self.log = tmp / "target.log"

    def __enter__(self):
        self.logf = open(self.log, "ab")
        self.proc = start_target(self.cfg, self.tmp, self.logf, self.port)
        return self

    def __exit__(self, *exc):
        stop_process(self.proc, 12)
        self.logf.close()

    def url(self, iqn, lun=0):
        return f"iscsi://127.0.0.1:{self.port}/{iqn}/{lun}"


# ---------------------------------------------------------------------------------------------- CD/DVD
def test_cdrom_lun_read_by_qemu_and_libiscsi(tmp_path):
    iso, known, offset = make_iso(tmp_path, "disc", "DISC_A")
    config = f"""version: 1
logging: {{level: info}}
iscsi:
  portals: [{{ip: 127.0.0.1, port: PORT}}]
  io_stats_interval: 0
  targets:
    - name: {CD}
      luns: [{{id: 0, backstore: {{type: cdrom, path: {iso.name}}}}}]
"""
    with Standalone(tmp_path, config) as t:
        url = t.url(CD)
        inq = run([tool("iscsi-inq"), url]).stdout
        assert re.search(r"Peripheral Device Type:\s*MMC", inq), inq  # libiscsi names type 5 MMC
        assert re.search(r"Removable:\s*1", inq), inq
        info = run([tool("qemu-img"), "info", "-f", "raw", url]).stdout
        size = int(re.search(r"virtual size: .*\((\d+) bytes\)", info).group(1))
        assert size == iso.stat().st_size
        assert qemu_read(url, offset, 4096) == known[:4096]
        assert qemu_read(url, offset + 61440, 4096) == known[61440:]
        out = tmp_path / "copy.raw"
        run([tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", url, str(out)])
        assert out.read_bytes() == iso.read_bytes()  # every byte of the disc, through READ(10)s of 2048-byte blocks
        w = run([tool("qemu-io"), "-f", "raw", "-c", "write 0 2048", url], check=False)
        assert w.returncode and "write failed: Permission denied" in w.stdout + w.stderr, w.stdout + w.stderr  # DATA PROTECT
        assert iso.read_bytes().find(known) == offset  # the write did not reach the image


# A no-emulation El Torito boot image: real-mode code at 0:7C00 that writes a marker to COM1 and halts
#   xor ax,ax; mov ds,ax; cld; mov dx,0x3f8; mov si,0x7c16; l: lodsb; test al,al; jz h; out dx,al; jmp l;
#   h: hlt; jmp h; then the message
BOOT_CODE = bytes.fromhex("31C08ED8FCBAF803BE167CAC84C07403EEEBF8F4EBFD") + b"BOOTFLEET-CD-OK\r\n\0"


def test_qemu_boots_an_el_torito_iso_from_the_cdrom_lun(tmp_path):
    """qemu -drive file=iscsi://...,media=cdrom: SeaBIOS boots the disc through libiscsi from our drive."""
    tree = tmp_path / "boot.d"
    tree.mkdir()
    (tree / "boot.img").write_bytes(BOOT_CODE.ljust(2048, b"\0"))
    iso = tmp_path / "boot.iso"
    run([tool("xorriso"), "-as", "mkisofs", "-quiet", "-o", str(iso), "-V", "BOOTCD", "-b", "boot.img",
         "-no-emul-boot", "-boot-load-size", "4", str(tree)])
    config = f"""version: 1
logging: {{level: info}}
iscsi:
  portals: [{{ip: 127.0.0.1, port: PORT}}]
  io_stats_interval: 0
  targets:
    - name: {CD}
      luns: [{{id: 0, backstore: {{type: cdrom, path: {iso.name}}}}}]
"""
    serial = tmp_path / "serial.log"
    with Standalone(tmp_path, config) as t:
        qemu = subprocess.Popen([tool("qemu-system-x86_64"), "-nodefaults", "-display", "none", "-machine",
                                 "accel=tcg", "-m", "64", "-serial", f"file:{serial}", "-boot", "d", "-drive",
                                 f"file={t.url(CD)},media=cdrom,if=ide,format=raw"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 90
            while b"BOOTFLEET-CD-OK" not in (serial.read_bytes() if serial.exists() else b""):
                assert qemu.poll() is None, qemu.stderr.read().decode()
                assert time.monotonic() < deadline, f"no boot marker: {serial.read_bytes()!r}"
                time.sleep(0.1)
        finally:
            qemu.terminate()
            qemu.wait(10)


# ---------------------------------------------------------------------------------------------- mirror, block
def test_mirror_and_block_luns_through_qemu_io(tmp_path):
    image = tmp_path / "loop.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    dev = run([tool("losetup"), "-f", "--show", str(image)]).stdout.strip()
    try:
        config = f"""version: 1
logging: {{level: info}}
iscsi:
  portals: [{{ip: 127.0.0.1, port: PORT}}]
  io_stats_interval: 0
  targets:
    - name: {MIRROR}
      luns:
        - id: 0
          backstore:
            type: mirror
            legs: [{{type: file, path: a.img, size: 16MiB}}, {{type: file, path: b.img, size: 16MiB}}]
    - name: {BLOCK}
      luns: [{{id: 0, backstore: {{type: block, path: {dev}}}}}]
"""
        with Standalone(tmp_path, config) as t:
            for iqn in (MIRROR, BLOCK):
                url = t.url(iqn)
                run([tool("qemu-io"), "-f", "raw", "-c", "write -P 0xa5 1M 256k", "-c", "flush", url])
                r = run([tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 0xa5 1M 256k", url])
                assert "Pattern verification failed" not in r.stdout, r.stdout
                info = run([tool("qemu-img"), "info", "-f", "raw", url]).stdout
                assert "(16777216 bytes)" in info, info
        for leg in ("a.img", "b.img"):
            raw = (tmp_path / leg).read_bytes()
            assert raw[1 << 20:(1 << 20) + (256 << 10)] == b"\xa5" * (256 << 10), leg
        raw = image.read_bytes()
        assert raw[1 << 20:(1 << 20) + (256 << 10)] == b"\xa5" * (256 << 10)
    finally:
        subprocess.run([tool("losetup"), "-d", dev], timeout=30)


# ---------------------------------------------------------------------------------------------- media change
class RawSession:
    """Just enough of an initiator to keep one session open across a configuration change."""

    def __init__(self, port: int, target: str):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        keys = P.encode_text([("InitiatorName", "iqn.2026-11.org.test:cd-watcher"), ("TargetName", target),
                              ("SessionType", "Normal")])
        self.s.sendall(P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, lun=(0x8000AB << 16) << 16,
                                        itt=1, words=(0, 1, 0, 0, 0, 0, 0), data=keys))
        head, _ = self._pdu()
        assert head[0] & 0x3F == P.OP_LOGIN_RSP and head[36] == 0, head[36:38]
        self.statsn = struct.unpack_from(">I", head, 24)[0] + 1
        self.cmdsn, self.itt = 1, 2

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            assert chunk, "the target closed the connection"
            buf += chunk
        return buf

    def _pdu(self):
        head = self._recv(48)
        length = int.from_bytes(head[5:8], "big")
        body = self._recv(P.padded(length))[:length]
        return head, body

    def command(self, cdb: bytes, read_length: int = 0):
        """(status, sense, data) of one command."""
        flags = 0x80 | (0x40 if read_length else 0)
        words = (read_length, self.cmdsn, self.statsn) + struct.unpack(">4I", cdb.ljust(16, b"\0"))
        self.s.sendall(P.encode_request(P.OP_SCSI_CMD, flags=flags, itt=self.itt, words=words))
        self.cmdsn += 1
        self.itt += 1
        data = b""
        while True:
            head, body = self._pdu()
            op = head[0] & 0x3F
            if op == P.OP_NOP_IN:
                continue
            if op == P.OP_DATA_IN:
                data += body
                if head[1] & 0x01:  # S: the status came with the data
                    self.statsn = struct.unpack_from(">I", head, 24)[0] + 1
                    return head[3], b"", data
                continue
            assert op == P.OP_SCSI_RSP, hex(op)
            self.statsn = struct.unpack_from(">I", head, 24)[0] + 1
            sense = body[2:2 + int.from_bytes(body[:2], "big")] if body else b""
            return head[3], sense, data

    def close(self):
        self.s.close()


def _asc(sense: bytes):
    return sense[2] & 0x0F, sense[12], sense[13]


def test_a_new_iso_in_a_new_revision_is_a_media_change(tmp_path):
    iso_a, known_a, off_a = make_iso(tmp_path, "a", "DISC_A")
    iso_b, known_b, off_b = make_iso(tmp_path, "b", "DISC_B")
    port = free_port()
    events: list = []
    svc = IscsiTargetService(ServiceContext("iscsi_target", 0, tmp_path, lambda t, f: events.append((t, f))))

    def config(iso):
        return BootfleetConfig(iscsi={"portals": [{"ip": "127.0.0.1", "port": port}], "io_stats_interval": 0,
                                      "targets": [{"name": CD, "luns": [
                                          {"id": 0, "backstore": {"type": "cdrom", "path": iso.name}}]}]})

    read10 = lambda lba, n: bytes([0x28, 0]) + struct.pack(">IxHx", lba, n)  # noqa: E731

    async def scenario():
        await svc.start(config(iso_a))
        s = await asyncio.to_thread(RawSession, port, CD)
        try:
            status, sense, _ = await asyncio.to_thread(s.command, b"\x00")
            assert status == 2 and _asc(sense) == (6, 0x29, 0x00)  # power on: the session's first command
            assert (await asyncio.to_thread(s.command, b"\x00"))[0] == 0
            _, _, got = await asyncio.to_thread(s.command, read10(off_a // 2048, 1), 2048)
            assert got == known_a[:2048]
            lu = svc.registry.targets[CD].scsi.luns[0]
            await svc.apply(config(iso_b))
            assert svc.registry.targets[CD].scsi.luns[0] is lu  # the same LU, a new disc: not a new LUN
            status, sense, _ = await asyncio.to_thread(s.command, b"\x00")
            assert status == 2 and _asc(sense) == (6, 0x28, 0x00), sense.hex()  # NOT READY TO READY CHANGE
            status, _, cap = await asyncio.to_thread(s.command, b"\x25" + bytes(9), 8)
            assert status == 0 and struct.unpack(">II", cap) == (iso_b.stat().st_size // 2048 - 1, 2048)
            _, _, got = await asyncio.to_thread(s.command, read10(off_b // 2048, 1), 2048)
            assert got == known_b[:2048]
            url = f"iscsi://127.0.0.1:{port}/{CD}/0"  # and a new initiator reads the new disc
            assert await asyncio.to_thread(qemu_read, url, off_b, 4096) == known_b[:4096]
        finally:
            s.close()
            await svc.stop()

    asyncio.run(scenario())
