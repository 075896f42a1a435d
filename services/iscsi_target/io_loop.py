"""The iSCSI target's I/O: listening sockets, a thread per connection until full feature phase, then one
shared event loop per process (event_loop.py) for every connection in full feature phase.

Measured facts it follows (docs/iscsi.md, design brief): receive into one preallocated buffer with
`recv_into`; hand everything one receive returned to the sans-IO `Connection`; send all its answers in
one `sendmsg` scatter list (READ data stays slices of the mmap'd image, never copied).

The hybrid (issue 13): a connection's own thread does what may block or wait: reading its first PDU,
routing it or handing it to the target's owner (scaled processes), the whole login (a PC's login may wait
up to 10 s for its dead sessions, which end in the loop) and session reinstatement. Its socket is blocking
with SO_RCVTIMEO of one second, so a silent connection wakes once a second for its timers. Once the login
has completed the socket turns non-blocking and moves, with its receive buffer, to the loop, and the thread
ends. In the boot storm (20 PCs reading at QD1) the thread per connection cost about four context switches
per command and 70-120 us of CPU against ~30 us of work; the loop waits for all of them in one epoll_wait.
With `busy_poll_us` > 0 a connection stays in its thread: it spins on a non-blocking receive for that long
before sleeping while I/O flows, which is what a thread of its own is for (and what wins at QD1 when a core
can be spent on it).

Both halves hold the runner's lock while they touch its `Connection`, as do the service's threads
(`request_logout`, `update_settings`); `abort` from any thread is a shutdown() of the socket, which the
connection's thread or the loop sees as the end of the stream.

Listening sockets set SO_REUSEPORT so several processes can share port 3260 when scaled. Then a target's
connections must all reach its owner (owners.py): with a `Router`, a connection's thread first reads exactly
its first Login PDU and either serves it here or hands the socket and those bytes to the owner
(handoff.py); a handed-over connection starts with them in its receive buffer and is from then on read
like any other.
"""

from __future__ import annotations

import errno
import logging
import mmap
import socket
import struct
import threading
import time

from dataclasses import dataclass

from services.iscsi_target import owners
from services.iscsi_target.connection import FULL, Connection
from services.iscsi_target.event_loop import HUP_ERR, EventLoop
from services.iscsi_target.handoff import MAX_PREFIX
from services.iscsi_target.pdu import BHS_LEN
from services.iscsi_target.session import SessionTable
from shared.failures import bind

log = logging.getLogger("bootfleet.iscsi_target.io_loop")

RECV_BUFFER = 1 << 20  # grows up to one PDU's size if a PDU is larger
IOV_MAX = 1024
SEND_TIMEOUT = 30.0
FIRST_PDU_TIMEOUT = 10.0  # seconds an accepted connection may take to send its first Login PDU


@dataclass
class Router:
    """What a scaled process needs to route connections to targets' owners: its lock files
    (owner_locks.OwnerLocks), its hand-over socket (handoff.Handoff), its instance number and a callable
    giving the current scale."""

    locks: object
    handoff: object
    instance: int
    instances: object  # () -> int


def _unsent(bufs: list, sent: int) -> list:
    """What is left of a scatter list after a sendmsg that took `sent` bytes of it."""
    i = 0
    n = len(bufs)
    while i < n:
        size = len(bufs[i])
        if sent < size:
            break
        sent -= size
        i += 1
    if i == n:
        return []
    rest = bufs[i:]
    if sent:
        rest[0] = memoryview(rest[0])[sent:]
    return rest


def receive_buffer(size: int) -> mmap.mmap:
    """A connection's receive buffer: anonymous memory, whose pages the kernel provides zeroed as they are
    first written. A bytearray of 1 MiB is zeroed whole at once: 12% of a login's thread time in a boot
    storm (py-spy), while a PC's reads only ever use its first page."""
    return mmap.mmap(-1, size)


def waits_on_disk(scsi) -> bool:
    """Whether a session's target has a writable LUN whose SYNCHRONIZE CACHE or FUA write waits for the disk."""
    if scsi is None:  # discovery
        return False
    return any(getattr(lu, "waits_on_disk", False) for lu in list(scsi.luns.values()))


def send_some(sock: socket.socket, bufs: list) -> list:
    """sendmsg on a non-blocking socket until it is full: returns what is left to send."""
    while bufs:
        try:
            sent = sock.sendmsg(bufs[:IOV_MAX])
        except BlockingIOError:
            return bufs
        bufs = _unsent(bufs[:IOV_MAX], sent) + bufs[IOV_MAX:]
    return bufs


def send_all(sock: socket.socket, bufs: list) -> None:
    """sendmsg the whole scatter list, IOV_MAX buffers at a time, resuming after partial sends."""
    while bufs:
        sent = sock.sendmsg(bufs[:IOV_MAX])
        bufs = _unsent(bufs[:IOV_MAX], sent) + bufs[IOV_MAX:]


class _Done(Exception):
    """The connection ended while its first bytes were handled."""


class ConnectionRunner:
    """Owns one accepted socket and its Connection; runs in its own thread."""

    def __init__(self, server: "Server", sock: socket.socket, peer: tuple, local: tuple, prefix=b"",
                 handed: bool = False, hops: int = 0):
        self.server = server
        self.prefix = prefix  # bytes already read (by us or by the process that handed the socket over)
        self.handed = handed
        self.hops = hops
        self.handed_on = False
        self.sock = sock
        self.peer_ip = peer[0]
        self.lock = threading.Lock()  # this runner's thread or the loop, and the service's threads
        self.aborted = ""
        # In the loop (event_loop.py): the receive buffer, output the peer has not taken yet, since when.
        self.loop: EventLoop | None = None
        self.fd = -1
        self.buf = self.view = None
        self.start = self.end = 0
        self.pending: list = []
        self.pending_since = 0.0
        self.want_out = False
        self.closed = False
        cfg = server.settings
        self.busy_poll_ns = int(cfg.get("busy_poll_us", 0)) * 1000
        self.conn = Connection(server.registry, server.sessions, peer_ip=peer[0], portal=(local[0], local[1]),
                               now=time.monotonic(), nop_interval=cfg.get("nop_interval", 30.0),
                               nop_timeout=cfg.get("nop_timeout", 15.0), cmd_window=cfg.get("cmd_window", 32),
                               handle=self)
        self.thread = threading.Thread(target=self.run, name=f"iscsi-{peer[0]}:{peer[1]}", daemon=True)

    # Called from other threads -------------------------------------------------
    def abort(self, reason: str) -> None:
        """Close this connection from another thread (session reinstatement, stop)."""
        self.aborted = reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def request_logout(self, grace: float) -> None:
        with self.lock:
            self.conn.request_logout(time.monotonic(), grace)
            self._flush()

    def update_settings(self, settings: dict) -> None:
        with self.lock:
            self.busy_poll_ns = int(settings.get("busy_poll_us", 0)) * 1000
            self.conn.nop_interval = settings.get("nop_interval", 30.0)
            self.conn.nop_timeout = settings.get("nop_timeout", 15.0)

    # The connection's own thread -----------------------------------------------
    def _flush(self) -> None:
        if self.loop is not None:
            self._loop_flush(time.monotonic())
            return
        conn = self.conn
        out = conn.take_output()
        if out:
            try:
                send_all(self.sock, out)
            except OSError as exc:
                conn.connection_lost(f"send failed: {exc.strerror or exc}")
        self._hand_events()

    def _hand_events(self) -> None:
        for event in self.conn.take_events():
            self.server.on_event(event)

    def _receive(self, view) -> int:
        """One receive: spin non-blocking for up to busy_poll_ns first when I/O is flowing."""
        sock = self.sock
        if self.busy_poll_ns and self._flowing:
            deadline = time.perf_counter_ns() + self.busy_poll_ns
            while True:
                try:
                    return sock.recv_into(view, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if time.perf_counter_ns() >= deadline:
                        break
            self._flowing = False  # the spin found nothing: sleep until traffic resumes
        n = sock.recv_into(view)
        self._flowing = True
        return n

    # Routing (scaled processes) ------------------------------------------------
    def _read_first_pdu(self, view) -> int:
        """Read exactly the first PDU (the initiator waits for our answer, so nothing beyond is read):
        returns the bytes read, fewer than a whole PDU when the peer closed or went silent."""
        have = len(self.prefix)
        view[:have] = self.prefix
        want = BHS_LEN if have < BHS_LEN else min(owners.first_pdu_length(view[:BHS_LEN]), len(view))
        deadline = time.monotonic() + FIRST_PDU_TIMEOUT
        while have < want:
            try:
                n = self.sock.recv_into(view[have:want])
            except (BlockingIOError, TimeoutError):
                if time.monotonic() >= deadline or self.server.stopping:
                    return have
                continue
            if n == 0:
                return have
            have += n
            if have == BHS_LEN:
                want = min(owners.first_pdu_length(view[:BHS_LEN]), len(view))
        return have

    def _route(self, pdu) -> bool:
        """Serve this connection here (True: the target is ours, or any process may answer it) or hand it
        to the target's owner (False: the socket is gone from this process)."""
        server, router = self.server, self.server.router
        name = owners.login_target(pdu)
        if (name is None or server.registry.target(name) is None or len(pdu) < BHS_LEN
                or owners.first_pdu_length(pdu[:BHS_LEN]) != len(pdu)):  # cut short, or longer than a hand-over
            return True  # discovery, unknown target, malformed: any process answers (and refuses) it
        if router.locks.owns(name):
            return True
        tried = set()
        holder = router.locks.holder(name)
        candidates = owners.plan(name, router.instance, router.instances(), holder, self.handed, self.hops)
        while candidates:
            instance = candidates.pop(0)
            if instance in tried:
                continue
            tried.add(instance)
            if instance == router.instance:
                try:
                    if server.registry.claim(name):
                        return True
                except Exception:  # noqa: BLE001 - its LUNs would not open: the login says so (0x0300)
                    return True
                holder = router.locks.holder(name)  # someone took it since we looked: send it there
                if holder is None or holder in tried or self.hops >= owners.MAX_HOPS:
                    return True  # the login is refused (service unavailable) by the login's own claim
                candidates = [holder, router.instance]
                continue
            hops = self.hops + 1 if self.handed else 0
            if router.handoff.send(instance, self.sock, pdu, hops):
                self.handed_on = True
                log.debug("connection from %s for %s handed to instance %d", self.peer_ip, name, instance)
                return False
        return True

    # Full feature phase: the shared loop (event_loop.py) -------------------------
    def _move_to_loop(self, buf: bytearray, start: int, end: int) -> bool:
        """Hand the connection to the process's loop once it is in full feature phase. Busy-poll keeps it
        in its thread (spinning is what a thread of its own is for), and so does a LUN whose flushes wait for
        the disk (a file, a block device, a persistent overlay: its fdatasync would stall every connection
        on the loop). True: this thread is done."""
        server = self.server
        if self.busy_poll_ns or self.conn.state != FULL or self.aborted or server.stopping:
            return False
        if waits_on_disk(self.conn.scsi):
            return False
        loop = server.event_loop()
        if loop is None:
            return False
        with self.lock:  # a logout request meanwhile sees one model or the other, whole
            self.buf, self.view, self.start, self.end = buf, memoryview(buf), start, end
            self.sock.setblocking(False)
            self.loop = loop
            try:
                if loop.add(self):
                    return True
            except OSError:
                log.exception("connection from %s: could not join the event loop", self.peer_ip)
            self.loop = None  # the loop is stopping: this thread ends the connection
            self.sock.settimeout(None)
            return False

    def loop_ready(self, mask: int, now: float) -> None:
        """The loop: the socket is readable or writable (or ended)."""
        with self.lock:
            if self.closed:
                return
            if self.pending:
                self._send_pending(now)
                if self.closed:
                    return
            conn = self.conn
            if conn.closing:  # its last answers are going out
                if not self.pending or mask & HUP_ERR:
                    self._loop_close(conn.close_reason)
                return
            if self.pending and not mask & HUP_ERR:
                return  # no more input until the peer took our output
            if self.end == len(self.buf):
                need = conn.needed(self.view[self.start:self.end])
                self.buf, self.view, self.start, self.end = self._room(self.buf, self.start, self.end, need)
            try:
                n = self.sock.recv_into(self.view[self.end:])
            except BlockingIOError:
                return
            except OSError as exc:
                self._loop_close(f"receive failed: {exc.strerror or exc}")
                return
            if n == 0:
                self._loop_close(self.aborted or "connection closed by the initiator")
                return
            self.end += n
            self.start += conn.receive(self.view[self.start:self.end], now)
            if self.start == self.end:
                self.start = self.end = 0
            self._loop_flush(now)

    def loop_timer(self, now: float) -> None:
        """The loop, once a second: NOP-In, its timeout, the logout grace; a peer that stopped reading."""
        with self.lock:
            if self.closed:
                return
            if self.pending and now - self.pending_since >= SEND_TIMEOUT:
                self._loop_close(f"send failed: nothing taken for {SEND_TIMEOUT:g} s")
                return
            self.conn.timer(now)
            self._loop_flush(now)

    def _loop_flush(self, now: float) -> None:
        conn = self.conn
        out = conn.take_output()
        if out:
            if not self.pending:
                self.pending_since = now
            self.pending += out
            self._send_pending(now)
        self._hand_events()
        if conn.closing and not self.pending and not self.closed:
            if self.loop.in_loop():
                self._loop_close(conn.close_reason)
            else:  # another thread (a logout request): the loop closes it
                self.abort(conn.close_reason)

    def _send_pending(self, now: float) -> None:
        try:
            pending = send_some(self.sock, self.pending)
        except OSError as exc:
            self.pending = []
            self.conn.connection_lost(self.aborted or f"send failed: {exc.strerror or exc}")
            if self.loop.in_loop():
                self._loop_close(self.conn.close_reason)
            return
        if pending is not self.pending:
            self.pending_since = now  # the peer took something
        self.pending = pending
        want_out = bool(pending)
        if want_out != self.want_out:
            self.want_out = want_out
            self.loop.interest(self, want_out)

    def loop_close(self, reason: str) -> None:
        with self.lock:
            self._loop_close(reason)

    def _loop_close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.pending = []  # views of the LUNs' mappings: released before the session closes its disk
        self.loop.remove(self)
        conn = self.conn
        conn.connection_lost(self.aborted or reason)
        conn.take_output()
        self._hand_events()
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.forget(self)

    @staticmethod
    def _room(buf: bytearray, start: int, end: int, need: int = 0):
        """A full buffer: compact it, and grow it if one PDU needs more room than all of it."""
        if start:
            buf[: end - start] = buf[start:end]
            end -= start
            start = 0
        if need > len(buf):
            grown = receive_buffer(max(need, 2 * len(buf)))
            grown[:end] = buf[:end]
            buf = grown
        return buf, memoryview(buf), start, end

    def run(self) -> None:
        sock = self.sock
        conn = self.conn
        start = end = 0
        self._flowing = False
        last_timer = time.monotonic()
        reason = "connection closed by the initiator"
        try:
            first = self.prefix
            if self.server.router is not None:
                small = bytearray(MAX_PREFIX)  # not the 1 MiB buffer: most connections routed here leave
                end = self._read_first_pdu(memoryview(small))
                if not self._route(memoryview(small)[:end]):
                    return  # the owner has the connection now; `finally` closes our copy of the socket
                first = memoryview(small)[:end]
            buf = receive_buffer(RECV_BUFFER)
            view = memoryview(buf)
            if first:
                end = len(first)
                view[:end] = first
            if end:
                with self.lock:
                    start = conn.receive(view[:end], time.monotonic())
                    if start == end:
                        start = end = 0
                    self._flush()
                if conn.closing:
                    reason = conn.close_reason
                    raise _Done
                if self._move_to_loop(buf, start, end):
                    return  # the loop serves it now; `finally` leaves it alone
            while not self.server.stopping:
                if end == len(buf):
                    buf, view, start, end = self._room(buf, start, end, conn.needed(view[start:end]))
                try:
                    n = self._receive(view[end:])
                except (BlockingIOError, TimeoutError):
                    n = -1  # SO_RCVTIMEO: a second of silence
                except OSError as exc:
                    reason = f"receive failed: {exc.strerror or exc}"
                    break
                now = time.monotonic()
                if n == 0:
                    if self.aborted:
                        reason = self.aborted
                    break
                with self.lock:
                    if n > 0:
                        end += n
                        consumed = conn.receive(view[start:end], now)
                        start += consumed
                        if start == end:
                            start = end = 0
                    if now - last_timer >= 1.0:
                        last_timer = now
                        conn.timer(now)
                    self._flush()
                    if conn.closing:
                        reason = conn.close_reason
                        break
                if conn.state == FULL and self._move_to_loop(buf, start, end):
                    return
        except _Done:
            pass
        except Exception:  # noqa: BLE001 - one connection's bug must not take the target down
            log.exception("connection from %s failed", self.peer_ip)
            reason = "internal error"
        finally:
            if self.loop is None:
                self._end(reason)

    def _end(self, reason: str) -> None:
        """The connection's thread is done with it and it never went to the loop."""
        conn, sock = self.conn, self.sock
        with self.lock:
            conn.connection_lost(self.aborted or reason)
            conn.take_output()  # the socket is gone: nothing more is sent
            self._hand_events()
        try:
            sock.close()
        except OSError:
            pass
        self.server.forget(self)




class Server:
    """Listening sockets on the configured portals and the set of live connections. `on_event(event)` is
    called, from connection threads, with each event a connection hands out (events.py)."""

    def __init__(self, registry, on_event, settings: dict, router: Router | None = None):
        self.registry = registry
        self.router = router  # None: one process, or a test: every connection is served here
        self.on_event = on_event
        self.settings = dict(settings)
        self.sessions = SessionTable()
        self.stopping = False
        self.listeners: dict[tuple[str, int], socket.socket] = {}
        self.runners: set[ConnectionRunner] = set()
        self._lock = threading.Lock()
        self.accepted = 0
        self._loop: EventLoop | None = None  # started by the first connection to reach full feature phase

    def set_portals(self, portals: list[tuple[str, int]]) -> None:
        """Listen on exactly these portals: open new ones, close removed ones (connections stay)."""
        wanted = set(portals)
        for portal in list(self.listeners):
            if portal not in wanted:
                self.listeners.pop(portal).close()
        for portal in portals:
            if portal not in self.listeners:
                sock = self._listen(portal)
                self.listeners[portal] = sock
                threading.Thread(target=self._accept_loop, args=(sock, portal), name=f"iscsi-accept-{portal[1]}",
                                 daemon=True).start()

    def _listen(self, portal: tuple[str, int]) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # scaled processes share the port
        try:
            bind(sock, portal[0], portal[1], "iSCSI")  # a refusal says why, for `bootfleet status`
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.settimeout(0.5)
        log.info("listening on %s:%d", *portal)
        return sock

    def _accept_loop(self, lsock: socket.socket, portal) -> None:
        while not self.stopping and self.listeners.get(portal) is lsock:
            try:
                sock, peer = lsock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL) or self.listeners.get(portal) is not lsock:
                    return
                log.warning("accept on %s:%d failed: %s", portal[0], portal[1], exc)
                time.sleep(0.1)
                continue
            try:
                self._start_connection(sock, peer)
            except Exception:  # noqa: BLE001
                log.exception("could not start a connection from %s", peer[0])
                sock.close()

    def adopt(self, sock: socket.socket, prefix, hops: int) -> None:
        """A connection handed to us by another process (handoff.Handoff calls this)."""
        try:
            peer = sock.getpeername()
        except OSError:
            sock.close()  # the initiator left meanwhile
            return
        self._start_connection(sock, peer, prefix=bytes(prefix), handed=True, hops=hops)

    def _start_connection(self, sock: socket.socket, peer, prefix=b"", handed=False, hops=0) -> None:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 1, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0))
        local = sock.getsockname()
        runner = ConnectionRunner(self, sock, peer, local, prefix=prefix, handed=handed, hops=hops)
        with self._lock:
            self.runners.add(runner)
            self.accepted += 1
        runner.thread.start()

    def event_loop(self) -> EventLoop | None:
        """The process's loop for connections in full feature phase (None once stopping)."""
        with self._lock:
            if self._loop is None and not self.stopping:
                self._loop = EventLoop()
            return self._loop

    def forget(self, runner: ConnectionRunner) -> None:
        with self._lock:
            self.runners.discard(runner)

    def connections(self) -> list[ConnectionRunner]:
        with self._lock:
            return list(self.runners)

    def update_settings(self, settings: dict) -> None:
        self.settings = dict(settings)
        for runner in self.connections():
            runner.update_settings(self.settings)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        for portal in list(self.listeners):
            self.listeners.pop(portal).close()
        runners = self.connections()
        for runner in runners:
            runner.abort("target stopping")
        deadline = time.monotonic() + timeout
        for runner in runners:
            runner.thread.join(max(0.0, deadline - time.monotonic()))
        while self.connections() and time.monotonic() < deadline:
            time.sleep(0.01)  # the loop closes its connections as it sees them end
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.stop(max(0.1, deadline - time.monotonic()))
