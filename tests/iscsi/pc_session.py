"""A small blocking iSCSI initiator over TCP for the tests and benchmarks of PCs on images: one session
with a chosen initiator name and ISID, commands one at a time (queue depth 1), immediate data only
(writes up to 64 KiB, the default FirstBurstLength), logout."""

from __future__ import annotations

import socket
import struct

from services.iscsi_target import pdu as P

_READ10 = struct.Struct(">BBIBHB")


def read10(lba: int, blocks: int) -> bytes:
    return _READ10.pack(0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _READ10.pack(0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


SYNC10 = bytes([0x35]) + bytes(9)
TUR = bytes(6)


class LoginRefused(Exception):
    def __init__(self, status: int):
        super().__init__(f"login refused: status 0x{status:04x}")
        self.status = status


class PcSession:
    def __init__(self, port: int, target: str, initiator: str, isid: int = 0x800000000001, host="127.0.0.1",
                 timeout: float = 10.0, clear_ua: bool = True):
        self.s = socket.create_connection((host, port), timeout=timeout)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keys = [("InitiatorName", initiator), ("TargetName", target), ("SessionType", "Normal"),
                ("MaxRecvDataSegmentLength", "262144")]
        self.s.sendall(P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, lun=isid << 16, itt=1,
                                        words=(0, 1, 0, 0, 0, 0, 0), data=P.encode_text(keys)))
        head, _ = self._pdu()
        status = struct.unpack_from(">H", head, 36)[0]
        if status:
            self.s.close()
            raise LoginRefused(status)
        self.statsn = struct.unpack_from(">I", head, 24)[0] + 1
        self.cmdsn, self.itt = 1, 2
        if clear_ua:  # as initiators do: TEST UNIT READY takes the power-on unit attention
            for _ in range(4):
                if self.command(TUR)[0] == 0:
                    break

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the target closed the connection")
            buf += chunk
        return bytes(buf)

    def _pdu(self):
        head = self._recv(48)
        length = int.from_bytes(head[5:8], "big")
        body = self._recv(P.padded(length))[:length] if length else b""
        return head, body

    def command(self, cdb: bytes, read_length: int = 0, data: bytes = b""):
        """(status, sense, data) of one command."""
        flags = 0x80 | (0x40 if read_length else 0) | (0x20 if data else 0) | 1
        edtl = read_length or len(data)
        words = (edtl, self.cmdsn, self.statsn) + struct.unpack(">4I", cdb.ljust(16, b"\0"))
        self.s.sendall(P.encode_request(P.OP_SCSI_CMD, flags=flags, itt=self.itt, words=words, data=data))
        self.cmdsn += 1
        self.itt += 1
        out = []
        while True:
            head, body = self._pdu()
            op = head[0] & 0x3F
            if op in (P.OP_NOP_IN, P.OP_ASYNC):
                continue
            if op == P.OP_DATA_IN:
                out.append(body)
                if head[1] & 0x01:  # S: the status came with the data
                    self.statsn = struct.unpack_from(">I", head, 24)[0] + 1
                    return head[3], b"", b"".join(out)
                continue
            assert op == P.OP_SCSI_RSP, hex(op)
            self.statsn = struct.unpack_from(">I", head, 24)[0] + 1
            sense = body[2:2 + int.from_bytes(body[:2], "big")] if body else b""
            return head[3], sense, b"".join(out)

    def read(self, lba: int, blocks: int, block_size: int = 512) -> bytes:
        status, sense, data = self.command(read10(lba, blocks), blocks * block_size)
        assert status == 0, (status, sense_code(sense))
        return data

    def write(self, lba: int, data: bytes, block_size: int = 512, fua: bool = False):
        """(status, (key, asc, ascq) or None)."""
        status, sense, _ = self.command(write10(lba, len(data) // block_size, fua), data=data)
        return status, sense_code(sense) if sense else None

    def logout(self) -> None:
        self.s.sendall(P.encode_request(P.OP_LOGOUT_REQ, immediate=True, flags=0x80, itt=self.itt,
                                        words=(0, self.cmdsn, self.statsn, 0, 0, 0, 0)))
        try:
            while True:
                head, _ = self._pdu()
                if head[0] & 0x3F == P.OP_LOGOUT_RSP:
                    break
        except (ConnectionError, OSError):
            pass
        self.s.close()

    def close(self) -> None:
        self.s.close()


def sense_code(sense: bytes) -> tuple[int, int, int]:
    return sense[2] & 0x0F, sense[12], sense[13]
