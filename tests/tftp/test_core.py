"""core.py: the admission rules, bytes and time in, decisions and events out; no sockets."""

import os
from pathlib import Path

import pytest

from services.tftp import packets as pk
from services.tftp.core import Admitted, Answer, Policy, TftpCore
from services.tftp.files import FileCache
from services.tftp.transfer import ReadTransfer, WriteTransfer
from shared import events as bus
from shared.config.model import BootfleetConfig

PEER, OTHER, LOCAL = ("192.0.2.7", 2000), ("192.0.2.8", 2001), "192.0.2.1"


@pytest.fixture
def make(tmp_path):
    root = tmp_path / "root"
    (root / "up").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(3000))
    (root / "up" / "old").write_bytes(b"x")

    def make(send_buffer=1 << 22, **tftp) -> TftpCore:
        config = BootfleetConfig.model_validate({"tftp": {"root": str(root), **tftp}})
        policy = Policy(config, lambda ip: "52:54:00:00:00:07" if ip == PEER[0] else None)
        return TftpCore(policy, FileCache(tftp.get("cache_mib", 1) << 20, 1 << 20), send_buffer)

    return make


def rrq(name="a.bin", mode="octet", **options):
    return pk.build_request(pk.RRQ, name, mode, options)


def wrq(name="up/new", **options):
    return pk.build_request(pk.WRQ, name, "octet", options)


def error_of(answer) -> tuple[int, str]:
    assert type(answer) is Answer, answer
    return pk.parse_error(answer.packet)


def test_a_read_is_admitted_with_its_options_and_started_once_the_loop_says_so(make):
    core = make()
    admitted = core.admit(rrq(blksize="1468", tsize="0"), PEER, LOCAL, 10.0)
    assert type(admitted) is Admitted and not admitted.writing
    t = admitted.transfer
    assert type(t) is ReadTransfer and t.size == 3000 and t.blksize == 1468 and t.started == 10.0
    assert pk.parse_oack(t.oack) == {"blksize": "1468", "tsize": "3000"}
    assert bytes(admitted.source) == (Path(core.policy.jail.root) / "a.bin").read_bytes()  # from the cache
    assert admitted.mac == "52:54:00:00:00:07"  # from the lease of its address, for the timeline
    assert core.take_events() == [] and core.stats["started"] == 0  # nothing runs until the loop opens sockets
    core.started(PEER, admitted)
    (event,) = core.take_events()
    assert event.type == bus.TFTP_STARTED
    assert event.fields() == dict(ip=PEER[0], port=PEER[1], file="a.bin", mac="52:54:00:00:00:07", blksize=1468,
                                  windowsize=1, tsize=3000, mode="octet")
    assert core.take_events() == []  # taken once


def test_a_repeated_request_is_ignored_while_its_transfer_runs(make):
    core = make()
    core.started(PEER, core.admit(rrq(), PEER, LOCAL, 0.0))
    core.take_events()
    assert core.admit(rrq(), PEER, LOCAL, 0.5) is None
    assert core.stats["requests"] == 2 and core.stats["refused"] == 0 and core.take_events() == []
    core.closed(PEER)
    assert type(core.admit(rrq(), PEER, LOCAL, 1.0)) is Admitted  # once closed, it may ask again


def test_malformed_requests_get_error_4_no_larger_than_themselves_and_no_event(make):
    core = make()
    bad = b"\0\x01file\0octet"  # no NUL after the mode
    code, _ = error_of(answer := core.admit(bad, PEER, LOCAL, 0.0))
    assert code == pk.ERR_ILLEGAL and len(answer.packet) <= len(bad)
    assert core.admit(pk.build_ack(3), PEER, LOCAL, 0.0) is None  # stray ACK on the request port: no answer
    assert core.admit(b"\xff", PEER, LOCAL, 0.0) is None
    assert core.stats["malformed"] == 3 and core.stats["refused"] == 0 and core.take_events() == []


def test_the_limit_on_transfers_in_flight(make):
    core = make(max_transfers=1)
    core.started(PEER, core.admit(rrq(), PEER, LOCAL, 0.0))
    core.take_events()
    assert error_of(core.admit(rrq(), OTHER, LOCAL, 0.0)) == (pk.ERR_UNDEFINED, "server busy: too many transfers")
    (event,) = core.take_events()
    assert event.type == bus.TFTP_FAILED
    assert event.fields() == dict(ip=OTHER[0], port=OTHER[1], file="a.bin", mac=None,
                                  reason="server busy: too many transfers", code=0)


def test_modes(make):
    assert error_of(make().admit(rrq(mode="mail"), PEER, LOCAL, 0.0))[0] == pk.ERR_ILLEGAL
    assert error_of(make(netascii=False).admit(rrq(mode="netascii"), PEER, LOCAL, 0.0)) == (
        pk.ERR_ILLEGAL, "netascii mode is disabled")
    admitted = make().admit(rrq(mode="NetASCII"), PEER, LOCAL, 0.0)
    assert type(admitted) is Admitted and admitted.netascii and admitted.mode == "netascii"


def test_read_refusals_name_the_file_and_carry_the_code(make):
    core = make()
    assert error_of(core.admit(rrq("missing"), PEER, LOCAL, 0.0))[0] == pk.ERR_NOT_FOUND
    assert error_of(core.admit(rrq("../etc/passwd"), PEER, LOCAL, 0.0))[0] == pk.ERR_ACCESS
    assert [(e.fields()["file"], e.fields()["code"]) for e in core.take_events()] == [
        ("missing", 1), ("../etc/passwd", 2)]
    assert core.stats["refused"] == 2


def test_options_are_negotiated_after_the_file_is_found_and_the_descriptor_is_closed(make):
    core = make(cache_mib=0)  # no cache: the source is a descriptor
    before = len(os.listdir("/proc/self/fd"))
    assert error_of(core.admit(rrq(blksize="4"), PEER, LOCAL, 0.0))[0] == pk.ERR_OPTIONS
    assert len(os.listdir("/proc/self/fd")) == before
    # a missing file with a bad option: the file decides first
    assert error_of(core.admit(rrq("missing", blksize="4"), PEER, LOCAL, 0.0))[0] == pk.ERR_NOT_FOUND
    admitted = core.admit(rrq(), PEER, LOCAL, 0.0)
    assert type(admitted.source) is int
    admitted.release()
    assert len(os.listdir("/proc/self/fd")) == before


def test_no_blksize_larger_than_the_send_buffer(make):
    core = make(send_buffer=1024, max_blksize=8192)
    assert error_of(core.admit(rrq(blksize="2000"), PEER, LOCAL, 0.0)) == (
        pk.ERR_OPTIONS, "blksize 2000 is larger than the send buffer")


def test_upload_rules_in_their_order(make):
    readonly = make()
    assert error_of(readonly.admit(wrq(), PEER, LOCAL, 0.0))[0] == pk.ERR_ACCESS
    # options first, then the announced size, then the jail (a read-only server says error 3 to a huge tsize)
    assert error_of(readonly.admit(wrq(blksize="4", tsize="999999999"), PEER, LOCAL, 0.0))[0] == pk.ERR_OPTIONS
    assert error_of(readonly.admit(wrq(tsize="999999999"), PEER, LOCAL, 0.0))[0] == pk.ERR_DISK_FULL
    core = make(upload_dir="up", upload_max_size=1000)
    assert error_of(core.admit(wrq("up/old"), PEER, LOCAL, 0.0))[0] == pk.ERR_EXISTS
    assert error_of(core.admit(wrq("a.bin"), PEER, LOCAL, 0.0))[0] == pk.ERR_ACCESS  # outside the upload folder
    admitted = core.admit(wrq(tsize="500"), PEER, LOCAL, 0.0)
    assert type(admitted) is Admitted and admitted.writing and type(admitted.transfer) is WriteTransfer
    assert os.path.exists(admitted.temp_path) and admitted.final_path.endswith("/up/new")
    core.started(PEER, admitted)
    assert core.take_events()[-1].fields() == dict(ip=PEER[0], port=PEER[1], file="up/new", mac=None, blksize=512,
                                                   windowsize=1, tsize=500, mode="octet", upload=True)
    temp = admitted.temp_path
    admitted.release()  # a transfer the loop could not start leaves nothing
    assert not os.path.exists(temp)


def test_how_transfers_end_on_the_wire(make):
    core = make()
    read = core.admit(rrq(), PEER, LOCAL, 1.0)
    t = read.transfer
    t.finished = 1.25
    core.finished(PEER, "a.bin", "m", t)
    core.failed(OTHER, "b.bin", None, "timed out", 512, writing=False)
    up = make(upload_dir="up").admit(wrq(), PEER, LOCAL, 2.0)
    up.transfer.finished = 2.5
    core.upload_finished(PEER, "up/new", None, up.transfer)
    finished, failed, uploaded = core.take_events()
    assert (finished.type, failed.type, uploaded.type) == (bus.TFTP_FINISHED, bus.TFTP_FAILED, bus.TFTP_FINISHED)
    assert finished.fields() == dict(ip=PEER[0], file="a.bin", mac="m", bytes=3000, duration=0.25, blksize=512,
                                     windowsize=1, retransmits=0)
    assert failed.fields() == dict(ip=OTHER[0], port=OTHER[1], file="b.bin", mac=None, reason="timed out", bytes=512)
    assert uploaded.fields() == dict(ip=PEER[0], file="up/new", mac=None, bytes=0, duration=0.5, blksize=512,
                                     windowsize=1, upload=True)
    assert core.stats["finished"] == 2 and core.stats["failed"] == 1
    up.release()
