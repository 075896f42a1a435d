"""Sans-IO TFTP transfer state machines: a read (server sends DATA) and a write (server receives DATA).

Theory of operation
-------------------
A transfer knows nothing of sockets, files or clocks: the I/O layer feeds it the datagrams that came from the
client's TID (`on_packet(data, now)`) and the passing of time (`on_timer(now)` once `now >= deadline`), and
does what the answers say. The address check (wrong TID -> error 5) is the I/O layer's, since only it sees
addresses; a transfer never hears of such a packet, so it changes nothing.

ReadTransfer: the file has `size` bytes and `total = size // blksize + 1` blocks; the last one is shorter than
blksize (possibly empty). Blocks are counted from 1 without limit; on the wire the number wraps to 0 after
65535, as tftpd-hpa and iPXE do. The answer to an input is a count: send that many blocks from `first` on
(blocks first..first+count-1, each `block_bounds(n)` bytes of the file); 0: send nothing. An int and an
attribute rather than a tuple, so an ACK costs no allocation.
- With options the OACK is block 0 (`first == 0`, count 1): the client's ACK 0 starts block 1.
- A window is `windowsize` blocks (RFC 7440; 1 without the option). An ACK of block n with
  acked < n <= sent moves `acked` to n and sends the next window from n + 1, so an ACK of part of a window
  (the client saw a gap) restarts from its gap.
- An ACK of a block already acknowledged is a duplicate and is ignored: DATA is sent again only when the
  timer fires (the Sorcerer's Apprentice fix, RFC 1350 errata / RFC 1123 4.2.3.1). So is an ACK of a block
  never sent.
- The timer resends the current window (or the OACK) every `timeout` seconds, `retries` times, then fails.
- An ERROR from the client ends the transfer; any other opcode is error 4 (illegal operation).

WriteTransfer: the answer to the request is the OACK or ACK 0. The answer to a packet is the reply to send (or
None); DATA n+1 (the next in order) is left in `payload` for the I/O layer to write at `offset` (n * blksize),
and acknowledged at the end of each window and at the last (short) block.
Anything out of order is answered by an ACK of the last block in order (RFC 7440). After the last block the
transfer dallies for one timeout, re-acknowledging a retransmitted last block, then is done.
"""

from __future__ import annotations

from services.tftp import packets as pk
from services.tftp.options import Negotiated

ACTIVE, DALLY, DONE, FAILED = "active", "dally", "done", "failed"

_unpack = pk.HEADER.unpack_from


class ReadTransfer:
    __slots__ = (
        "size", "blksize", "windowsize", "timeout", "retries", "total", "acked", "sent", "first", "oack", "waiting_oack",
        "tries", "deadline", "state", "reason", "reply", "retransmits", "started", "finished",
    )

    def __init__(self, size: int, negotiated: Negotiated, retries: int, now: float, oack: bytes | None = None):
        self.size = size
        self.blksize = negotiated.blksize
        self.windowsize = negotiated.windowsize
        self.timeout = negotiated.timeout
        self.retries = retries
        self.total = size // self.blksize + 1
        self.acked = 0  # highest block the client acknowledged
        self.sent = 0  # highest block sent
        self.first = 0  # the first block of the last answer (0: the OACK)
        self.oack = oack
        self.waiting_oack = oack is not None
        self.tries = 0
        self.deadline = now + self.timeout
        self.state = ACTIVE
        self.reason = ""
        self.reply: bytes | None = None  # an ERROR for the client when this side ends the transfer
        self.retransmits = 0
        self.started = now
        self.finished = now

    def block_bounds(self, block: int) -> tuple[int, int]:
        """(offset, length) of block n in the file."""
        offset = (block - 1) * self.blksize
        return offset, min(self.blksize, self.size - offset)

    def start(self, now: float) -> int:
        """-> blocks to send from `first` on: the OACK (block 0) or the first window."""
        if self.waiting_oack:
            self.deadline = now + self.timeout
            self.first = 0
            return 1
        return self._window(now)

    def _window(self, now: float) -> int:
        self.first = self.acked + 1
        count = min(self.windowsize, self.total - self.acked)
        self.sent = self.acked + count
        self.deadline = now + self.timeout
        return count

    def on_packet(self, data, now: float) -> int:
        """-> blocks to send from `first` on (0: none)."""
        if self.state is not ACTIVE:
            return 0
        if len(data) < 4:
            return self._illegal(f"{len(data)}-byte packet is too short for TFTP", now)
        op, block = _unpack(data)
        if op == 4 and not self.waiting_oack:  # ACK: the hot path, inline
            acked = self.acked
            delta = (block - acked) & 0xFFFF
            if delta == 0 or acked + delta > self.sent:
                return 0  # duplicate or never-sent block: wait for the timer, never double the traffic
            acked += delta
            self.acked = acked
            self.tries = 0
            count = self.total - acked
            if count <= 0:
                self.state = DONE
                self.finished = now
                return 0
            if count > self.windowsize:
                count = self.windowsize
            self.sent = acked + count
            self.deadline = now + self.timeout
            self.first = acked + 1
            return count
        if op == pk.ACK:
            if self.waiting_oack:
                if block != 0:
                    return 0  # a stray ACK before the OACK's: the OACK timer covers loss
                self.waiting_oack = False
                self.tries = 0
                return self._window(now)
        if op == pk.ERROR:
            code, message = pk.parse_error(data)
            self.state = FAILED
            self.finished = now
            self.reason = f"client sent error {code}: {message}"
            return 0
        return self._illegal(f"unexpected {pk.OPCODE_NAMES.get(op, f'opcode {op}')} during a read", now)

    def _illegal(self, why: str, now: float) -> int:
        self.state = FAILED
        self.finished = now
        self.reason = why
        self.reply = pk.build_error(pk.ERR_ILLEGAL, why)
        return 0

    def on_timer(self, now: float) -> int:
        """-> blocks to send again from `first` on (0: none; the transfer may have failed)."""
        if self.state is not ACTIVE or now < self.deadline:
            return 0
        if self.tries >= self.retries:
            self.state = FAILED
            self.finished = now
            what = "OACK" if self.waiting_oack else f"block {self.acked + 1}"
            self.reason = f"no ACK of {what} after {self.retries} retransmissions ({self.timeout:g} s each)"
            self.reply = pk.build_error(pk.ERR_UNDEFINED, "timed out")
            return 0
        self.tries += 1
        self.retransmits += 1
        return self.start(now) if self.waiting_oack else self._window(now)


class WriteTransfer:
    __slots__ = (
        "blksize", "windowsize", "timeout", "retries", "max_size", "received", "in_window", "tries", "deadline",
        "state", "reason", "reply", "last_ack", "size", "retransmits", "started", "finished", "oack", "payload",
        "offset",
    )

    def __init__(self, negotiated: Negotiated, retries: int, now: float, max_size: int, oack: bytes | None = None):
        self.blksize = negotiated.blksize
        self.windowsize = negotiated.windowsize
        self.timeout = negotiated.timeout
        self.retries = retries
        self.max_size = max_size
        self.received = 0  # blocks received in order
        self.in_window = 0
        self.tries = 0
        self.deadline = now + self.timeout
        self.state = ACTIVE
        self.reason = ""
        self.reply: bytes | None = None
        self.oack = oack
        self.last_ack = oack if oack is not None else pk.build_ack(0)
        self.size = 0
        self.retransmits = 0
        self.started = now
        self.finished = now
        self.payload: memoryview | None = None  # what the last packet brought in order, to write at `offset`
        self.offset = 0

    def start(self, now: float) -> bytes:
        self.deadline = now + self.timeout
        return self.last_ack

    def on_packet(self, data, now: float) -> bytes | None:
        """-> the packet to send (or None). `payload` is then the data to write at `offset` (or None); it is a
        view of `data`, valid until the caller reuses that buffer."""
        self.payload = None
        if self.state not in (ACTIVE, DALLY):
            return None
        if len(data) < 4:
            return self._illegal(f"{len(data)}-byte packet is too short for TFTP", now)
        op, block = _unpack(data)
        if op == pk.DATA:
            delta = (block - self.received) & 0xFFFF
            if delta != 1 or self.state is DALLY:
                # a retransmission or a gap: acknowledge what we have, in order
                self.in_window = 0
                return self._ack(now)
            payload = memoryview(data)[4:]
            if len(payload) > self.blksize:
                return self._illegal(f"DATA of {len(payload)} bytes is larger than blksize {self.blksize}", now)
            offset = self.received * self.blksize
            if offset + len(payload) > self.max_size:
                self.state = FAILED
                self.finished = now
                self.reason = f"upload is larger than {self.max_size} bytes"
                return pk.build_error(pk.ERR_DISK_FULL, self.reason)
            self.received += 1
            self.size = offset + len(payload)
            self.tries = 0
            self.in_window += 1
            self.payload = payload
            self.offset = offset
            if len(payload) < self.blksize:
                self.state = DALLY
                self.finished = now
                return self._ack(now)
            if self.in_window >= self.windowsize:
                self.in_window = 0
                return self._ack(now)
            self.deadline = now + self.timeout
            return None
        if op == pk.ERROR:
            code, message = pk.parse_error(data)
            self.state = FAILED
            self.finished = now
            self.reason = f"client sent error {code}: {message}"
            return None
        return self._illegal(f"unexpected {pk.OPCODE_NAMES.get(op, f'opcode {op}')} during a write", now)

    def _ack(self, now: float) -> bytes:
        self.last_ack = pk.build_ack(self.received)
        self.deadline = now + self.timeout
        return self.last_ack

    def _illegal(self, why: str, now: float) -> bytes:
        self.state = FAILED
        self.finished = now
        self.reason = why
        return pk.build_error(pk.ERR_ILLEGAL, why)

    def on_timer(self, now: float) -> bytes | None:
        if now < self.deadline:
            return None
        if self.state is DALLY:
            self.state = DONE
            return None
        if self.state is not ACTIVE:
            return None
        if self.tries >= self.retries:
            self.state = FAILED
            self.finished = now
            self.reason = f"no DATA {self.received + 1} after {self.retries} retransmissions ({self.timeout:g} s each)"
            return pk.build_error(pk.ERR_UNDEFINED, "timed out")
        self.tries += 1
        self.retransmits += 1
        self.deadline = now + self.timeout
        return self.last_ack
