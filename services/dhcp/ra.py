"""A Router Advertisement that only ends iPXE's IPv6 autoconfiguration wait (sans-IO).

iPXE (src/net/ndp.c, ipv6conf_rx_router_advertisement) stops soliciting as soon as the first RA arrives; if
neither M (managed) nor O (other) is set it finishes IPv6 configuration at once instead of waiting ~15 s for an
RA an IPv4-only boot LAN never sends. This RA says: router lifetime 0 (not a default router), no prefix
information (no address to form), M and O clear (no DHCPv6). It announces nothing else.
"""

from __future__ import annotations

import struct

ICMPV6_ROUTER_SOLICITATION = 133
ICMPV6_ROUTER_ADVERTISEMENT = 134
_RA = struct.Struct("!BBHBBHII")  # type code checksum cur-hop-limit flags router-lifetime reachable retrans
_LLADDR_OPT = 1  # source link-layer address


def build_ra(mac: bytes) -> bytes:
    """The ICMPv6 message (the kernel fills in the checksum on an IPPROTO_ICMPV6 raw socket)."""
    body = _RA.pack(ICMPV6_ROUTER_ADVERTISEMENT, 0, 0, 0, 0, 0, 0, 0)
    if len(mac) == 6:
        body += bytes((_LLADDR_OPT, 1)) + mac
    return body


def is_router_solicitation(data: bytes) -> bool:
    return len(data) >= 8 and data[0] == ICMPV6_ROUTER_SOLICITATION and data[1] == 0


def parse_ra(data: bytes) -> dict:
    """Fields of an RA (tests): flags, router_lifetime, options as (type, bytes)."""
    if len(data) < _RA.size or data[0] != ICMPV6_ROUTER_ADVERTISEMENT:
        raise ValueError("not a router advertisement")
    _t, _c, _ck, hop, flags, lifetime, reach, retrans = _RA.unpack_from(data)
    opts = []
    i = _RA.size
    while i + 2 <= len(data):
        length = data[i + 1] * 8
        if length == 0 or i + length > len(data):
            raise ValueError("malformed RA option")
        opts.append((data[i], data[i + 2 : i + length]))
        i += length
    return {"hop_limit": hop, "managed": bool(flags & 0x80), "other": bool(flags & 0x40),
            "router_lifetime": lifetime, "reachable": reach, "retrans": retrans, "options": opts}
