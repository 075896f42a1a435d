"""io_loop.py's answer to errors its connected transfer socket reports: an ICMP port-unreachable ends the
transfer, a host/network unreachable is a lost packet (the timer resends), anything else fails the transfer as
an internal error. The socket is a stand-in that raises on demand: a real EHOSTUNREACH needs a dead ARP entry."""

import errno
import os

from services.tftp.options import negotiate
from services.tftp.core import Policy
from services.tftp.io_loop import Slot, TftpLoop
from services.tftp.transfer import ReadTransfer
from shared.config.model import BootfleetConfig


class FlakySocket:
    """Sends succeed until `error` is set; then each send raises it once."""

    def __init__(self):
        self.r, self.w = os.pipe()  # a real descriptor for epoll
        self.error: OSError | None = None
        self.sent = 0

    def fileno(self):
        return self.r

    def _send(self, *args):
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        self.sent += 1

    send = sendmsg = _send

    def close(self):
        os.close(self.r)
        os.close(self.w)


def server_with_transfer(tmp_path):
    config = BootfleetConfig.model_validate({"tftp": {"root": str(tmp_path), "retries": 3}})
    events = []
    server = TftpLoop(Policy(config, lambda ip: None))
    server.on_events = lambda: events.extend((e.type, e.fields()) for e in server.take_events())
    now = 1000.0
    transfer = ReadTransfer(5000, negotiate({}, server.policy.options, 5000), 3, now)
    slot = Slot(FlakySocket(), FlakySocket(), ("192.0.2.7", 2000), transfer, False, "f.bin", None,
                source=memoryview(bytes(5000)))
    server._register(slot, now)
    server._send_blocks(slot, transfer.start(now))
    return server, slot, events, now


def test_host_unreachable_is_a_lost_packet(tmp_path):
    server, slot, events, now = server_with_transfer(tmp_path)
    slot.sock.error = OSError(errno.EHOSTUNREACH, "No route to host")
    later = slot.transfer.deadline + 0.01
    server._on_timers(later)  # the retransmission meets the error
    assert not slot.closed and server.stats["send_errors"] == 1 and server.stats["internal_errors"] == 0
    assert server.heap and server.heap[0][2] is slot  # it keeps its timer ...
    server._on_timers(slot.transfer.deadline + 0.01)
    assert slot.sock.sent == 2  # ... which resends
    assert not [e for e in events if e[0] == "tftp.transfer.failed"]
    server.stop()


def test_port_unreachable_ends_the_transfer(tmp_path):
    server, slot, events, now = server_with_transfer(tmp_path)
    slot.sock.error = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    server._on_timers(slot.transfer.deadline + 0.01)
    assert slot.closed and not server.slots and not server.catchers and server.counters()["failed"] == 1
    assert [f["reason"] for t, f in events if t == "tftp.transfer.failed"] == ["the client's port is unreachable (ICMP)"]
    server.stop()


def test_other_errors_are_internal_errors(tmp_path):
    server, slot, events, now = server_with_transfer(tmp_path)
    slot.sock.error = OSError(errno.EBADF, "Bad file descriptor")
    server._on_timers(slot.transfer.deadline + 0.01)
    assert slot.closed and server.stats["internal_errors"] == 1
    server.stop()
