"""The HTTP core (sans-IO): the TFTP root and the per-client iPXE scripts over HTTP/1.1.

Theory of operation. One `HttpConnection` per TCP connection. The I/O layer feeds it what the socket
received (`receive(data)`, b"" when the peer closed) and asks `next_reply(now)` for what to send, until it says
`None` (it needs more bytes) or hands out `CLOSE`. A `Reply` is the head (status line and headers, already
encoded), an in-memory body (error text, a rendered script) or a part of an open file (`fd`, `offset`,
`count`) that the I/O layer sends with sendfile(2) and then closes; `close` says the connection ends after
it. When the reply has left (or failed to), the I/O layer calls `done(reply, sent, now, error)`, which turns
it into an event (`take_events()`).

HTTP/1.1 framing, keep-alive, pipelining and HTTP/1.0 are h11's (a sans-IO HTTP/1.1 library: the house
style's own anchor). This module decides what each request gets:
- GET and HEAD only (405 with `Allow` otherwise). The request target is percent-decoded (invalid
  encoding or UTF-8: 400) and names a file under the root exactly as a TFTP request would: the same names
  are rendered per client (`dynamic.py`: `boot.ipxe`, `boot.ipxe?mac=...`, `boot.ipxe-<mac>`, pxelinux
  paths) and everything else goes through the same jail (`files.py`: no `..`, no absolute names, no
  symlink out of the root, regular files only). Directories are 403: there are no listings.
- A single byte range (`Range: bytes=a-b`, `a-`, `-n`) gets 206 with `Content-Range`; a range that starts
  past the end gets 416 with `Content-Range: bytes */size`; several ranges or a malformed header are ignored
  (the whole file, 200), as RFC 9110 14.2 allows. `If-Range` that does not match the file's ETag or
  Last-Modified also gets the whole file. `If-None-Match` / `If-Modified-Since` that match get 304.
- Errors are small text bodies ("404 Not Found"); the detailed reason (which may name paths outside the
  root) goes only to the event and the log, never to the client.
The file system is reached through the jail (which opens files); sockets, the event loop and the clock
belong to the I/O layer (`http_server.py`).
"""

from __future__ import annotations

import email.utils
import mimetypes
import os
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote, unquote_to_bytes

import h11

from services.tftp import packets as pk
from services.tftp.dynamic import DynamicFiles
from services.tftp.events import HttpTransferFailed, HttpTransferFinished
from services.tftp.files import Jail, Refused
from shared.events import Event

SERVER = b"bootfleet"
ALLOW = b"GET, HEAD"
MAX_HEAD = 16 << 10  # bytes of request head h11 buffers before it answers 431
SCRIPT_TYPE = b"text/plain; charset=utf-8"
# boot files mimetypes does not know; iPXE and UEFI do not look at the type, browsers and curl do
TYPES = {".ipxe": SCRIPT_TYPE, ".efi": b"application/efi", ".kpxe": b"application/octet-stream",
         ".pxe": b"application/octet-stream", ".lkrn": b"application/octet-stream"}
REASONS = {200: "OK", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 416: "Range Not Satisfiable",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}
UNSATISFIABLE = "unsatisfiable"  # parse_range's answer for a range that starts past the end


# -- pure helpers --------------------------------------------------------------------------------------------------

def parse_range(value: bytes, size: int) -> tuple[int, int] | str | None:
    """A `Range` header against a body of `size` bytes -> (first, last) inclusive, `UNSATISFIABLE`, or None
    (serve the whole body: not a single well-formed byte range)."""
    unit, sep, spec = value.partition(b"=")
    if not sep or unit.strip().lower() != b"bytes":
        return None
    spec = spec.strip()
    if b"," in spec:
        return None  # several ranges: the whole body (a multipart reply buys a boot server nothing)
    first, dash, last = spec.partition(b"-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or not (first or last):
        return None
    if not first:  # the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignored, RFC 9110 14.1.1
    if start >= size:
        return UNSATISFIABLE
    return start, min(end, size - 1)


def split_target(target: bytes) -> tuple[str, str]:
    """The request target -> (name under the root, decoded query); ValueError for a target we cannot read.
    The name keeps what TFTP would be asked: `/a/b` -> `a/b`; `//etc` -> `/etc` (absolute: the jail refuses)."""
    if target.startswith((b"http://", b"https://")):  # absolute-form: the path after the authority
        rest = target.split(b"//", 1)[1]
        slash = rest.find(b"/")
        target = rest[slash:] if slash >= 0 else b"/"
    if not target.startswith(b"/"):
        raise ValueError("the request target is not a path")
    path, _, query = target.partition(b"#")[0].partition(b"?")
    try:
        name = unquote_to_bytes(path).decode("utf-8")
        query_text = unquote(query.decode("ascii"), errors="strict")
    except UnicodeError:
        raise ValueError("the request target is not UTF-8 once percent-decoded") from None
    return name[1:], query_text


def content_type(name: str) -> bytes:
    ext = os.path.splitext(name)[1].lower()
    if ext in TYPES:
        return TYPES[ext]
    guessed = mimetypes.guess_type(name, strict=False)[0]
    return guessed.encode() if guessed else b"application/octet-stream"


def http_date(seconds: float) -> bytes:
    return email.utils.formatdate(seconds, usegmt=True).encode()


def _status_of(refused: Refused) -> int:
    if refused.code == pk.ERR_NOT_FOUND:
        return 404
    if refused.code == pk.ERR_ACCESS:
        return 403
    return 500


# -- the site: what the configuration decides -----------------------------------------------------------------

class Site:
    """The jail and the rendered names HTTP serves: TFTP's own objects (one policy for both protocols),
    swapped whole on a new revision; a connection takes the current site for each request."""

    def __init__(self, jail: Jail, dynamic: DynamicFiles, clock: Callable[[], float] = time.time):
        self.jail = jail
        self.dynamic = dynamic
        self.clock = clock  # wall clock, for Date
        self._date_second = -1
        self._date = b""

    def date(self) -> bytes:
        second = int(self.clock())
        if second != self._date_second:
            self._date_second, self._date = second, http_date(second)
        return self._date


@dataclass(eq=False)
class Reply:
    """What to send for one request. `fd` >= 0: then send `count` bytes of it from `offset` (sendfile), and
    close it. The fields after `close` are for the event."""

    head: bytes
    body: bytes = b""
    fd: int = -1
    offset: int = 0
    count: int = 0
    close: bool = False
    status: int = 200
    method: str = "GET"
    file: str = ""
    mac: str | None = None
    reason: str = ""  # why a request was refused: for the log and the event only
    range: str | None = None
    started: float = 0.0

    @property
    def length(self) -> int:
        """Body bytes this reply sends."""
        return self.count if self.fd >= 0 else len(self.body)


CLOSE = Reply(head=b"", close=True, status=0)  # nothing more to send: close the connection


@dataclass
class _Resource:
    """The body a name resolves to: an open file or bytes in memory."""

    size: int
    fd: int = -1
    data: bytes = b""
    mtime: float | None = None  # files only: Last-Modified, ETag
    mac: str | None = None
    dynamic: bool = False
    etag: bytes = b""
    name: str = ""  # what was served: the file, or the rendered name that matched (with its ?mac= query)


class HttpConnection:
    def __init__(self, site: Site, peer: tuple[str, int], local_ip: str):
        self.site = site  # the I/O layer sets a new one on apply; each request reads it once
        self.peer = peer
        self.local_ip = local_ip
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.events: list[Event] = []
        self.requests = 0
        self._closed = False

    # -- the I/O layer's side -------------------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes from the socket; b"" when the peer closed its side."""
        self.h11.receive_data(data)

    def next_reply(self, now: float) -> Reply | None:
        """The next thing to send: a Reply, CLOSE (then close the socket), or None (read more first)."""
        if self._closed:
            return CLOSE
        conn = self.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        elif conn.our_state is h11.MUST_CLOSE or conn.their_state in (h11.MUST_CLOSE, h11.CLOSED):
            return self._close()
        try:
            while True:
                item = conn.next_event()
                if item is h11.NEED_DATA:
                    return None
                if item is h11.PAUSED:  # a pipelined request waits behind the one answered
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                        continue
                    return self._close()
                if isinstance(item, h11.ConnectionClosed):
                    return self._close()
                if isinstance(item, h11.Request):
                    self.requests += 1
                    return self._answer(item, now)
                # Data/EndOfMessage of a request body: a GET has none worth reading; go on
        except h11.RemoteProtocolError as exc:
            return self._protocol_error(exc, now)

    def done(self, reply: Reply, sent: int, now: float, error: str | None = None) -> None:
        """The reply left (`sent` body bytes), or failed (`error`): its event."""
        duration = round(now - reply.started, 6)
        ip, port = self.peer
        if error is not None:
            self.events.append(HttpTransferFailed(ip=ip, port=port, file=reply.file, mac=reply.mac,
                                                  status=reply.status, reason=error, bytes=sent))
        elif reply.status >= 400:
            self.events.append(HttpTransferFailed(ip=ip, port=port, file=reply.file, mac=reply.mac,
                                                  status=reply.status, reason=reply.reason, bytes=0))
        else:
            self.events.append(HttpTransferFinished(ip=ip, port=port, file=reply.file, mac=reply.mac,
                                                    method=reply.method, status=reply.status, bytes=sent,
                                                    duration=duration, range=reply.range))

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    # -- decisions --------------------------------------------------------------------------------------------------

    def _close(self) -> Reply:
        self._closed = True
        return CLOSE

    def _protocol_error(self, exc: h11.RemoteProtocolError, now: float) -> Reply:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return self._close()
        status = exc.error_status_hint if exc.error_status_hint in REASONS else 400
        reply = self._error(status, f"malformed request: {exc}", "GET", "", None, now)
        reply.close = True
        self._closed = True  # h11 is in ERROR: nothing more can be read on this connection
        return reply

    def _answer(self, request: h11.Request, now: float) -> Reply:
        method = request.method.decode("ascii", "replace")
        site = self.site
        try:
            name, query = split_target(request.target)
        except ValueError as exc:
            return self._error(400, str(exc), method, request.target.decode("ascii", "replace"), None, now)
        if method not in ("GET", "HEAD"):
            return self._error(405, f"method {method} is not served", method, name, None, now,
                               [(b"Allow", ALLOW)])
        headers = {k: v for k, v in request.headers}  # h11 lower-cases names; a repeated header: the last one
        try:
            res = self._resolve(site, name, query)
        except Refused as exc:
            return self._error(_status_of(exc), str(exc), method, name, None, now)
        try:
            return self._serve(site, res, headers, method, res.name, now)
        except BaseException:
            if res.fd >= 0:
                os.close(res.fd)
            raise

    def _resolve(self, site: Site, name: str, query: str) -> _Resource:
        dynamic = site.dynamic
        jail = site.jail
        ip = self.peer[0]
        for candidate in ((f"{name}?{query}", name) if query else (name,)):
            rendered, named_mac = dynamic.match(candidate, jail.exists)
            if rendered:
                body, mac = dynamic.render(candidate, ip, self.local_ip, named_mac)
                return _Resource(size=len(body), data=body, mac=mac, dynamic=True, name=candidate)
        opened = jail.open_read(name)
        try:
            st = os.fstat(opened.fd)
        except OSError as exc:
            os.close(opened.fd)
            raise Refused(pk.ERR_UNDEFINED, f"{name!r}: {exc.strerror}") from None
        etag = f'"{int(st.st_mtime):x}-{st.st_size:x}"'.encode()  # nginx's shape
        return _Resource(size=opened.size, fd=opened.fd, mtime=st.st_mtime, mac=dynamic.mac_for_ip(ip), etag=etag,
                         name=name)

    def _serve(self, site: Site, res: _Resource, headers: dict[bytes, bytes], method: str, file: str,
               now: float) -> Reply:
        size = res.size
        out = [(b"Server", SERVER), (b"Date", site.date()), (b"Accept-Ranges", b"bytes")]
        last_modified = http_date(res.mtime) if res.mtime is not None else None
        if res.dynamic:
            out.append((b"Cache-Control", b"no-store"))  # rendered per client, may hold a CHAP secret
            out.append((b"Content-Type", SCRIPT_TYPE))
        else:
            out += [(b"Content-Type", content_type(file)), (b"Last-Modified", last_modified), (b"ETag", res.etag)]
            if self._not_modified(res, headers):
                os.close(res.fd)
                head = self._head(304, out)
                self.h11.send(h11.EndOfMessage())
                return Reply(head=head, status=304, method=method, file=file, mac=res.mac, started=now,
                             close=self._must_close())
        status, first, count, span = 200, 0, size, None
        wanted = headers.get(b"range")
        if wanted is not None and self._if_range_holds(res, headers.get(b"if-range"), last_modified):
            parsed = parse_range(wanted, size)
            if parsed == UNSATISFIABLE:
                if res.fd >= 0:
                    os.close(res.fd)
                return self._error(416, f"range {wanted.decode('latin-1')} is past the end ({size} bytes)",
                                   method, file, res.mac, now, [(b"Content-Range", f"bytes */{size}".encode())])
            if parsed is not None:
                first, last = parsed
                status, count, span = 206, last - first + 1, f"{first}-{last}"
                out.append((b"Content-Range", f"bytes {first}-{last}/{size}".encode()))
        out.append((b"Content-Length", str(count).encode()))
        head = self._head(status, out)
        reply = Reply(head=head, status=status, method=method, file=file, mac=res.mac, range=span, started=now)
        if method == "HEAD" or count == 0:
            if res.fd >= 0:
                os.close(res.fd)
        elif res.fd >= 0:
            reply.fd, reply.offset, reply.count = res.fd, first, count
            self.h11.send_with_data_passthrough(h11.Data(data=_Length(count)))
        else:
            reply.body = res.data[first:first + count]
            self.h11.send(h11.Data(data=reply.body))
        self.h11.send(h11.EndOfMessage())
        reply.close = self._must_close()
        return reply

    def _not_modified(self, res: _Resource, headers: dict[bytes, bytes]) -> bool:
        match = headers.get(b"if-none-match")
        if match is not None:
            tags = [t.strip() for t in match.split(b",")]
            return b"*" in tags or res.etag in tags or b"W/" + res.etag in tags
        since = headers.get(b"if-modified-since")
        if since is not None and res.mtime is not None:
            try:
                when = email.utils.parsedate_to_datetime(since.decode("latin-1")).timestamp()
            except (TypeError, ValueError, IndexError):
                return False
            return int(res.mtime) <= when
        return False

    def _if_range_holds(self, res: _Resource, if_range: bytes | None, last_modified: bytes | None) -> bool:
        if if_range is None:
            return True
        if res.dynamic:
            return False  # rendered now: no validator to compare
        return if_range == res.etag or if_range == last_modified

    def _must_close(self) -> bool:
        return self.h11.our_state is h11.MUST_CLOSE

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        return self.h11.send(h11.Response(status_code=status, headers=headers, reason=REASONS[status].encode()))

    def _error(self, status: int, reason: str, method: str, file: str, mac: str | None, now: float,
               extra: list[tuple[bytes, bytes]] = ()) -> Reply:
        body = f"{status} {REASONS[status]}\n".encode()
        headers = [(b"Server", SERVER), (b"Date", self.site.date()), (b"Content-Type", SCRIPT_TYPE),
                   (b"Content-Length", str(len(body)).encode()), *extra]
        if status >= 500 or status == 400 or status == 431:
            headers.append((b"Connection", b"close"))
        head = self._head(status, headers)
        reply = Reply(head=head, status=status, method=method, file=file, mac=mac, reason=reason, started=now)
        if method != "HEAD":
            reply.body = body
            self.h11.send(h11.Data(data=body))
        self.h11.send(h11.EndOfMessage())
        reply.close = self._must_close()
        return reply


class _Length:
    """Stands for a file body in h11's books (send_with_data_passthrough): only its length is read."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n
