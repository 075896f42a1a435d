"""A yardstick, not a server: the least CPython can do per TFTP packet, for bench/tftp.py --floor.

    python bench/yardsticks/tftp_floor.py PORT FILE [PROCESSES | fork]

Serves the one FILE, to read requests for its base name, on 127.0.0.1:PORT only, in one of two shapes:
- PROCESSES (default 1) processes sharing the port (SO_REUSEPORT), each one epoll loop: per ACK one wake-up
  shared by the ready sockets, one recv_into, one sendmsg from memory;
- `fork`: tftpd-hpa's shape, a process per transfer on a blocking socket (recv_into, sendmsg).
No retransmission, no wrong-TID check, no events, no windowsize; a duplicate ACK is ignored. What the real
server (services/tftp) does on top of the loop is what its ratio to the first shape measures; the second shows
what the shape of the server is worth. Stops on SIGTERM to its process group (forked transfers included).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import sys

HEADER = struct.Struct("!HH")
STALL = 5.0  # s: a forked transfer whose client went silent ends


def load(path: str) -> tuple[memoryview, bytes]:
    with open(path, "rb") as f:
        return memoryview(f.read()), os.path.basename(path).encode()


def parse(request: bytes, name: bytes) -> tuple[int, bool] | None:
    """-> (blksize, whether it was asked: then the first answer is an OACK), or None: not a read of our file."""
    fields = request[2:].split(b"\0")
    if request[:2] != b"\0\1" or fields[0].lstrip(b"/") != name:
        return None
    options = {k.lower(): v for k, v in zip(fields[2::2], fields[3::2])}
    return int(options.get(b"blksize", b"512")), b"blksize" in options


def open_transfer(peer, blksize: int, asked: bool, data: memoryview) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.connect(peer)
    sock.send(b"\0\6blksize\0%d\0" % blksize if asked else HEADER.pack(3, 1) + data[:512])
    return sock


def serve_loop(port: int, data: memoryview, name: bytes) -> None:
    size = len(data)
    pack, unpack = HEADER.pack, HEADER.unpack_from
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    slots: dict[int, list] = {}  # fd -> [socket connected to the client, blksize, blocks in all, last block sent]
    buf = bytearray(2048)
    while True:
        for fd, _ in ep.poll():
            slot = slots.get(fd)
            if slot is None:
                try:
                    request, peer = listener.recvfrom(1024)
                except BlockingIOError:
                    continue
                asked = parse(request, name)
                if asked is None:
                    listener.sendto(b"\0\5\0\1not found\0", peer)
                    continue
                blksize, oack = asked
                sock = open_transfer(peer, blksize, oack, data)
                sock.setblocking(False)
                slots[sock.fileno()] = [sock, blksize, size // blksize + 1, 0 if oack else 1]
                ep.register(sock.fileno(), select.EPOLLIN)
                continue
            sock, blksize, total, sent = slot
            sock.recv_into(buf)
            if unpack(buf)[1] != sent & 0xFFFF:
                continue  # a duplicate ACK
            block = slot[3] = sent + 1
            if block > total:
                ep.unregister(fd)
                sock.close()
                del slots[fd]
                continue
            offset = (block - 1) * blksize
            sock.sendmsg([pack(3, block & 0xFFFF), data[offset:offset + blksize]])


def serve_one(sock: socket.socket, blksize: int, sent: int, data: memoryview) -> None:
    """A forked transfer: blocking lock-step until the last ACK (or a silent client). The ACK step is written out
    here as in serve_loop on purpose: a shared function would add a call per packet to what the floor measures."""
    pack, unpack = HEADER.pack, HEADER.unpack_from
    total = len(data) // blksize + 1
    recv_into, sendmsg = sock.recv_into, sock.sendmsg
    sock.settimeout(STALL)
    buf = bytearray(2048)
    while True:
        try:
            recv_into(buf)
        except OSError:
            return
        if unpack(buf)[1] != sent & 0xFFFF:
            continue  # a duplicate ACK
        sent += 1
        if sent > total:
            return
        offset = (sent - 1) * blksize
        sendmsg([pack(3, sent & 0xFFFF), data[offset:offset + blksize]])


def serve_forking(port: int, data: memoryview, name: bytes) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished transfers
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", port))
    while True:
        request, peer = listener.recvfrom(1024)
        asked = parse(request, name)
        if asked is None:
            listener.sendto(b"\0\5\0\1not found\0", peer)
            continue
        if os.fork() == 0:
            listener.close()
            blksize, oack = asked
            try:
                serve_one(open_transfer(peer, blksize, oack, data), blksize, 0 if oack else 1, data)
            finally:
                os._exit(0)


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    shape = sys.argv[3] if len(sys.argv) > 3 else "1"
    data, name = load(path)
    if shape == "fork":
        serve_forking(port, data, name)
        return
    for _ in range(int(shape) - 1):
        if os.fork() == 0:
            break
    serve_loop(port, data, name)


if __name__ == "__main__":
    main()
