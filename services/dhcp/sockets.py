"""The Linux socket calls of the DHCP I/O loop: a UDP socket per interface, ARP entries, Router Advertisements.

Each socket is bound to 0.0.0.0:67 and to its interface (SO_BINDTODEVICE), so the service hears only the
interfaces the configuration names and every reply leaves by the interface its request came in on.
Replies to a client with no address and the broadcast flag clear are unicast to yiaddr after an ARP entry
yiaddr -> chaddr is put in the kernel's table (SIOCSARP, as dnsmasq does): the kernel cannot ARP for an address
nobody holds yet. Linux-only; needs CAP_NET_ADMIN and CAP_NET_RAW like any DHCP server.
"""

from __future__ import annotations

import fcntl
import socket
import struct

from shared.failures import ListenError, listen_reason

SIOCGIFADDR = 0x8915
SIOCGIFHWADDR = 0x8927
SIOCSARP = 0x8955
ATF_COM = 0x02
ARPHRD_ETHER = 1
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IPV6_JOIN_GROUP = getattr(socket, "IPV6_JOIN_GROUP", 20)
ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"


def interface_address(sock: socket.socket, name: str) -> int | None:
    """The interface's primary IPv4 address as an integer, None if it has none."""
    try:
        res = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("16s16x", name.encode()))
    except OSError:
        return None
    return struct.unpack_from("!I", res, 20)[0]


def interface_mac(sock: socket.socket, name: str) -> bytes:
    try:
        res = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, struct.pack("16s16x", name.encode()))
    except OSError:
        return b""
    return res[18:24]


def open_dhcp_socket(name: str, port: int = 67) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, name.encode())
        # enough for a storm of thousands; not so deep that an overload queues seconds of stale requests
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        # the sentence `bootfleet status` shows: `cannot listen on 0.0.0.0:67 on eth1: address in use (...)`
        raise ListenError(exc.errno, listen_reason("0.0.0.0", port, exc, "DHCP", device=name)) from None
    return sock


def add_arp_entry(sock: socket.socket, iface: str, ip: int, mac: bytes) -> bool:
    """Put ip -> mac in the ARP table of `iface` so a unicast reply can reach a client with no address yet."""
    # struct arpreq { sockaddr arp_pa; sockaddr arp_ha; int arp_flags; sockaddr arp_netmask; char arp_dev[16]; }
    pa = struct.pack("=H2sI8x", socket.AF_INET, b"\0\0", socket.htonl(ip))
    ha = struct.pack("=H14s", ARPHRD_ETHER, mac[:6].ljust(14, b"\0"))
    req = pa + ha + struct.pack("=i", ATF_COM) + bytes(16) + iface.encode()[:15].ljust(16, b"\0")
    try:
        fcntl.ioctl(sock.fileno(), SIOCSARP, req)
        return True
    except OSError:
        return False


def open_ra_socket(name: str) -> tuple[socket.socket, int]:
    """A raw ICMPv6 socket on `name` that hears Router Solicitations (joined to ff02::2)."""
    ifindex = socket.if_nametoindex(name)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, name.encode())
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)  # RFC 4861: NDP hop limit 255
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        mreq = socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("@I", ifindex)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_JOIN_GROUP, mreq)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, ifindex
