"""A tiny SCSI layer for the transport's unit tests only (the real one is services/iscsi_target/scsi/).

It speaks the interface the transport uses: data_out_length, execute, plain_read (never: execute answers
every READ), task_management, nexus_lost, luns.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from services.iscsi_target.scsi import sense


@dataclass(frozen=True)
class Nexus:
    initiator_port: str
    target_port: str
    session: int


@dataclass
class ScsiResponse:
    status: int
    sense: bytes | None = None
    data: list = field(default_factory=list)


def _check(code) -> "ScsiResponse":
    """CHECK CONDITION, ILLEGAL REQUEST with this (ASC, ASCQ)."""
    return ScsiResponse(sense.CHECK_CONDITION, sense.fixed_sense(sense.ILLEGAL_REQUEST, *code))


class FakeLun:
    def __init__(self, blocks=2048, block_size=512):
        self.block_size = block_size
        self.data = bytearray(blocks * block_size)


class FakeTarget:
    def __init__(self, name="iqn.2026-11.org.test:t", luns=None):
        self.name = name
        self.luns = luns if luns is not None else {0: FakeLun()}
        self.tmf_calls = []
        self.lost = []
        self.executed = []

    def data_out_length(self, lun, cdb):
        op = cdb[0]
        if op == 0x2A:
            return struct.unpack_from(">H", cdb, 7)[0] * self.luns[lun].block_size
        if op == 0x8A:
            return struct.unpack_from(">I", cdb, 10)[0] * self.luns[lun].block_size
        return 0

    def execute(self, nexus, lun, cdb, data_out):
        self.executed.append((nexus, lun, bytes(cdb)))
        op = cdb[0]
        u = self.luns.get(lun)
        if op == 0x00:
            return ScsiResponse(0)
        if op == 0x12 and cdb[1] & 1:
            if cdb[2] != 0:
                return _check(sense.INVALID_FIELD_IN_CDB)
            return ScsiResponse(0, None, [bytes([0, 0, 0, 1, 0])])
        if op == 0x12:
            inq = bytes([0, 0, 5, 2, 31, 0, 0, 0]) + b"FAKE    " + b"FAKE DISK       " + b"0001"
            alloc = struct.unpack_from(">H", cdb, 3)[0]
            return ScsiResponse(0, None, [inq[:alloc]])
        if op == 0x25:
            return ScsiResponse(0, None, [struct.pack(">II", len(u.data) // u.block_size - 1, u.block_size)])
        if op == 0x9E and (cdb[1] & 0x1F) == 0x10:
            alloc = struct.unpack_from(">I", cdb, 10)[0]
            return ScsiResponse(0, None, [struct.pack(">QI", len(u.data) // u.block_size - 1, u.block_size).ljust(32, b"\0")[:alloc]])
        if op == 0xA0:
            body = b"".join(struct.pack(">HHI", i, 0, 0) for i in sorted(self.luns))
            return ScsiResponse(0, None, [struct.pack(">II", len(body), 0) + body])
        if op == 0x35:
            return ScsiResponse(0)
        if op in (0x28, 0x88):
            if op == 0x28:
                lba, n = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
            else:
                lba, n = struct.unpack_from(">Q", cdb, 2)[0], struct.unpack_from(">I", cdb, 10)[0]
            bs = u.block_size
            if (lba + n) * bs > len(u.data):
                return _check(sense.LBA_OUT_OF_RANGE)
            return ScsiResponse(0, None, [memoryview(u.data)[lba * bs : (lba + n) * bs]])
        if op in (0x2A, 0x8A):
            lba = struct.unpack_from(">I", cdb, 2)[0] if op == 0x2A else struct.unpack_from(">Q", cdb, 2)[0]
            bs = u.block_size
            u.data[lba * bs : lba * bs + len(data_out)] = data_out
            return ScsiResponse(0)
        return _check(sense.INVALID_OPCODE)

    def plain_read(self, nexus, lun, flags, lba, n):
        return None  # every command through execute: what the transport's tests record and check

    def task_management(self, nexus, function, lun, referenced_task=None):
        self.tmf_calls.append((function, lun))
        return 0

    def nexus_lost(self, nexus):
        self.lost.append(nexus)

    def add_lun(self, lun_id, lu):
        self.luns[lun_id] = lu

    def remove_lun(self, lun_id):
        self.luns.pop(lun_id, None)
