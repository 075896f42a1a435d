"""The TFTP I/O loop: one request socket, one socket per transfer, one epoll loop in one thread.

- The request socket and a transfer's two sockets (connected, catcher) are made in sockets.py, which says
  why: replies leave from the address each request came to, the hot path has no address to compare, a
  wrong TID reaches only the catcher (error 5).
- Blocks are read with one `os.preadv` per window into a preallocated buffer and sent with
  `sendmsg([header, slice])`: no copy in Python, no per-packet allocation besides the 4-byte header.
  Rendered and netascii files are served from memory the same way. Files are not mmap'd: a file truncated
  under an mmap would kill the process with SIGBUS.
- Timers: a heap of (deadline, seq, slot) with one entry per transfer; an entry popped early (the transfer
  moved its deadline since) is pushed again, so a packet never touches the heap.
- Every handler runs inside try/except: an exception fails that one transfer (logged with its traceback),
  never the loop.
The decisions live in core.py (which request is served, how; the events), transfer.py (the state machines);
this module only moves bytes, runs the timers and keeps the I/O counters.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from services.tftp import packets as pk
from services.tftp.core import Admitted, Answer, Policy, TftpCore
from services.tftp.files import FileCache, finish_upload
from services.tftp.sockets import IN_PKTINFO, pktinfo_address, request_socket, send_once, transfer_sockets
from services.tftp.transfer import ACTIVE, DALLY, DONE, FAILED, ReadTransfer, WriteTransfer
from shared.events import Event
from shared.wakeup import Wakeup

log = logging.getLogger("bootfleet.tftp")

REQUEST_BATCH = 64  # requests read per wake-up of the request socket
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
GSO_MAX_BYTES = 65000  # a GSO send is one IP datagram before segmentation: under 64 KiB in all
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # <netinet/udp.h>
_gso_size = struct.Struct("=H").pack
SEND_BUFFER = 4 << 20  # bytes read per preadv at most (a window larger than this is read in parts)
SNDBUF = 1 << 20
_data_header = pk.HEADER.pack
_monotonic = time.monotonic
# what a connected UDP socket reports after an ICMP host/network unreachable: not the end of a transfer
TRANSIENT_ERRNOS = frozenset((errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN))


@dataclass(eq=False)
class Slot:
    """One transfer's I/O state."""

    sock: socket.socket  # connected to peer
    catcher: socket.socket  # the same port, unconnected: datagrams from anyone else
    peer: tuple[str, int]
    transfer: ReadTransfer | WriteTransfer
    writing: bool
    file: str
    mac: str | None
    source: int | memoryview | None = None  # read: file descriptor or bytes in memory
    out_fd: int = -1  # write: temporary file
    temp_path: str = ""
    final_path: str = ""
    netascii: bool = False
    completed: bool = False  # write: the last block is in and the file renamed
    closed: bool = False
    bytes_sent: int = 0
    gso: bool = True  # off for a transfer whose blocks the kernel will not segment (larger than the MTU)


class TftpLoop:
    """One serving loop. `on_events` is called from the loop's thread when `take_events()` has something."""

    def __init__(self, policy: Policy, on_events: Callable[[], None] | None = None, cache: FileCache | None = None,
                 name: str = "tftp-serve"):
        self.cache = cache or FileCache(policy.tftp.cache_mib << 20, policy.tftp.cache_max_file_mib << 20)
        self.core = TftpCore(policy, self.cache, SEND_BUFFER)
        self.on_events = on_events or (lambda: None)
        self.ep = select.epoll()
        self.wakeup = Wakeup()
        self.ep.register(self.wakeup.fd, select.EPOLLIN)
        self.listener: socket.socket | None = None
        self.listener_fd = -1
        self.pending_listener: socket.socket | None = None
        self.slots: dict[int, Slot] = {}  # connected socket fd -> slot
        self.catchers: dict[int, Slot] = {}  # catcher socket fd -> slot
        self.heap: list = []
        self.seq = itertools.count()
        self.out = bytearray(SEND_BUFFER)
        self.out_view = memoryview(self.out)
        self.inbuf = bytearray(65536 + 64)
        self.in_view = memoryview(self.inbuf)
        self.in_view4 = self.in_view[:4]  # an ACK: no new view per packet
        self.limiter = self.core.limiter  # one budget of log lines for the loop and the core
        self.name = name
        self.running = False
        self.thread: threading.Thread | None = None
        self.stats = dict(  # the core counts requests and transfers; these are the loop's
            bytes_sent=0, bytes_received=0, wrong_tid=0, retransmits=0, internal_errors=0, sleeps=0, send_errors=0,
        )
        self.address = "0.0.0.0"
        self.port = 0
        self.busy_poll = policy.tftp.busy_poll_us / 1e6
        self.gso = policy.tftp.gso  # UDP generic segmentation offload for windows; off after a refusal

    @property
    def policy(self) -> Policy:
        return self.core.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.core.policy = policy  # new requests only: a transfer in flight keeps its file and options

    def take_events(self) -> list[Event]:
        return self.core.take_events()

    def _events_out(self) -> None:
        if self.core.events:
            self.on_events()

    # -- life ------------------------------------------------------------------------------------------------

    def bind(self, address: str, port: int) -> None:
        """Open the request socket; called before start() or, for a new address, from any thread."""
        sock = request_socket(address, port)
        self.address, self.port = address, sock.getsockname()[1]
        if self.thread is None:
            self._install_listener(sock)
        else:
            self.pending_listener = sock
            self.wakeup.wake()

    def _install_listener(self, sock: socket.socket) -> None:
        if self.listener is not None:
            self.ep.unregister(self.listener.fileno())
            self.listener.close()
        self.listener = sock
        self.listener_fd = sock.fileno()
        self.ep.register(sock.fileno(), select.EPOLLIN)

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.running = False
        self.wakeup.wake()
        if self.thread is not None:
            self.thread.join(timeout)
        for slot in list(self.slots.values()):
            self._end(slot, "server stopping", pk.build_error(pk.ERR_UNDEFINED, "server shutting down"))
        self._events_out()
        if self.listener is not None:
            self.listener.close()
        self.ep.close()
        self.wakeup.close()

    def counters(self) -> dict[str, float]:
        in_flight = sum(slot.bytes_sent for slot in list(self.slots.values()))
        return {**self.core.stats, **self.stats, "bytes_sent": self.stats["bytes_sent"] + in_flight,
                "active": len(self.slots), "cache_bytes": self.cache.bytes, "cache_hits": self.cache.hits,
                "cache_misses": self.cache.misses}

    # -- the loop ----------------------------------------------------------------------------------------------

    def _serve(self) -> None:
        poll = self.ep.poll
        slots = self.slots
        last_work = 0.0
        spinning = False
        misses = 0  # spins in a row that ended with nothing to do
        skip = 0  # idle periods left to sleep through without spinning
        while self.running:
            heap = self.heap
            try:
                # busy-poll: for `busy_poll` seconds after the last work, look without sleeping, so a lock-step
                # client's next ACK costs no wake-up (the design brief measured 1.8-2.7x at queue depth 1). A
                # spin that finds nothing doubles the number of idle periods slept through before the next
                # try (up to 256), so a loaded host or a slow client does not pay a spinning core per packet.
                spin = self.busy_poll
                ready = poll(0) if spin else None
                if ready:
                    if spinning:
                        spinning, misses = False, 0
                else:
                    if spin and slots:
                        if skip:
                            skip -= 1
                        elif _monotonic() - last_work < spin:
                            spinning = True
                            if heap and heap[0][0] <= _monotonic():
                                self._on_timers(_monotonic())
                            continue
                        elif spinning:
                            spinning = False
                            misses = min(misses + 1, 8)
                            skip = 1 << misses
                    timeout = 1.0
                    if heap:
                        timeout = min(1.0, max(0.0, heap[0][0] - _monotonic()))
                    ready = poll(timeout)
                    self.stats["sleeps"] += 1
            except InterruptedError:
                continue
            now = _monotonic()
            listener_fd = self.listener_fd
            for fd, _ in ready:
                slot = slots.get(fd)
                if slot is not None:
                    try:
                        self._on_transfer_packet(slot, now)
                    except Exception as exc:
                        self._on_exception(slot, exc)
                elif fd == listener_fd:
                    self._on_requests(now)
                elif fd == self.wakeup.fd:
                    self._on_wake()
                else:
                    catcher = self.catchers.get(fd)
                    if catcher is not None:
                        self._on_wrong_tid(catcher)
            if heap and heap[0][0] <= now:
                self._on_timers(now)
            last_work = _monotonic()  # the spin counts idle time from the end of the work

    def _on_wake(self) -> None:
        self.wakeup.drain()
        if self.pending_listener is not None:
            sock, self.pending_listener = self.pending_listener, None
            self._install_listener(sock)

    def _on_exception(self, slot: Slot, exc: BaseException) -> None:
        """Errors the connected socket reports (ICMP) end or spare the transfer; anything else is our bug."""
        if isinstance(exc, ConnectionRefusedError):
            # an ICMP port-unreachable for the client's port: its process is gone, retries would be wasted
            if not slot.closed:
                self._end(slot, "the client's port is unreachable (ICMP)", None)
        elif isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            # host or network unreachable (a lost ARP answer, a route flap): like a lost packet, the timer resends
            self.stats["send_errors"] += 1
            if self.limiter.allow():
                log.info("transfer of %s to %s:%d: %s; the timer will resend", slot.file, *slot.peer, exc.strerror)
        else:
            self._internal_error(slot, exc)

    def _internal_error(self, slot: Slot, exc: BaseException) -> None:
        self.stats["internal_errors"] += 1
        log.exception("transfer of %s to %s:%d failed on an internal error", slot.file, *slot.peer, exc_info=exc)
        if not slot.closed:
            self._end(slot, f"internal error: {exc}", pk.build_error(pk.ERR_UNDEFINED, "internal error"))

    # -- requests ----------------------------------------------------------------------------------------------

    def _on_requests(self, now: float) -> None:
        sock = self.listener
        cmsg_size = socket.CMSG_SPACE(IN_PKTINFO.size)
        for _ in range(REQUEST_BATCH):
            try:
                data, ancdata, _flags, peer = sock.recvmsg(1024, cmsg_size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("request socket: %s", exc)
                break
            local = pktinfo_address(ancdata, self.address)
            try:
                self._on_request(data, peer, local, now)
            except Exception:
                self.stats["internal_errors"] += 1
                log.exception("request from %s:%d failed on an internal error", *peer)
        self._events_out()

    def _on_request(self, data: bytes, peer, local: str, now: float) -> None:
        decision = self.core.admit(data, peer, local, now)
        if decision is None:
            return
        if type(decision) is Answer:
            return send_once(local, peer, decision.packet)
        windowed = decision.transfer.windowsize > 1 and not decision.writing
        try:
            sock, catcher = transfer_sockets(local, peer, SNDBUF if windowed else 0)
        except OSError as exc:
            decision.release()
            return send_once(local, peer, self.core.refuse(peer, pk.ERR_UNDEFINED, str(exc), decision.file,
                                                           decision.mac).packet)
        self._start(decision, sock, catcher, peer, now)

    def _start(self, admitted: Admitted, sock: socket.socket, catcher: socket.socket, peer, now: float) -> None:
        t = admitted.transfer
        writing = admitted.writing
        slot = Slot(sock, catcher, peer, t, writing, admitted.file, admitted.mac, source=admitted.source,
                    out_fd=admitted.out_fd, temp_path=admitted.temp_path, final_path=admitted.final_path,
                    netascii=admitted.netascii)
        self._register(slot, now)
        self.core.started(peer, admitted)
        self._events_out()  # before the first packet, as the client's timeline reads it
        try:
            if writing:
                sock.send(t.start(now))
            else:
                self._send_blocks(slot, t.start(now))
        except Exception as exc:
            self._on_exception(slot, exc)

    def _register(self, slot: Slot, now: float) -> None:
        fd = slot.sock.fileno()
        self.slots[fd] = slot
        self.ep.register(fd, select.EPOLLIN)
        catcher = slot.catcher.fileno()
        self.catchers[catcher] = slot
        self.ep.register(catcher, select.EPOLLIN)
        heapq.heappush(self.heap, (slot.transfer.deadline, next(self.seq), slot))

    # -- transfers ---------------------------------------------------------------------------------------------

    def _send_blocks(self, slot: Slot, count: int) -> None:
        """Send `count` blocks from the transfer's `first` on (block 0: the OACK)."""
        if count == 0:
            return
        t = slot.transfer
        first = t.first
        if first == 0:
            slot.sock.send(t.oack)
            return
        blksize = t.blksize
        source = slot.source
        sent = 0
        try:
            if type(source) is int:
                out = self.out_view
                per_read = len(self.out) // blksize
                block, end = first, first + count
                while block < end:
                    n = min(per_read, end - block)
                    offset = (block - 1) * blksize
                    want = min(n * blksize, t.size - offset)
                    got = os.preadv(source, [out[:want]], offset) if want else 0
                    if got != want:
                        raise OSError(f"{slot.file!r} changed size during the transfer")
                    sent += self._send_views(slot, block, n, out, 0, want, blksize)
                    block += n
            else:
                offset = (first - 1) * blksize
                want = min(count * blksize, t.size - offset)
                sent = self._send_views(slot, first, count, source, offset, want, blksize)
        except BlockingIOError:
            pass  # the socket buffer is full: the rest of the window goes on the client's ACK or our timer
        slot.bytes_sent += sent

    def _send_views(self, slot: Slot, first: int, count: int, data: memoryview, pos: int, length: int,
                    blksize: int) -> int:
        """Send blocks first..first+count-1 whose bytes are data[pos:pos+length]; -> payload bytes sent."""
        sock = slot.sock
        end = pos + length
        if count == 1 or not (self.gso and slot.gso) or blksize + 4 > GSO_MAX_BYTES // 2:
            for b in range(first, first + count):
                stop = min(pos + blksize, end)
                sock.sendmsg([_data_header(pk.DATA, b & 0xFFFF), data[pos:stop]])
                pos = stop
            return length
        # UDP GSO: one sendmsg carries up to GSO_MAX_SEGMENTS blocks; the kernel cuts it into one datagram per
        # block (every segment blksize + 4 bytes, the last may be shorter: exactly TFTP's last block)
        per_call = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // (blksize + 4))
        cmsg = [(socket.SOL_UDP, UDP_SEGMENT, _gso_size(blksize + 4))]
        b, last = first, first + count
        while b < last:
            n = min(per_call, last - b)
            iov = []
            for block in range(b, b + n):
                stop = min(pos + blksize, end)
                iov.append(_data_header(pk.DATA, block & 0xFFFF))
                iov.append(data[pos:stop])
                pos = stop
            try:
                sock.sendmsg(iov, cmsg if n > 1 else ())
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EMSGSIZE):
                    slot.gso = False  # a segment larger than the path's MTU (a big blksize): this transfer only
                elif exc.errno in (errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    log.info("UDP GSO is not available (%s); sending one datagram per block", exc)
                    self.gso = False
                else:
                    raise
                back = pos - sum(len(v) for v in iov[1::2])
                return length - (end - back) + self._send_views(slot, b, last - b, data, back, end - back, blksize)
            b += n
        return length

    def _on_transfer_packet(self, slot: Slot, now: float) -> None:
        # one datagram per readiness: epoll is level-triggered and brings us back for the next, and a lock-step
        # client never has two queued, so a second recv would only fail with EAGAIN
        sock = slot.sock
        try:
            n = sock.recv_into(self.inbuf)
        except (BlockingIOError, InterruptedError):
            return
        t = slot.transfer
        if slot.writing:
            reply = t.on_packet(self.in_view[:n], now)
            payload = t.payload
            if payload is not None:
                os.pwrite(slot.out_fd, payload, t.offset)
                self.stats["bytes_received"] += len(payload)
            if t.state is DALLY and not slot.completed:
                self._complete_upload(slot)
            if reply is not None:
                sock.send(reply)
        else:
            count = t.on_packet(self.in_view4 if n == 4 else self.in_view[:n], now)
            if count == 1 and type(slot.source) is memoryview:
                # the lock-step case from memory, inline: one slice, one sendmsg (an ACK never asks the OACK)
                first = t.first
                blksize = t.blksize
                offset = (first - 1) * blksize
                try:
                    sock.sendmsg([_data_header(3, first & 0xFFFF), slot.source[offset:offset + blksize]])
                    length = t.size - offset
                    slot.bytes_sent += length if length < blksize else blksize
                except BlockingIOError:
                    pass  # the timer resends
            elif count:
                self._send_blocks(slot, count)
        if t.state is DONE or t.state is FAILED:
            self._finish(slot, now)

    def _on_wrong_tid(self, slot: Slot) -> None:
        try:
            _data, addr = slot.catcher.recvfrom(1)  # what it says does not matter: it is not our client
        except OSError:
            return  # nothing queued, or an ICMP error for an earlier error 5: nothing to do
        self.stats["wrong_tid"] += 1
        if self.limiter.allow():
            log.info("%s:%d sent a packet to the transfer of %s to %s:%d: error 5", *addr, slot.file, *slot.peer)
        try:
            slot.catcher.sendto(pk.build_error(pk.ERR_UNKNOWN_TID, "unknown transfer ID"), addr)
        except OSError:
            pass

    def _complete_upload(self, slot: Slot) -> None:
        slot.completed = True
        fd, slot.out_fd = slot.out_fd, -1
        finish_upload(fd, slot.temp_path, slot.final_path, slot.netascii)
        self.core.upload_finished(slot.peer, slot.file, slot.mac, slot.transfer)
        self._events_out()

    def _on_timers(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, slot = heapq.heappop(heap)
            if slot.closed:
                continue
            t = slot.transfer
            if t.deadline > now:
                heapq.heappush(heap, (t.deadline, next(self.seq), slot))
                continue
            try:
                if slot.writing:
                    reply = t.on_timer(now)
                    if reply is not None:
                        slot.sock.send(reply)
                else:
                    self._send_blocks(slot, t.on_timer(now))
                if t.state is ACTIVE:
                    self.stats["retransmits"] += 1
                if t.state is DONE or t.state is FAILED:
                    self._finish(slot, now)
                else:
                    heapq.heappush(heap, (t.deadline, next(self.seq), slot))
            except Exception as exc:
                self._on_exception(slot, exc)
                if not slot.closed:  # spared (a transient error): it keeps its timer
                    heapq.heappush(heap, (t.deadline, next(self.seq), slot))

    def _finish(self, slot: Slot, now: float) -> None:
        t = slot.transfer
        if t.state is DONE:
            if not slot.writing:
                self.core.finished(slot.peer, slot.file, slot.mac, t)
                self._events_out()
            self._close(slot)
            return
        self._end(slot, t.reason, t.reply)

    def _end(self, slot: Slot, reason: str, reply: bytes | None) -> None:
        """A transfer that failed (or is cut short): tell the client if we decided it, report, close."""
        if slot.closed:
            return
        if reply is not None:
            try:
                slot.sock.send(reply)
            except OSError:
                pass
        if slot.writing and slot.completed:
            self._close(slot)  # the upload is in; only the dally was cut short
            return
        self.core.failed(slot.peer, slot.file, slot.mac, reason, slot.bytes_sent, slot.writing)
        self._events_out()
        self._close(slot)

    def _close(self, slot: Slot) -> None:
        slot.closed = True
        self.stats["bytes_sent"] += slot.bytes_sent
        self.core.closed(slot.peer)
        for sock, table in ((slot.sock, self.slots), (slot.catcher, self.catchers)):
            fd = sock.fileno()
            table.pop(fd, None)
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass
            sock.close()
        if type(slot.source) is int:
            os.close(slot.source)
        slot.source = None
        if slot.out_fd >= 0:
            os.close(slot.out_fd)
            slot.out_fd = -1
            try:
                os.unlink(slot.temp_path)
            except OSError:
                pass
