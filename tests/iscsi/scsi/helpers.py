"""Builders for CDBs and a small harness: a target with LUNs, nexuses, and sense decoding."""

from __future__ import annotations

import struct

from services.iscsi_target.scsi import LogicalUnit, Nexus, RamBackstore, ScsiTarget

TARGET = "iqn.2026-11.org.bootfleet.test:scsi"
MiB = 1 << 20


def nexus(n: int = 1) -> Nexus:
    return Nexus(f"iqn.2026-11.org.test:init{n},i,0x00023d00000{n}", f"{TARGET},t,0x0001", n)


def make_target(*stores, name: str = TARGET, **lu_kwargs) -> ScsiTarget:
    stores = stores or (RamBackstore(4 * MiB),)
    return ScsiTarget(name, {i: LogicalUnit(s, i, **lu_kwargs) for i, s in enumerate(stores)})


def ready(target: ScsiTarget, *nexuses, lun: int = 0) -> None:
    """Consume the power-on unit attention each new nexus starts with."""
    for nx in nexuses:
        while target.execute(nx, lun, tur(), None).status != 0:
            pass


def key_asc(resp) -> tuple[int, int, int]:
    s = resp.sense
    assert s is not None and len(s) == 18, resp
    return s[2] & 0x0F, s[12], s[13]


def info(resp) -> int:
    assert resp.sense[0] & 0x80, "INFORMATION field not valid"
    return struct.unpack_from(">I", resp.sense, 3)[0]


def data(resp) -> bytes:
    return b"".join(bytes(d) for d in resp.data)


def cdb16(*head) -> memoryview:
    return memoryview(bytes(head).ljust(16, b"\0"))


def tur():
    return cdb16(0x00)


def inquiry(evpd=0, page=0, alloc=255):
    return cdb16(0x12, evpd, page, alloc >> 8, alloc & 0xFF, 0)


def read6(lba, n):
    return cdb16(0x08, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n & 0xFF, 0)


def write6(lba, n):
    return cdb16(0x0A, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n & 0xFF, 0)


def rw10(op, lba, n, flags=0):
    return memoryview((bytes([op, flags]) + struct.pack(">IxHx", lba, n)).ljust(16, b"\0"))


def rw12(op, lba, n, flags=0):
    return memoryview((bytes([op, flags]) + struct.pack(">IIxx", lba, n)).ljust(16, b"\0"))


def rw16(op, lba, n, flags=0):
    return memoryview(bytes([op, flags]) + struct.pack(">QIxx", lba, n))


def read10(lba, n, flags=0):
    return rw10(0x28, lba, n, flags)


def write10(lba, n, flags=0):
    return rw10(0x2A, lba, n, flags)


def read16(lba, n, flags=0):
    return rw16(0x88, lba, n, flags)


def write16(lba, n, flags=0):
    return rw16(0x8A, lba, n, flags)


def caw(lba, n, flags=0):
    return memoryview(bytes([0x89, flags]) + struct.pack(">Q", lba) + bytes([0, 0, 0, n, 0, 0]))


def read_capacity16(alloc=32):
    return memoryview(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", alloc) + b"\0\0")


def get_lba_status(lba, alloc=4096):
    return memoryview(bytes([0x9E, 0x12]) + struct.pack(">QI", lba, alloc) + b"\0\0")


def unmap_cdb(length):
    return cdb16(0x42, 0, 0, 0, 0, 0, 0, length >> 8, length & 0xFF, 0)


def unmap_params(*ranges) -> bytes:
    desc = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(desc) + 6, len(desc)) + desc


def mode_sense6(page=0x3F, pc=0, dbd=False, subpage=0, alloc=255):
    return cdb16(0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0)


def mode_sense10(page=0x3F, pc=0, dbd=False, llbaa=False, alloc=1024):
    return cdb16(0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0), (pc << 6) | page, 0, 0, 0, 0,
                 alloc >> 8, alloc & 0xFF, 0)


def mode_select6(length, pf=True, sp=False):
    return cdb16(0x15, (0x10 if pf else 0) | (1 if sp else 0), 0, 0, length, 0)


def pr_in(action, alloc=1024):
    return cdb16(0x5E, action, 0, 0, 0, 0, 0, alloc >> 8, alloc & 0xFF, 0)


def pr_out(action, rtype=0, scope=0):
    return cdb16(0x5F, action, (scope << 4) | rtype, 0, 0, 0, 0, 0, 24, 0)


def pr_params(key=0, sa_key=0, flags=0) -> bytes:
    return struct.pack(">QQ4xB3x", key, sa_key, flags)


def ready_target(*stores, **kwargs) -> ScsiTarget:
    """A target whose LUNs have already shown nexus(1) its power-on unit attention."""
    t = make_target(*stores, **kwargs)
    for lun in t.luns:
        ready(t, nexus(1), lun=lun)
    return t
