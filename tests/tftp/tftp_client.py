"""A small raw TFTP client for the integration tests: exact packets, exact answers."""

from __future__ import annotations

import socket
import time

from services.tftp import packets as pk


class TftpError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"error {code}: {message}")
        self.code = code
        self.message = message


def request(port: int, name: str, options: dict | None = None, opcode: int = pk.RRQ, mode: str = "octet",
            host: str = "127.0.0.1", timeout: float = 5.0) -> tuple[socket.socket, bytes, tuple]:
    """Send a request; -> (socket, first reply, the server's TID address)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.bind(("127.0.0.1", 0))
    s.sendto(pk.build_request(opcode, name, mode, options), (host, port))
    data, addr = s.recvfrom(70000)
    return s, data, addr


def fetch(port: int, name: str, options: dict | None = None, mode: str = "octet", host: str = "127.0.0.1",
          timeout: float = 5.0) -> tuple[bytes, dict]:
    """A lock-step download; -> (content, OACK options). Raises TftpError on an ERROR."""
    s, data, server = request(port, name, options, mode=mode, host=host, timeout=timeout)
    with s:
        blksize, oack, chunks, expected = 512, {}, [], 1
        while True:
            op = pk.opcode_of(data)
            if op == pk.ERROR:
                raise TftpError(*pk.parse_error(data))
            if op == pk.OACK:
                oack = pk.parse_oack(data)
                blksize = int(oack.get("blksize", 512))
                s.sendto(pk.build_ack(0), server)
            elif op == pk.DATA:
                block = pk.HEADER.unpack_from(data)[1]
                if block == expected & 0xFFFF:
                    chunks.append(data[4:])
                    s.sendto(pk.build_ack(block), server)
                    expected += 1
                    if len(data) - 4 < blksize:
                        return b"".join(chunks), oack
            data, addr = s.recvfrom(70000)
            assert addr == server, f"reply from {addr}, expected the transfer's TID {server}"


def wait_ready(port: int, host: str = "127.0.0.1", deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            fetch(port, "--probe--", host=host, timeout=0.3)
        except TftpError:
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"TFTP server on {host}:{port} did not answer")
