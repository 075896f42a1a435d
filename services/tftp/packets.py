"""TFTP packets (RFC 1350, 2347): a lean codec of our own, checked against tftpy's in the tests.

Why not tftpy's classes on the wire: its request decoder refuses an empty option value (RFC 2090 `multicast`
is sent empty, so a PXE ROM asking it would be refused), walks the request byte by byte building a struct
format, and logs at debug on every call; its ERROR encoder drops the message text. tftpy stays the reference:
tests decode what tftpy encodes and let tftpy decode what we encode. Everything here is precompiled structs
and `bytes.split`: DATA and ACK headers are 4 bytes packed with one `Struct`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
OPCODE_NAMES = {RRQ: "RRQ", WRQ: "WRQ", DATA: "DATA", ACK: "ACK", ERROR: "ERROR", OACK: "OACK"}

# error codes (RFC 1350, 2347)
ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_DISK_FULL = 3
ERR_ILLEGAL = 4
ERR_UNKNOWN_TID = 5
ERR_EXISTS = 6
ERR_NO_USER = 7
ERR_OPTIONS = 8

MODES = ("octet", "netascii", "mail")
MAX_REQUEST = 512  # RFC 2347: a request with options must fit in 512 bytes

HEADER = struct.Struct("!HH")  # opcode + block (DATA, ACK) or opcode + error code (ERROR)
OPCODE = struct.Struct("!H")



class MalformedPacket(ValueError):
    """A datagram that is not a valid TFTP packet; the message names what is wrong."""


@dataclass
class Request:
    opcode: int  # RRQ or WRQ
    filename: str
    mode: str  # lower case: octet, netascii, mail
    options: dict[str, str] = field(default_factory=dict)  # names lower case (RFC 2347: case-insensitive)


def opcode_of(data: bytes | memoryview) -> int:
    if len(data) < 2:
        raise MalformedPacket(f"{len(data)}-byte datagram is shorter than an opcode")
    return OPCODE.unpack_from(data)[0]


def parse_request(data: bytes) -> Request:
    """Decode an RRQ or WRQ; raise MalformedPacket with a reason for anything else."""
    data = bytes(data)
    op = opcode_of(data)
    if op not in (RRQ, WRQ):
        raise MalformedPacket(f"opcode {op} ({OPCODE_NAMES.get(op, 'unknown')}) is not a request")
    if len(data) > MAX_REQUEST:
        raise MalformedPacket(f"{OPCODE_NAMES[op]} of {len(data)} bytes is longer than {MAX_REQUEST}")
    if not data.endswith(b"\0"):
        raise MalformedPacket(f"{OPCODE_NAMES[op]} does not end with a NUL")
    fields = data[2:-1].split(b"\0")
    if len(fields) < 2:
        raise MalformedPacket(f"{OPCODE_NAMES[op]} has no mode")
    if len(fields) % 2:
        raise MalformedPacket(f"{OPCODE_NAMES[op]} option {fields[-1][:20]!r} has no value")
    try:
        filename, mode = fields[0].decode("ascii"), fields[1].decode("ascii").lower()
        pairs = [(fields[i].decode("ascii"), fields[i + 1].decode("ascii")) for i in range(2, len(fields), 2)]
    except UnicodeDecodeError as exc:
        raise MalformedPacket(f"{OPCODE_NAMES[op]} holds a non-ASCII byte at {exc.start}") from None
    if not filename:
        raise MalformedPacket(f"{OPCODE_NAMES[op]} has an empty file name")
    if mode not in MODES:
        raise MalformedPacket(f"{OPCODE_NAMES[op]} mode {mode!r} is not octet, netascii or mail")
    if any(not name for name, _ in pairs):
        raise MalformedPacket(f"{OPCODE_NAMES[op]} has an option with an empty name")
    lowered: dict[str, str] = {}
    for name, value in pairs:
        lowered.setdefault(name.lower(), value)  # a repeated option: the first one counts
    return Request(op, filename, mode, lowered)


def build_request(opcode: int, filename: str, mode: str = "octet", options: dict[str, object] | None = None) -> bytes:
    """For tests and clients: RRQ/WRQ bytes."""
    parts = [filename.encode(), mode.encode()]
    for name, value in (options or {}).items():
        parts += [name.encode(), str(value).encode()]
    return OPCODE.pack(opcode) + b"".join(p + b"\0" for p in parts)


def build_oack(options: dict[str, object]) -> bytes:
    body = b"".join(f"{name}\0{value}\0".encode() for name, value in options.items())
    return OPCODE.pack(OACK) + body


def parse_oack(data: bytes) -> dict[str, str]:
    fields = bytes(data[2:]).split(b"\0")
    if fields[-1] != b"" or len(fields) % 2 != 1:
        raise MalformedPacket("OACK options are not NUL-terminated name/value pairs")
    return {fields[i].decode().lower(): fields[i + 1].decode() for i in range(0, len(fields) - 1, 2)}


def build_error(code: int, message: str) -> bytes:
    return HEADER.pack(ERROR, code) + message.encode("ascii", "replace")[:400] + b"\0"


def parse_error(data: bytes | memoryview) -> tuple[int, str]:
    if len(data) < 4:
        raise MalformedPacket(f"ERROR of {len(data)} bytes is shorter than 4")
    code = HEADER.unpack_from(data)[1]
    message = bytes(data[4:]).split(b"\0", 1)[0].decode("ascii", "replace")
    return code, message


def build_ack(block: int) -> bytes:
    return HEADER.pack(ACK, block & 0xFFFF)


def data_header(block: int) -> bytes:
    return HEADER.pack(DATA, block & 0xFFFF)
