"""The TFTP core: whether a request is served, from what and with which options; the books and the events.

Theory of operation
-------------------
Sans-IO: no sockets; time comes in as `now` (only the log limiter reads the clock). The I/O loop (io_loop.py) hands `admit()` each datagram that came to the
request port, with the client's address, the address it came to and `now`; the answer is one of
- None: nothing to send (a request repeated while its transfer runs, stray DATA/ACK/garbage: counted, logged);
- `Answer(packet)`: an ERROR to send once from a new port; no transfer (the refusal is counted, logged at most
  20 lines a second, and a `RequestRefused` event queued, except for a malformed request);
- `Admitted`: a transfer to run: its state machine (transfer.py), the file it reads from or writes to, the
  name, the client's MAC and the mode. The loop opens the transfer's sockets, then calls `started()`.
It then reports how each transfer ends (`finished`, `upload_finished`, `failed`) and when its sockets are
gone (`closed`). Events come out only through `take_events()`.

The rules, in the order they are applied (tests/tftp/test_core.py):
1. a request from a client whose transfer is running is ignored: that transfer's timer answers;
2. a packet that is not a well-formed RRQ/WRQ: a malformed RRQ/WRQ gets error 4, cut to the request's own
   length (no amplification for a spoofed source); anything else gets no answer;
3. `max_transfers` in flight: error 0 "server busy";
4. mode: `mail` is error 4; `netascii` is error 4 when `tftp.netascii` is off;
5. a read: the name is rendered (dynamic.py) or opened through the jail (files.py: errors 1 and 2); then the
   options are negotiated (options.py: error 8) with the file's size;
6. a write: the options are negotiated first (error 8), then an announced `tsize` above `upload_max_size` is
   error 3, then the jail decides (read-only, outside the upload folder: error 2; existing: error 6).
Files are file I/O, not sockets: the jail opens them, so the core hands out descriptors the loop closes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from services.tftp import packets as pk
from services.tftp.dynamic import DynamicFiles
from services.tftp.events import (
    RequestRefused,
    TransferFailed,
    TransferFinished,
    TransferStarted,
    UploadFinished,
    UploadStarted,
)
from services.tftp.files import FileCache, Jail, Refused, open_source, to_netascii
from services.tftp.options import OptionError, OptionPolicy, negotiate
from services.tftp.transfer import ReadTransfer, WriteTransfer
from shared.config.model import BootfleetConfig
from shared.events import Event
from shared.log_limit import LogLimiter
from shared.paths import state_path

log = logging.getLogger("bootfleet.tftp")

Peer = tuple[str, int]


class Policy:
    """What the configuration decides, built once per revision and swapped whole."""

    def __init__(self, config: BootfleetConfig, mac_for_ip: Callable[[str], str | None], state_dir=None):
        t = config.tftp
        self.config = config
        self.tftp = t
        # a relative root lives in the state dir, like the lease store and the disk images
        root = str(state_path(state_dir, t.root)) if state_dir is not None else t.root
        self.jail = Jail(root, t.upload_dir)
        self.dynamic = DynamicFiles(config, mac_for_ip)
        self.options = OptionPolicy(
            max_blksize=t.max_blksize, max_windowsize=t.max_windowsize, default_timeout=t.default_timeout,
            min_timeout=t.min_timeout, max_timeout=t.max_timeout,
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """Send `packet` once to the client, from a new port on the address its request came to; no transfer."""

    packet: bytes


@dataclass(slots=True)
class Admitted:
    """A transfer to run. A read has `source` (a descriptor the loop closes, or the bytes in memory); an
    upload `out_fd`, a temporary file renamed to `final_path` once complete (files.finish_upload)."""

    file: str
    mac: str | None
    mode: str
    transfer: ReadTransfer | WriteTransfer
    netascii: bool
    tsize: int | None  # a read: the size served; an upload: the size announced, None when not
    source: int | memoryview | None = None
    out_fd: int = -1
    temp_path: str = ""
    final_path: str = ""

    @property
    def writing(self) -> bool:
        return type(self.transfer) is WriteTransfer

    def release(self) -> None:
        """Close what the admission opened (the loop could not start the transfer)."""
        if type(self.source) is int:
            os.close(self.source)
        self.source = None
        if self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1
            os.unlink(self.temp_path)


class TftpCore:
    def __init__(self, policy: Policy, cache: FileCache, send_buffer: int):
        self.policy = policy  # swapped whole by the service on a new revision
        self.cache = cache
        self.send_buffer = send_buffer  # the loop's send buffer: no blksize larger than it
        self.running: set[Peer] = set()  # clients with a transfer in flight
        self.events: list[Event] = []
        self.limiter = LogLimiter(log, "log lines about refused or malformed requests")
        self.stats = dict(requests=0, malformed=0, refused=0, started=0, finished=0, failed=0)

    def take_events(self) -> list[Event]:
        """The events since the last call, oldest first."""
        events, self.events = self.events, []
        return events

    # -- requests ----------------------------------------------------------------------------------------------

    def admit(self, data: bytes, peer: Peer, local: str, now: float) -> Admitted | Answer | None:
        """A datagram on the request port from `peer`, sent to our address `local`."""
        self.stats["requests"] += 1
        if peer in self.running:
            return None  # the client repeated its request: the transfer's own timer answers
        try:
            request = pk.parse_request(data)
        except pk.MalformedPacket as exc:
            if len(data) >= 5 and pk.OPCODE.unpack_from(data)[0] in (pk.RRQ, pk.WRQ):
                return self._refuse(peer, pk.ERR_ILLEGAL, str(exc), malformed=True, limit=len(data))
            self.stats["malformed"] += 1  # stray DATA/ACK/garbage on the request port: no answer
            if self.limiter.allow(now):
                log.info("%s:%d ignored on the request port: %s", *peer, exc)
            return None
        tftp = self.policy.tftp
        name = request.filename
        if len(self.running) >= tftp.max_transfers:
            return self.refuse(peer, pk.ERR_UNDEFINED, "server busy: too many transfers", name)
        if request.mode == "mail":
            return self.refuse(peer, pk.ERR_ILLEGAL, "mail mode is not supported", name)
        netascii = request.mode == "netascii"
        if netascii and not tftp.netascii:
            return self.refuse(peer, pk.ERR_ILLEGAL, "netascii mode is disabled", name)
        if request.opcode == pk.WRQ:
            return self._admit_write(request, peer, now, netascii)
        return self._admit_read(request, peer, local, now, netascii)

    def _admit_read(self, request: pk.Request, peer: Peer, local: str, now: float,
                    netascii: bool) -> Admitted | Answer:
        policy = self.policy
        name = request.filename
        mac = None
        source: int | memoryview
        try:
            rendered, named_mac = policy.dynamic.match(name, policy.jail.exists)
            if rendered:
                body, mac = policy.dynamic.render(name, peer[0], local, named_mac)
                if netascii:
                    body = to_netascii(body)
                source, size = memoryview(body), len(body)
            else:
                mac = policy.dynamic.mac_for_ip(peer[0])  # for the client's boot timeline
                source, size = open_source(policy.jail, self.cache, name, netascii, policy.tftp.netascii_max_size)
        except Refused as exc:
            return self.refuse(peer, exc.code, str(exc), name, mac)
        try:
            negotiated = negotiate(request.options, policy.options, size)
            if negotiated.blksize > self.send_buffer:
                raise OptionError(f"blksize {negotiated.blksize} is larger than the send buffer")
        except OptionError as exc:
            if type(source) is int:
                os.close(source)
            return self.refuse(peer, pk.ERR_OPTIONS, str(exc), name, mac)
        oack = pk.build_oack(negotiated.oack) if negotiated.oack else None
        transfer = ReadTransfer(size, negotiated, policy.tftp.retries, now, oack)
        return Admitted(name, mac, request.mode, transfer, netascii, size, source=source)

    def _admit_write(self, request: pk.Request, peer: Peer, now: float, netascii: bool) -> Admitted | Answer:
        tftp = self.policy.tftp
        name = request.filename
        try:
            negotiated = negotiate(request.options, self.policy.options, None, writing=True)
            if negotiated.tsize is not None and negotiated.tsize > tftp.upload_max_size:
                return self.refuse(peer, pk.ERR_DISK_FULL,
                                   f"upload of {negotiated.tsize} bytes is larger than {tftp.upload_max_size}", name)
            fd, temp, final = self.policy.jail.open_write(name, tftp.upload_overwrite)
        except OptionError as exc:
            return self.refuse(peer, pk.ERR_OPTIONS, str(exc), name)
        except Refused as exc:
            return self.refuse(peer, exc.code, str(exc), name)
        oack = pk.build_oack(negotiated.oack) if negotiated.oack else None
        transfer = WriteTransfer(negotiated, tftp.retries, now, tftp.upload_max_size, oack)
        return Admitted(name, None, request.mode, transfer, netascii, negotiated.tsize, out_fd=fd, temp_path=temp,
                        final_path=final)

    def refuse(self, peer: Peer, code: int, reason: str, file: str = "", mac: str | None = None) -> Answer:
        """An ERROR for a request that gets no transfer; also for one the loop could not start."""
        return self._refuse(peer, code, reason, file, mac)

    def _refuse(self, peer: Peer, code: int, reason: str, file: str = "", mac: str | None = None,
                malformed: bool = False, limit: int | None = None) -> Answer:
        self.stats["malformed" if malformed else "refused"] += 1
        if self.limiter.allow():
            log.warning("%s:%d %s%s: %s (error %d)", peer[0], peer[1], "refused " if not malformed else "",
                        repr(file) if file else "request", reason, code)
        # an answer to garbage is no larger than the garbage: no amplification for a spoofed source
        message = reason[: max(0, limit - 5)] if limit is not None else reason
        if not malformed:
            self.events.append(RequestRefused(ip=peer[0], port=peer[1], file=file, mac=mac, reason=reason, code=code))
        return Answer(pk.build_error(code, message))

    # -- transfers ---------------------------------------------------------------------------------------------

    def started(self, peer: Peer, admitted: Admitted) -> None:
        """The loop opened the transfer's sockets; it is running."""
        self.running.add(peer)
        self.stats["started"] += 1
        t = admitted.transfer
        if admitted.writing:
            self.events.append(UploadStarted(
                ip=peer[0], port=peer[1], file=admitted.file, mac=None, blksize=t.blksize, windowsize=t.windowsize,
                tsize=admitted.tsize, mode=admitted.mode))
        else:
            self.events.append(TransferStarted(
                ip=peer[0], port=peer[1], file=admitted.file, mac=admitted.mac, blksize=t.blksize,
                windowsize=t.windowsize, tsize=admitted.tsize, mode=admitted.mode))

    def finished(self, peer: Peer, file: str, mac: str | None, t: ReadTransfer) -> None:
        self.stats["finished"] += 1
        self.events.append(TransferFinished(
            ip=peer[0], file=file, mac=mac, bytes=t.size, duration=round(t.finished - t.started, 6),
            blksize=t.blksize, windowsize=t.windowsize, retransmits=t.retransmits))

    def upload_finished(self, peer: Peer, file: str, mac: str | None, t: WriteTransfer) -> None:
        """The last block is in and the file renamed into place (the transfer may still dally)."""
        self.stats["finished"] += 1
        self.events.append(UploadFinished(
            ip=peer[0], file=file, mac=mac, bytes=t.size, duration=round(t.finished - t.started, 6),
            blksize=t.blksize, windowsize=t.windowsize))

    def failed(self, peer: Peer, file: str, mac: str | None, reason: str, sent: int, writing: bool) -> None:
        self.stats["failed"] += 1
        if self.limiter.allow():
            log.warning("transfer of %r %s %s:%d failed: %s", file, "from" if writing else "to", *peer, reason)
        self.events.append(TransferFailed(ip=peer[0], port=peer[1], file=file, mac=mac, reason=reason, bytes=sent))

    def closed(self, peer: Peer) -> None:
        """The transfer's sockets are gone: the client may ask again."""
        self.running.discard(peer)
