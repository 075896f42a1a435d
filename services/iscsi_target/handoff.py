"""Handing an accepted TCP connection to another target process: `<state>/iscsi/handoff-<instance>.sock`.

Each process binds a Unix datagram socket in a directory only its user can enter (0700). A hand-over is
one datagram: a 2-byte header (version, hops) and the bytes already read from the connection (its first
Login PDU), with the TCP socket's descriptor attached (SCM_RIGHTS). The receiver starts the connection
with those bytes in its receive buffer and reads the socket itself from then on: nothing is proxied, the
data path is the one of a directly accepted connection.

Datagram rather than SOCK_SEQPACKET: a hand-over needs no answer (the receiver forwards a connection it
cannot own to the lock's holder itself), so a connection per hand-over and an accept thread would buy
nothing; the kernel still reports a dead receiver to the sender (ECONNREFUSED: no one bound; ENOENT: never
bound), which is how the sender moves on to the next instance. Unix datagrams are never dropped: a full
queue blocks the sender (a connection thread, never the accept loop).

Socket paths are reached through /proc/self/fd/<directory fd>/ so that a long state directory never meets
the 108-byte limit of sun_path.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import threading
from pathlib import Path

log = logging.getLogger("bootfleet.iscsi_target.handoff")

VERSION = 1
MAX_PREFIX = 48 + 1020 + 8192  # a first Login PDU: BHS, AHS, data up to the login-phase MaxRecvDataSegmentLength
MAX_MESSAGE = 2 + MAX_PREFIX
_DEAD = (errno.ECONNREFUSED, errno.ENOENT)


def socket_name(instance: int) -> str:
    return f"handoff-{instance}.sock"


class Handoff:
    """This process's hand-over socket. `on_connection(sock, prefix, hops)` is called (on the receiving
    thread) for each connection handed to us."""

    def __init__(self, directory: Path, instance: int, on_connection):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.instance = instance
        self.on_connection = on_connection
        self._dir_fd = os.open(self.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = self._address(instance)
        try:
            os.unlink(address)  # a previous process of this instance left it (kill -9)
        except FileNotFoundError:
            pass
        self._sock.bind(address)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.closed = False
        self.received = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name=f"iscsi-handoff-{instance}", daemon=True)
        self._thread.start()

    def _address(self, instance: int) -> str:
        return f"/proc/self/fd/{self._dir_fd}/{socket_name(instance)}"

    def send(self, instance: int, conn: socket.socket, prefix, hops: int = 0) -> bool:
        """Hand `conn` (and the bytes read from it) to `instance`; True when it took it (then close our copy),
        False when that instance is not running."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendmsg([bytes((VERSION, hops)), prefix],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))],
                          0, self._address(instance))
            except OSError as exc:
                if exc.errno in _DEAD:
                    return False
                raise
        self.sent += 1
        return True

    def _run(self) -> None:
        fd_space = socket.CMSG_SPACE(4 * array.array("i").itemsize)
        while not self.closed:
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(MAX_MESSAGE, fd_space)
            except OSError:
                if self.closed:
                    return
                log.exception("hand-over receive failed")
                continue
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not fds:
                continue  # the close() wake-up, or junk
            for extra in fds[1:]:
                os.close(extra)
            if len(data) < 2 or data[0] != VERSION or flags & socket.MSG_TRUNC:
                os.close(fds[0])
                log.warning("dropped a malformed hand-over (%d bytes)", len(data))
                continue
            try:
                conn = socket.socket(fileno=fds[0])
            except OSError:
                os.close(fds[0])
                continue
            self.received += 1
            try:
                self.on_connection(conn, memoryview(data)[2:], data[1])
            except Exception:  # noqa: BLE001 - one bad hand-over must not stop the receiver
                log.exception("could not start a handed-over connection")
                conn.close()

    def close(self) -> None:
        self.closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self._address(self.instance))
        except OSError:
            pass
        self._thread.join(2)
        os.close(self._dir_fd)
