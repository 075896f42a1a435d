"""The DHCPv4 message codec (RFC 2131 section 2, RFC 2132 options, RFC 3396 long options, option overload).

Sans-IO: bytes in, a `Message` out; a reply's fixed header plus pre-encoded option bytes in, bytes out.
Addresses stay 32-bit integers, the form the allocator and lease store work in.
"""

from __future__ import annotations

import ipaddress
import struct

from services.dhcp import options as opt

# op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file magic
HEADER = struct.Struct("!BBBBIHHIIII16s64s128sI")
HEADER_LEN = HEADER.size  # 240, magic cookie included
MAGIC = 0x63825363
BOOTREQUEST = 1
BOOTREPLY = 2
BROADCAST_FLAG = 0x8000
MIN_REPLY = 300  # BOOTP's minimum; some PXE ROMs drop shorter replies

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE", 8: "INFORM"}


def ip_int(text: str) -> int:
    """Dotted quad -> the 32-bit integer the codec, allocator and lease table use."""
    return int(ipaddress.IPv4Address(text))


def ip_str(value: int) -> str:
    # formatted here rather than with socket.inet_ntoa: the codec and the core import no socket module
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


class PacketError(ValueError):
    """A datagram that is not a usable DHCP message; the text says what is wrong with it."""


class Message:
    __slots__ = (
        "op", "htype", "hlen", "hops", "xid", "secs", "flags", "ciaddr", "yiaddr", "siaddr", "giaddr",
        "chaddr", "sname", "file", "options", "msg_type",
    )

    def __init__(self, op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file, options):
        self.op = op
        self.htype = htype
        self.hlen = hlen
        self.hops = hops
        self.xid = xid
        self.secs = secs
        self.flags = flags
        self.ciaddr = ciaddr
        self.yiaddr = yiaddr
        self.siaddr = siaddr
        self.giaddr = giaddr
        self.chaddr = chaddr
        self.sname = sname
        self.file = file
        self.options = options
        mt = options.get(opt.MESSAGE_TYPE)
        self.msg_type = mt[0] if mt and len(mt) == 1 else 0

    @property
    def mac(self) -> str:
        return self.chaddr[: self.hlen].hex(":")

    @property
    def hwaddr(self) -> bytes:
        return self.chaddr[: self.hlen]

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    def __repr__(self) -> str:
        return f"<DHCP {MESSAGE_NAMES.get(self.msg_type, self.msg_type)} xid={self.xid:#x} mac={self.mac}>"


def _parse_options(data, start: int, end: int, out: dict[int, bytes], where: str) -> None:
    i = start
    while i < end:
        code = data[i]
        if code == opt.END:
            return
        if code == opt.PAD:
            i += 1
            continue
        if i + 1 >= end:
            raise PacketError(f"option {code} in {where} is truncated (no length byte)")
        length = data[i + 1]
        j = i + 2 + length
        if j > end:
            raise PacketError(f"option {code} in {where} claims {length} bytes, only {end - i - 2} remain")
        value = bytes(data[i + 2 : j])
        # RFC 3396: repeated instances of an option are concatenated
        prev = out.get(code)
        out[code] = value if prev is None else prev + value
        i = j


def parse(data) -> Message:
    """A received datagram -> Message. Raises PacketError naming the problem."""
    n = len(data)
    if n < HEADER_LEN:
        raise PacketError(f"{n} bytes is shorter than a DHCP header ({HEADER_LEN} bytes with the magic cookie)")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file, magic) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PacketError(f"magic cookie {magic:#010x} is not DHCP's {MAGIC:#010x} (BOOTP is not served)")
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise PacketError(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
    if hlen > 16:
        raise PacketError(f"hlen {hlen} exceeds the 16-byte chaddr field")
    options: dict[int, bytes] = {}
    _parse_options(data, HEADER_LEN, n, options, "options")
    overload = options.get(opt.OVERLOAD)
    if overload:
        # RFC 2132 9.3: options continue in file (1), sname (2) or both (3)
        if overload[0] & 1:
            _parse_options(file, 0, len(file), options, "file (overloaded)")
            file = b""
        if overload[0] & 2:
            _parse_options(sname, 0, len(sname), options, "sname (overloaded)")
            sname = b""
    return Message(op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file, options)


def build(
    msg: Message,
    yiaddr: int,
    siaddr: int,
    ciaddr: int,
    flags: int,
    sname: bytes,
    file: bytes,
    option_bytes: bytes,
) -> bytes:
    """A BOOTREPLY to `msg`: its xid, giaddr, chaddr and hops; options already encoded (without END)."""
    head = HEADER.pack(
        BOOTREPLY, msg.htype, msg.hlen, msg.hops, msg.xid, 0, flags, ciaddr, yiaddr, siaddr, msg.giaddr,
        msg.chaddr, sname, file, MAGIC,
    )
    out = head + option_bytes + b"\xff"
    if len(out) < MIN_REPLY:
        out += bytes(MIN_REPLY - len(out))
    return out


def build_request(
    msg_type: int,
    mac: bytes,
    xid: int = 0x1234,
    options: dict[int, bytes] | None = None,
    ciaddr: int = 0,
    giaddr: int = 0,
    flags: int = 0,
    hops: int = 0,
) -> bytes:
    """A client's BOOTREQUEST (tests, the bench, the self-test)."""
    chaddr = mac.ljust(16, b"\0")
    body = bytes((opt.MESSAGE_TYPE, 1, msg_type))
    for code, value in (options or {}).items():
        body += opt.tlv(code, value)
    head = HEADER.pack(BOOTREQUEST, 1, len(mac), hops, xid, 0, flags, ciaddr, 0, 0, giaddr, chaddr, b"", b"", MAGIC)
    return head + body + b"\xff"
