"""The shared event loop (event_loop.py) that serves connections in full feature phase, in process: an
io_loop.Server on loopback with a fake SCSI target, driven over real sockets. Partial sends to a peer with
a tiny send buffer, a peer that stops reading (the loop neither blocks nor spins, others are served),
abort from another thread, the NOP-In timeout, a target-requested logout, busy-poll keeping the thread,
stop with connections on the loop."""

from __future__ import annotations

import os
import socket
import time

import pytest

from services.iscsi_target import events as ev
from services.iscsi_target import io_loop
from services.iscsi_target import pdu as P
from services.iscsi_target.access import AccessPolicy
from shared.config.iscsi import AuthConfig
from support import wait_for
from tests.iscsi.fake_scsi import FakeLun, FakeTarget
from tests.iscsi.initiator import TARGET, Initiator, Registry, read10, write10

BLOCKS = 16384  # an 8 MiB LUN of 512-byte blocks


@pytest.fixture
def server():
    made = []

    def make(**settings):
        lun = FakeLun(blocks=BLOCKS)
        lun.data[:] = os.urandom(len(lun.data))
        registry = Registry(AccessPolicy(AuthConfig()), scsi=FakeTarget(TARGET, {0: lun}))
        events: list = []
        cfg = {"busy_poll_us": 0, "nop_interval": 30.0, "nop_timeout": 15.0, "cmd_window": 32, **settings}
        srv = io_loop.Server(registry, events.append, cfg)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        srv.set_portals([("127.0.0.1", port)])
        srv.port, srv.events, srv.lun = port, events, lun
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()


class Client:
    """A socket and the PDU builders of tests/iscsi/initiator.py."""

    def __init__(self, port, isid=0x800000000001):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.ini = Initiator(AccessPolicy(AuthConfig()), isid=isid)
        self.reader = P.PduReader(1 << 24)
        self.buf = bytearray()
        self.queue: list = []

    def pdus(self, count=1, timeout=10.0) -> list:
        """The next `count` PDUs the target sends."""
        out = self.queue
        self.sock.settimeout(timeout)
        while len(out) < count:
            items, used = self.reader.feed(memoryview(self.buf))
            for p in items:
                p.data = bytes(p.data)
            del self.buf[:used]
            out += items
            if len(out) >= count:
                break
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError(f"closed after {len(out)} PDUs")
            self.buf += data
        self.queue = out[count:]
        return out[:count]

    def login(self):
        keys = [("InitiatorName", "iqn.2026-11.org.test:init"), ("SessionType", "Normal"), ("TargetName", TARGET),
                ("MaxRecvDataSegmentLength", "262144")]
        self.sock.sendall(self.ini.login_pdu(keys, 1, 3))
        (rsp,) = self.pdus()
        assert rsp.opcode == P.OP_LOGIN_RSP and rsp.login_status == 0
        self.ini.after_login(rsp)

    def read(self, lba, blocks, send=True):
        itt, raw = self.ini.cmd(read10(lba, blocks), edtl=blocks * 512, read=True)
        if send:
            self.sock.sendall(raw)
        return itt, raw

    def collect(self, itts) -> dict:
        """Data-In of these commands until each has its status: itt -> data."""
        data = {itt: bytearray() for itt in itts}
        done = set()
        while done != set(itts):
            (p,) = self.pdus()
            if p.opcode == P.OP_DATA_IN:
                data[p.itt] += p.data
                if p.flags & P.F_STATUS:
                    done.add(p.itt)
            elif p.opcode == P.OP_SCSI_RSP:
                done.add(p.itt)
        return data

    def eof(self, timeout=10.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(1 << 20):
                    return True
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def only_runner(srv):
    wait_for(lambda: len(srv.connections()) == 1 and srv.connections()[0].loop is not None, timeout=5,
             what="the connection on the loop")
    return srv.connections()[0]


def test_full_feature_connection_moves_to_the_loop_and_its_thread_ends(server):
    srv = server()
    c = Client(srv.port)
    c.login()
    runner = only_runner(srv)
    runner.thread.join(5)
    assert not runner.thread.is_alive()
    itts = [c.read(i * 2048, 2048)[0] for i in range(3)]  # 3 MiB pipelined
    data = c.collect(itts)
    for i, itt in enumerate(itts):
        assert bytes(data[itt]) == bytes(srv.lun.data[i * 1048576:(i + 1) * 1048576])
    _, raw = c.ini.simple(P.OP_LOGOUT_REQ, flags=0x80 | 0)
    c.sock.sendall(raw)
    (rsp,) = c.pdus()
    assert rsp.opcode == P.OP_LOGOUT_RSP
    assert c.eof()
    wait_for(lambda: not srv.connections(), timeout=5, what="the connection forgotten")
    assert [e for e in srv.events if isinstance(e, ev.Logout)]


def test_partial_sends_with_a_tiny_send_buffer_keep_every_byte_in_order(server):
    srv = server()
    c = Client(srv.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a smaller window makes TCP itself crawl
    c.login()
    runner = only_runner(srv)
    runner.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    itts = [c.read(i * 2048, 2048)[0] for i in range(8)]  # the whole LUN, 8 x 1 MiB at once
    time.sleep(0.3)
    assert runner.pending, "the target should be holding output the peer has not taken"
    data = c.collect(itts)
    assert b"".join(bytes(data[i]) for i in itts) == bytes(srv.lun.data)
    assert not runner.pending and not runner.want_out


def test_a_peer_that_stops_reading_neither_blocks_nor_spins_the_loop(server):
    srv = server()
    stalled = Client(srv.port, isid=0x800000000001)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    stalled.login()
    only_runner(srv).sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    itts = [stalled.read(i * 2048, 2048)[0] for i in range(8)]  # 8 MiB it will not read for now
    wait_for(lambda: srv.connections()[0].pending, timeout=5, what="output pending")
    cpu0 = time.process_time()
    other = Client(srv.port, isid=0x800000000002)
    other.login()
    t0 = time.monotonic()
    for k in range(20):
        itt, _ = other.read(k * 64, 64)
        data = other.collect([itt])
        assert bytes(data[itt]) == bytes(srv.lun.data[k * 32768:(k + 1) * 32768])
    assert time.monotonic() - t0 < 3.0
    time.sleep(1.0)
    assert time.process_time() - cpu0 < 0.6, "the loop spins on the stalled connection"
    data = stalled.collect(itts)
    assert b"".join(bytes(data[i]) for i in itts) == bytes(srv.lun.data)


def test_abort_from_another_thread_while_in_the_loop(server):
    srv = server()
    c = Client(srv.port)
    c.login()
    runner = only_runner(srv)
    runner.abort("reinstated by a new login with the same ISID")
    assert c.eof()
    wait_for(lambda: not srv.connections(), timeout=5, what="the connection forgotten")
    (logout,) = [e for e in srv.events if isinstance(e, ev.Logout)]
    assert logout.reason == "reinstated by a new login with the same ISID"


def test_nop_timeout_in_the_loop(server):
    srv = server(nop_interval=1.0, nop_timeout=1.0)
    c = Client(srv.port)
    c.login()
    only_runner(srv)
    (nop,) = c.pdus(timeout=5)
    assert nop.opcode == P.OP_NOP_IN and nop.itt == P.RSVD_TAG
    t0 = time.monotonic()
    assert c.eof(timeout=5)  # no NOP-Out in answer: dropped about nop_timeout later
    assert time.monotonic() - t0 < 3.5
    wait_for(lambda: any(isinstance(e, ev.Logout) for e in srv.events), timeout=5, what="the logout event")
    (logout,) = [e for e in srv.events if isinstance(e, ev.Logout)]
    assert "NOP-In" in logout.reason


def test_logout_requested_from_another_thread(server):
    srv = server()
    c = Client(srv.port)
    c.login()
    runner = only_runner(srv)
    runner.request_logout(1.0)
    (msg,) = c.pdus()
    assert msg.opcode == P.OP_ASYNC
    assert c.eof(timeout=5)  # the grace passed without a logout
    wait_for(lambda: not srv.connections(), timeout=5, what="the connection forgotten")


def test_busy_poll_keeps_the_connection_in_its_thread(server):
    srv = server(busy_poll_us=50)
    c = Client(srv.port)
    c.login()
    itt, _ = c.read(0, 8)
    assert bytes(c.collect([itt])[itt]) == bytes(srv.lun.data[:4096])
    (runner,) = srv.connections()
    assert runner.loop is None and runner.thread.is_alive()


def test_stop_ends_the_connections_on_the_loop_and_the_loop(server):
    srv = server()
    clients = [Client(srv.port, isid=0x800000000001 + k) for k in range(3)]
    for c in clients:
        c.login()
    wait_for(lambda: len(srv.connections()) == 3 and all(r.loop for r in srv.connections()), timeout=5,
             what="three connections on the loop")
    loop = srv.connections()[0].loop
    srv.stop()
    assert not srv.connections() and not loop.thread.is_alive()
    for c in clients:
        assert c.eof()


def test_abort_while_output_is_pending_ends_it_with_the_abort_reason(server):
    srv = server()
    c = Client(srv.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.login()
    runner = only_runner(srv)
    runner.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for i in range(4):
        c.read(i * 2048, 2048)
    wait_for(lambda: runner.want_out, timeout=5, what="output pending")
    runner.abort("target stopping")
    wait_for(lambda: not srv.connections(), timeout=5, what="the connection forgotten")
    (logout,) = [e for e in srv.events if isinstance(e, ev.Logout)]
    assert logout.reason == "target stopping"


@pytest.mark.parametrize("busy_poll_us", [0, 50], ids=["loop", "thread"])
def test_a_pdu_larger_than_the_receive_buffer_grows_it(server, monkeypatch, busy_poll_us):
    monkeypatch.setattr(io_loop, "RECV_BUFFER", 4096)  # an 8 KiB immediate WRITE cannot fit: the buffer grows
    srv = server(busy_poll_us=busy_poll_us)
    c = Client(srv.port)
    c.login()
    payload = os.urandom(8192)
    itt, raw = c.ini.cmd(write10(32, 16), edtl=8192, write=True, data=payload, immediate=False)
    c.sock.sendall(raw)
    (rsp,) = c.pdus()
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.itt == itt and rsp.status == 0
    assert bytes(srv.lun.data[32 * 512:48 * 512]) == payload
    itt, _ = c.read(32, 16)
    assert bytes(c.collect([itt])[itt]) == payload


def test_which_luns_keep_a_thread_their_flushes_wait_for_the_disk(tmp_path):
    from services.iscsi_target.scsi.backstore import FileBackstore, RamBackstore
    from services.iscsi_target.scsi.lun import LogicalUnit
    from services.iscsi_target.scsi.overlay import Overlay

    base = tmp_path / "v1.img"
    base.write_bytes(bytes(1 << 20))
    units = {
        "ram": LogicalUnit(RamBackstore(1 << 20), 0),
        "file": LogicalUnit(FileBackstore(tmp_path / "disk.img", size=1 << 20), 0),
        "file, readonly": LogicalUnit(FileBackstore(base, readonly=True, create=False), 0),
        "file, LU readonly": LogicalUnit(FileBackstore(tmp_path / "ro.img", size=1 << 20), 0, readonly=True),
        "discard overlay": LogicalUnit(Overlay(str(base), tmp_path / "pc1.overlay", durable=False), 0),
        "persistent overlay": LogicalUnit(Overlay(str(base), tmp_path / "pc2.overlay", durable=True), 0),
    }
    waits = {name: lu.waits_on_disk for name, lu in units.items()}
    assert waits == {"ram": False, "file": True, "file, readonly": False, "file, LU readonly": False,
                     "discard overlay": False, "persistent overlay": True}
    assert not io_loop.waits_on_disk(None)  # discovery
    assert io_loop.waits_on_disk(FakeTarget(TARGET, {0: units["ram"], 1: units["persistent overlay"]}))
    assert not io_loop.waits_on_disk(FakeTarget(TARGET, {0: units["ram"], 1: units["discard overlay"]}))
    for lu in units.values():
        close = getattr(lu.store, "close", None)
        if close:
            close()


def test_a_connection_to_a_lun_that_waits_on_the_disk_keeps_its_thread(server):
    srv = server()
    srv.lun.waits_on_disk = True  # as a file LUN's or a persistent overlay's: its fdatasync must not stall the loop
    c = Client(srv.port)
    c.login()
    itt, _ = c.read(0, 8)
    assert bytes(c.collect([itt])[itt]) == bytes(srv.lun.data[:4096])
    (runner,) = srv.connections()
    assert runner.loop is None and runner.thread.is_alive()
