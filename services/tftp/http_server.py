"""The HTTP I/O layer: a TCP listener in the service's asyncio loop, one small object per connection, files
sent with sendfile(2).

- The listener binds with SO_REUSEPORT, so `scale.tftp` processes share the HTTP port as they share 69.
- Sockets are our own, driven by the loop's reader and writer callbacks (no asyncio transport: a transport
  keeps its socket's writer callback to itself, and sendfile needs it), non-blocking throughout.
- A connection reads into its `HttpConnection` (http_core.py) and sends what that answers, one reply at a
  time: the head (and an in-memory body) with `send`, a file part with `os.sendfile` straight from the page
  cache, at most `SENDFILE_CHUNK` bytes per turn of the loop, so 50 downloads share it round-robin; the head
  goes with MSG_MORE, so it shares a segment with the file's first bytes, and the socket is corked (TCP_CORK,
  nginx's tcp_nopush) while the file goes out, so only full segments leave. While a reply is being sent the
  connection does not read: a pipelined request waits in the kernel, not in our memory.
- A connection that has not sent a whole request `keepalive_timeout` seconds after it opened or after its
  last reply (bytes dribbling in do not extend this: no slowloris), or takes nothing for as long while a reply
  is sent to it, is closed. Beyond `max_connections` a new connection gets 503 and is closed.
- `listen()` again (a new address or port on apply) opens the new listener before closing the old; the
  connections already accepted go on, and each request takes the site (`self.site`) current when it arrives.
- Every callback runs inside try/except: an exception closes that one connection (logged with its
  traceback), never the loop; the client sees a closed connection, never a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from typing import Callable

from services.tftp.http_core import CLOSE, HttpConnection, Reply, Site
from shared.events import Event
from shared.failures import ListenError, bind
from shared.log_limit import LogLimiter

log = logging.getLogger("bootfleet.tftp.http")

_monotonic = time.monotonic
ACCEPT_BATCH = 64  # connections accepted per wake-up of the listener
RECV_SIZE = 65536
# bytes of a file one sendfile call sends at most before the loop turns to the other connections: nginx's
# sendfile_max_chunk default. With 50 curls on this 2-core VM, sending until the socket was full instead cost the
# clients more CPU per byte (one 6-round run: 0.79 against 0.62 s/GiB) and throughput (1551 against 1884 MB/s
# aggregate, nginx 1898); 1 MiB and 512 KiB chunks were no better than 2 MiB (noisy runs)
SENDFILE_CHUNK = 2 << 20
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nServer: bootfleet\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 24\r\nConnection: close\r\n\r\n503 Service Unavailable\n")
_MSG_MORE = getattr(socket, "MSG_MORE", 0x8000)


class HttpServer:
    def __init__(self, site: Site, emit: Callable[[Event], None], keepalive_timeout: float = 60.0,
                 max_connections: int = 1000):
        self.site = site
        self.emit = emit
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listener: socket.socket | None = None
        self.address = ""
        self.port = 0
        self.connections: set[_Connection] = set()
        self.draining = False  # closing down gently: no new requests, replies in flight finish
        self.limiter = LogLimiter(log, "log lines about refused HTTP requests")
        self.stats = dict(http_connections=0, http_requests=0, http_finished=0, http_failed=0, http_bytes_sent=0,
                          http_refused_busy=0, http_internal_errors=0)

    def listen(self, address: str, port: int) -> int:
        """Listen on address:port (0: any free port) from the running loop's thread; an earlier listener
        closes once the new one is up. -> the port."""
        self.loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            bind(sock, address, port, "HTTP")  # a ListenError that says why in words
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        old, self.listener = self.listener, sock
        self.address, self.port = address, sock.getsockname()[1]
        self.loop.add_reader(sock.fileno(), self._on_accept, sock)
        if old is not None:
            # connections the kernel completed on the old socket are taken first: closing it would reset them
            while self._on_accept(old):
                pass
            self._close_listener(old)  # stops accepting; accepted connections go on
        return self.port

    def drain(self) -> None:
        """Stop listening; idle connections close now, the others after the reply they are sending."""
        self.draining = True
        if self.listener is not None:
            self._close_listener(self.listener)
            self.listener = None
        for connection in list(self.connections):
            if connection.reply is None:
                connection.close()

    def stop(self) -> None:
        """Close the listener and every connection (replies in flight are cut)."""
        if self.listener is not None:
            self._close_listener(self.listener)
            self.listener = None
        for connection in list(self.connections):
            connection.close(abort=True)

    def counters(self) -> dict[str, float]:
        return {**self.stats, "http_active": len(self.connections)}

    def _close_listener(self, sock: socket.socket) -> None:
        self.loop.remove_reader(sock.fileno())
        sock.close()

    def _on_accept(self, listener: socket.socket) -> bool:
        """Accept up to a batch; -> True if the batch was full (more may wait)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                return False
            except OSError as exc:  # EMFILE and friends: the connection waits in the backlog
                if self.limiter.allow():
                    log.warning("HTTP accept failed: %s", exc)
                return False
            self.stats["http_connections"] += 1
            if len(self.connections) >= self.max_connections:
                self.stats["http_refused_busy"] += 1
                try:
                    sock.setblocking(False)
                    sock.send(BUSY)
                except OSError:
                    pass
                sock.close()
                continue
            try:
                self.connections.add(_Connection(self, sock, peer))
            except OSError:  # reset before we got to it (getsockname, setsockopt): nothing to answer
                sock.close()
            except Exception:
                self.stats["http_internal_errors"] += 1
                log.exception("HTTP connection from %s:%d could not be set up", *peer[:2])
                sock.close()
        return True

    def _report(self, events: list[Event]) -> None:
        for item in events:
            if item.type.endswith("failed"):
                self.stats["http_failed"] += 1
                self.stats["http_bytes_sent"] += item.bytes
                if self.limiter.allow():
                    log.info("%s:%d %s: %d %s", item.ip, item.port, item.file or "-", item.status, item.reason)
            else:
                self.stats["http_finished"] += 1
                self.stats["http_bytes_sent"] += item.bytes
            self.emit(item)


class _Connection:
    __slots__ = ("server", "loop", "sock", "fd", "conn", "reply", "out", "sent", "file_offset", "file_left",
                 "timer", "reading", "writing", "closed", "corked")

    def __init__(self, server: HttpServer, sock: socket.socket, peer):
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a script's last segment must not wait
        self.conn = HttpConnection(server.site, peer[:2], sock.getsockname()[0])
        self.reply: Reply | None = None
        self.out = memoryview(b"")  # head and in-memory body still to send
        self.sent = 0  # body bytes of the reply sent
        self.file_offset = 0
        self.file_left = 0
        self.timer: asyncio.TimerHandle | None = None
        self.reading = False
        self.writing = False
        self.closed = False
        self.corked = False
        self._read(True)
        self._arm_timer()

    # -- callbacks ---------------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""  # reset by the peer: as good as closed
            self.conn.receive(data)
            self._pump()
        except Exception:
            self._internal_error()

    def _on_writable(self) -> None:
        try:
            if self._flush():
                self._pump()
        except Exception:
            self._internal_error()

    def _on_timeout(self) -> None:
        self.timer = None
        if self.closed:
            return
        stalled = self.reply is not None
        if stalled:
            self._reply_done(f"the client took nothing for {self.server.keepalive_timeout:g} s")
        self.close(abort=stalled)  # a reply cut short is reset, not ended as if it were whole

    # -- the work ----------------------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start the next reply, or wait for more bytes; while a reply is out, nothing else happens."""
        while not self.closed and self.reply is None:
            if self.server.draining:
                self.close()
                return
            self.conn.site = self.server.site  # a new revision applies from the next request on
            reply = self.conn.next_reply(_monotonic())
            if reply is None:
                self._read(True)
                if self.timer is None:  # the wait for a request starts; bytes dribbling in do not extend it
                    self._arm_timer()
                return
            if reply is CLOSE:
                self.close()
                return
            self.server.stats["http_requests"] += 1
            self.reply = reply
            self._arm_timer()  # now: the time the client may take no bytes
            self.sent = 0
            self.out = memoryview(reply.head + reply.body if reply.body else reply.head)
            self.file_offset, self.file_left = reply.offset, (reply.count if reply.fd >= 0 else 0)
            self._read(False)
            if not self._flush():  # still sending, or closed
                return

    def _flush(self) -> bool:
        """Send what the reply has left; on EAGAIN wait for the socket to drain. -> True when the reply is
        done (and reported) and the connection goes on: then the caller starts the next one. (A loop, not a
        call back into _pump: a client that pipelines hundreds of requests must not recurse us to death.)"""
        reply = self.reply
        if reply is None:
            return False
        sock = self.sock
        progressed = False
        try:
            while self.out:
                n = sock.send(self.out, _MSG_MORE if self.file_left else 0)
                self.out = self.out[n:]
                progressed = True
            if self.file_left:
                if not self.corked:  # nginx's tcp_nopush: only full segments while the file goes out
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                    self.corked = True
                asked = min(self.file_left, SENDFILE_CHUNK)
                n = os.sendfile(self.fd, reply.fd, self.file_offset, asked)
                if n == 0:
                    raise OSError(errno.EIO, f"the file ended {self.file_left} bytes early (truncated while sent?)")
                self.file_offset += n
                self.file_left -= n
                self.sent += n
                progressed = True
                if self.file_left:
                    # one chunk per turn, then the loop serves the other connections (the socket is full or
                    # will say so in one more call; either way the writer callback brings us back)
                    raise BlockingIOError
        except (BlockingIOError, InterruptedError):
            self._write(True)
            if progressed:
                self._arm_timer()
            return False
        except OSError as exc:  # the client went away (EPIPE, ECONNRESET) or the file failed
            self._reply_done(exc.strerror or str(exc))
            self.close(abort=True)
            return False
        self._write(False)
        if self.corked:  # the file's last segment leaves now, not 200 ms later
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            self.corked = False
        if reply.fd < 0:
            self.sent = len(reply.body)
        self._reply_done(None)
        if reply.close:
            self.close()
            return False
        return True

    def _reply_done(self, error: str | None) -> None:
        reply, self.reply = self.reply, None
        if reply is None:
            return
        if self.timer is not None:  # the next wait for a request arms its own
            self.timer.cancel()
            self.timer = None
        if reply.fd >= 0:
            os.close(reply.fd)
            reply.fd = -1
        self.conn.done(reply, self.sent, _monotonic(), error)
        self.server._report(self.conn.take_events())

    def _read(self, on: bool) -> None:
        if on != self.reading and not self.closed:
            self.reading = on
            if on:
                self.loop.add_reader(self.fd, self._on_readable)
            else:
                self.loop.remove_reader(self.fd)

    def _write(self, on: bool) -> None:
        if on != self.writing and not self.closed:
            self.writing = on
            if on:
                self.loop.add_writer(self.fd, self._on_writable)
            else:
                self.loop.remove_writer(self.fd)

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.server.keepalive_timeout, self._on_timeout)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self._read(False)
        self._write(False)
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.reply is not None:  # cut short (stop, abort): its file is closed, its event sent
            self._reply_done("the server closed the connection")
        self.server.connections.discard(self)
        try:
            if abort:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            else:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()

    def _internal_error(self) -> None:
        self.server.stats["http_internal_errors"] += 1
        log.exception("HTTP connection %s:%d: internal error; closing it", *self.conn.peer)
        self.close(abort=True)


class HttpListener:
    """The `http` section applied to the service: the server on or off, its address and port, its limits, and
    the site (the TFTP policy's jail and rendered names) swapped for every revision. Runs in the service's loop.
    Turning HTTP off, or the service being given a new address, never cuts a reply in flight."""

    def __init__(self, emit: Callable[[Event], None]):
        self.emit = emit
        self.server: HttpServer | None = None
        self.bound: tuple[str, int] | None = None  # the configured (address, port), port 0 included
        self.old: list[HttpServer] = []  # turned off, draining

    def apply(self, config, jail, dynamic) -> None:
        h = config.http
        if not h.enabled:
            if self.server is not None:
                log.info("HTTP off: no longer listening on %s:%d", self.server.address, self.server.port)
                self.server.drain()
                self.old.append(self.server)
                self.server, self.bound = None, None
            return
        site = Site(jail, dynamic)
        address = h.address or config.tftp.address
        if self.server is None:
            self.server = HttpServer(site, self.emit, h.keepalive_timeout, h.max_connections)
        server = self.server
        server.site = site
        server.keepalive_timeout = h.keepalive_timeout
        server.max_connections = h.max_connections
        if self.bound != (address, h.port):
            try:
                port = server.listen(address, h.port)
            except OSError as exc:  # the field to change, then the kernel's reason in words
                raise ListenError(exc.errno, f"http.address/http.port: {exc}") from None
            self.bound = (address, h.port)
            log.info("HTTP: serving %s on %s:%d", jail.root, address, port)
        self.old = [s for s in self.old if s.connections]

    def stop(self) -> None:
        for server in [*self.old, *([self.server] if self.server else [])]:
            server.stop()
        self.server, self.bound, self.old = None, None, []

    def counters(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for server in [*self.old, *([self.server] if self.server else [])]:
            for key, value in server.counters().items():
                total[key] = total.get(key, 0) + value
        return total
