"""A yardstick, not a server: the least a CPython loop can do per TFTP packet, for bench/tftp.py --floor.

    python bench/yardsticks/tftp_floor.py PORT FILE [PROCESSES]

Serves the one FILE, to read requests for its base name, on 127.0.0.1:PORT only, from PROCESSES processes
sharing the port (SO_REUSEPORT). Per ACK: one epoll wake-up shared by the ready sockets, one recv_into, one
sendmsg from memory. No timers, no retransmission, no duplicate or wrong-TID checks, no events, no windowsize:
what the real server (services/tftp) does on top of this is what its ratio to this loop measures. Stops on
SIGTERM to its process group.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys

HEADER = struct.Struct("!HH")


def serve(port: int, path: str) -> None:
    with open(path, "rb") as f:
        data = memoryview(f.read())
    size = len(data)
    name = os.path.basename(path).encode()
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
                fields = request[2:].split(b"\0")
                if request[:2] != b"\0\1" or fields[0].lstrip(b"/") != name:
                    listener.sendto(b"\0\5\0\1not found\0", peer)
                    continue
                options = {k.lower(): v for k, v in zip(fields[2::2], fields[3::2])}
                blksize = int(options.get(b"blksize", b"512"))
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.1", 0))
                sock.connect(peer)
                sock.setblocking(False)
                first = 0 if b"blksize" in options else 1  # block 0 is the OACK
                slots[sock.fileno()] = [sock, blksize, size // blksize + 1, first]
                ep.register(sock.fileno(), select.EPOLLIN)
                sock.send(b"\0\6blksize\0%d\0" % blksize if first == 0 else pack(3, 1) + data[:512])
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


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    processes = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    for _ in range(processes - 1):
        if os.fork() == 0:
            break
    serve(port, path)


if __name__ == "__main__":
    main()
