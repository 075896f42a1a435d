"""The TFTP sockets: the request socket, a transfer's two sockets, a one-shot answer.

- The request socket (SO_REUSEPORT, so several processes or threads share port 69) reads requests with
  IP_PKTINFO: the address each request came to. A transfer's sockets are bound to that address (port 0: a new
  TID), so replies leave from the address the client spoke to, whatever the routing table says.
- A transfer has two sockets on its port: one connected to the client, which alone receives the client's
  datagrams (the kernel prefers a connected socket), so the hot path is `recv_into`/`sendmsg` with no address
  to format, parse or compare, and an ICMP port-unreachable ends the transfer at once instead of after its
  retries; and one unconnected "catcher" that receives whatever else arrives at the port (a wrong TID),
  answered with error 5 without touching the transfer.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct

from shared.failures import bind

log = logging.getLogger("bootfleet.tftp")

IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux <netinet/in.h>; Python 3.11 does not export it


def request_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    try:
        bind(sock, address, port, "TFTP")  # a refusal says why: `cannot listen on 0.0.0.0:69: address in use ...`
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def pktinfo_address(ancdata, fallback: str) -> str:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= IN_PKTINFO.size:
            _, spec_dst, addr = IN_PKTINFO.unpack_from(data)
            dst = ipaddress.IPv4Address(addr)
            # a broadcast or multicast request is answered from the interface's own address
            if dst.is_multicast or addr == b"\xff\xff\xff\xff" or dst.packed[3] == 255:
                return str(ipaddress.IPv4Address(spec_dst))
            return str(dst)
    return fallback


def transfer_sockets(local: str, peer, sndbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    """-> (connected, catcher): a new port (the TID) on the request's address, two sockets on it; `sndbuf`
    bytes of send buffer for the connected one (0: the system's), room for a window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    catcher = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # the port is chosen without SO_REUSEADDR, so it is one nobody holds; the flag is on only while the
        # catcher joins it, so no later socket of anyone else can share the port either
        sock.bind((local, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        catcher.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        catcher.bind(sock.getsockname())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        catcher.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        sock.connect(peer)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setblocking(False)
        catcher.setblocking(False)
    except OSError:
        sock.close()
        catcher.close()
        raise
    return sock, catcher


def send_once(local: str, peer, packet: bytes) -> None:
    # a reply outside a transfer leaves from a new TID on the address the request came to
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((local, 0))
            s.sendto(packet, peer)
    except OSError as exc:
        log.debug("could not answer %s:%d: %s", *peer, exc)
