"""A minimal initiator for the transport's unit tests: builds requests, parses what the target sends."""

from __future__ import annotations

import struct

from services.iscsi_target import pdu as P
from services.iscsi_target.access import AccessPolicy
from services.iscsi_target.connection import Connection
from services.iscsi_target.session import SessionTable
from shared.config.iscsi import AuthConfig
from tests.iscsi.fake_scsi import FakeTarget, Nexus

TARGET = "iqn.2026-11.org.test:t"
INITIATOR = "iqn.2026-11.org.test:init"


class Entry:
    def __init__(self, name, scsi, policy, alias=None):
        self.name, self.scsi, self.policy, self.alias = name, scsi, policy, alias


class Registry:
    def __init__(self, policy, scsi=None, discovery=None):
        self.entries = {TARGET: Entry(TARGET, scsi or FakeTarget(TARGET), policy)}
        self.discovery = discovery or policy

    def target(self, name):
        return self.entries.get(name)

    def claim(self, name):
        return name in self.entries

    def discovery_policy(self):
        return self.discovery

    def visible_targets(self, initiator, ip):
        return [n for n, e in self.entries.items() if e.policy.visible_to(initiator, ip)]

    def target_addresses(self, ip, port):
        return [f"{ip}:{port},1"]


def parse_stream(data: bytes, header_digest=False, data_digest=False) -> list:
    reader = P.PduReader(1 << 24)
    reader.header_digest, reader.data_digest = header_digest, data_digest
    pdus, used = reader.feed(memoryview(data))
    assert used == len(data), f"{len(data) - used} trailing bytes"
    for p in pdus:
        assert not isinstance(p, P.PduError), p
        p.data = bytes(p.data)
    return pdus


class Initiator:
    def __init__(self, policy, scsi=None, ip="127.0.0.1", now=0.0, isid=0x800000000001, **kw):
        self.registry = Registry(policy, scsi)
        self.sessions = kw.pop("sessions", SessionTable())
        self.conn = Connection(self.registry, self.sessions, peer_ip=ip, portal=("127.0.0.1", 3260), now=now,
                               nexus_factory=lambda **k: Nexus(**k), **kw)
        self.isid = isid
        self.tsih = 0
        self.itt = 1
        self.cmdsn = 1
        self.statsn = 0
        self.hd = self.dd = False
        self.events: list = []  # every event the connection handed out, in order

    def send(self, raw: bytes, now=0.0) -> list:
        consumed = self.conn.receive(memoryview(raw), now)
        assert consumed == len(raw) or self.conn.closing
        return self.take()

    def take(self) -> list:
        """The PDUs the connection queued since the last call (its events go to `self.events`)."""
        out = b"".join(bytes(b) for b in self.conn.take_output())
        self.events += self.conn.take_events()
        return parse_stream(out, self.hd, self.dd)

    def events_of(self, kind) -> list:
        self.events += self.conn.take_events()
        return [e for e in self.events if isinstance(e, kind)]

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def login_pdu(self, keys, csg, nsg, transit=True, cont=False, version_min=0) -> bytes:
        flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
        return P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=flags, b3=version_min,
                                lun=(self.isid << 16) | self.tsih, itt=self.next_itt(),
                                words=(0, self.cmdsn, self.statsn, 0, 0, 0, 0), data=P.encode_text(keys))

    def login(self, keys=(), security=None, session_type="Normal", target=TARGET) -> P.Pdu:
        """Anonymous login straight into the operational stage; returns the final response."""
        first = [("InitiatorName", INITIATOR), ("SessionType", session_type)]
        if session_type == "Normal":
            first.append(("TargetName", target))
        if security is not None:
            (rsp,) = self.send(self.login_pdu(first + security, 0, 1))
            first = []
            assert rsp.login_status == 0, hex(rsp.login_status)
        (rsp,) = self.send(self.login_pdu(first + list(keys), 1, 3))
        self.after_login(rsp)
        return rsp

    def after_login(self, rsp):
        if rsp.login_status == 0 and rsp.flags & P.F_TRANSIT and (rsp.flags & 3) == 3:
            self.tsih = rsp.tsih
            self.statsn = rsp.statsn + 1
            keys = dict(P.decode_text(rsp.data))
            self.hd = keys.get("HeaderDigest") == "CRC32C"
            self.dd = keys.get("DataDigest") == "CRC32C"

    def cmd(self, cdb: bytes, edtl=0, read=False, write=False, data=b"", final=True, lun=0, immediate=False,
            cmdsn=None, itt=None):
        flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 1
        itt = self.next_itt() if itt is None else itt
        sn = self.cmdsn if cmdsn is None else cmdsn
        if cmdsn is None and not immediate:
            self.cmdsn += 1
        cdb16 = cdb.ljust(16, b"\0")
        words = (edtl, sn, self.statsn) + struct.unpack(">4I", cdb16)
        return itt, P.encode_request(P.OP_SCSI_CMD, immediate=immediate, flags=flags, lun=P.encode_lun(lun), itt=itt,
                                     words=words, data=data, header_digest=self.hd, data_digest=self.dd)

    def data_out(self, itt, ttt, datasn, offset, data, final=True):
        return P.encode_request(P.OP_DATA_OUT, flags=0x80 if final else 0, itt=itt,
                                words=(ttt, 0, self.statsn, 0, datasn, offset, 0), data=data,
                                header_digest=self.hd, data_digest=self.dd)

    def simple(self, opcode, flags=0x80, words_tail=(0, 0, 0, 0), w0=0, data=b"", immediate=False, lun=0, itt=None,
               advance=True):
        itt = self.next_itt() if itt is None else itt
        sn = self.cmdsn
        if advance and not immediate:
            self.cmdsn += 1
        return itt, P.encode_request(opcode, immediate=immediate, flags=flags, lun=lun, itt=itt,
                                     words=(w0, sn, self.statsn) + tuple(words_tail), data=data,
                                     header_digest=self.hd, data_digest=self.dd)


def logged_in(keys=(), **kw) -> "Initiator":
    """An anonymous initiator in full feature phase, having offered these operational keys."""
    ini = Initiator(AccessPolicy(AuthConfig()), **kw)
    rsp = ini.login(list(keys))
    assert rsp.login_status == 0
    return ini


def read10(lba, blocks):
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba, blocks):
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def sense_length(rsp: P.Pdu) -> int:
    """SenseLength: the first two bytes of a SCSI Response's data segment (§11.4.7.2)."""
    return struct.unpack_from(">H", rsp.data)[0]


def sense_of(rsp: P.Pdu) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of the fixed-format sense data in a SCSI Response."""
    sense = rsp.data[2 : 2 + sense_length(rsp)]
    return sense[2] & 0x0F, sense[12], sense[13]
