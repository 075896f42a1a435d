"""transfer.py: the sans-IO read and write state machines, bytes and time in, decisions out."""

from services.tftp import packets as pk
from services.tftp.options import Negotiated
from services.tftp.transfer import ACTIVE, DALLY, DONE, FAILED, ReadTransfer, WriteTransfer


def ack(n):
    return pk.build_ack(n)


def blocks(t, count):
    """What an answer asks to send: (first, count); block 0 is the OACK, () nothing."""
    return (t.first, count) if count else ()


def wrote(t, reply):
    """A write transfer's answer as (write, reply), write = (offset, bytes) or None."""
    return ((t.offset, bytes(t.payload)) if t.payload is not None else None), reply


def test_lockstep_read_without_options():
    t = ReadTransfer(1024, Negotiated(), retries=3, now=0.0)
    assert t.total == 3  # 512 + 512 + an empty last block
    assert blocks(t, t.start(0.0)) == (1, 1)
    assert t.block_bounds(1) == (0, 512)
    assert blocks(t, t.on_packet(ack(1), 0.1)) == (2, 1)
    assert blocks(t, t.on_packet(ack(2), 0.2)) == (3, 1)
    assert t.block_bounds(3) == (1024, 0)
    assert t.on_packet(ack(3), 0.3) == 0
    assert t.state == DONE


def test_oack_then_ack_0_starts_block_1_and_timer_resends_oack():
    t = ReadTransfer(100, Negotiated(blksize=1468), retries=2, now=0.0, oack=pk.build_oack({"blksize": 1468}))
    assert t.start(0.0) == 1 and t.first == 0
    assert t.on_packet(ack(5), 0.1) == 0  # a stray ACK before ACK 0
    assert t.on_timer(0.5) == 0  # not due yet
    assert t.on_timer(1.0) == 1 and t.first == 0
    assert blocks(t, t.on_packet(ack(0), 1.1)) == (1, 1)
    assert t.on_packet(ack(1), 1.2) == 0 and t.state == DONE


def test_duplicate_ack_does_not_double_the_traffic():
    t = ReadTransfer(512 * 10, Negotiated(), retries=3, now=0.0)
    t.start(0.0)
    assert blocks(t, t.on_packet(ack(1), 0.1)) == (2, 1)
    assert t.on_packet(ack(1), 0.2) == 0  # Sorcerer's Apprentice: no second DATA 2
    assert t.on_packet(ack(7), 0.3) == 0  # a block never sent
    assert blocks(t, t.on_timer(1.1)) == (2, 1)  # only the timer resends
    assert t.retransmits == 1


def test_window_and_partial_ack_restarts_at_the_gap():
    t = ReadTransfer(512 * 40, Negotiated(windowsize=16), retries=3, now=0.0)
    assert blocks(t, t.start(0.0)) == (1, 16)
    assert blocks(t, t.on_packet(ack(10), 0.1)) == (11, 16)  # the client saw up to 10
    assert t.on_packet(ack(10), 0.2) == 0  # its duplicate
    assert blocks(t, t.on_packet(ack(26), 0.3)) == (27, 15)  # 41 blocks: 27..41
    assert t.on_packet(ack(41), 0.4) == 0 and t.state == DONE


def test_block_numbers_wrap_after_65535():
    t = ReadTransfer(8 * 70000, Negotiated(blksize=8, windowsize=4), retries=1, now=0.0)
    assert blocks(t, t.start(0.0)) == (1, 4)
    while t.acked < 65532:
        assert blocks(t, t.on_packet(ack(t.acked + 4), 0.0)) == (t.acked + 1, 4)
    assert t.acked == 65532 and t.sent == 65536
    # the client acknowledges block 65536, which is 0 on the wire
    assert blocks(t, t.on_packet(b"\0\x04\0\x00", 0.0)) == (65537, 4)
    assert blocks(t, t.on_packet(b"\0\x04\0\x02", 0.0)) == (65539, 4)  # partial: wire 2 = block 65538
    assert t.acked == 65538 and t.state == ACTIVE


def test_timeouts_then_failure():
    t = ReadTransfer(10, Negotiated(timeout=2.0), retries=2, now=0.0)
    t.start(0.0)
    assert blocks(t, t.on_timer(2.0)) == (1, 1)
    assert blocks(t, t.on_timer(4.0)) == (1, 1)
    assert t.on_timer(6.0) == 0
    assert t.state == FAILED and "after 2 retransmissions" in t.reason


def test_client_error_and_illegal_opcode():
    t = ReadTransfer(10, Negotiated(), retries=2, now=0.0)
    t.start(0.0)
    t.on_packet(pk.build_error(8, "options refused"), 0.1)
    assert t.state == FAILED and "client sent error 8" in t.reason and t.reply is None
    t = ReadTransfer(10, Negotiated(), retries=2, now=0.0)
    t.start(0.0)
    t.on_packet(b"\0\x03\0\x01xx", 0.1)
    assert t.state == FAILED and t.reply[:4] == b"\0\x05\0\x04"
    t = ReadTransfer(10, Negotiated(), retries=2, now=0.0)
    t.start(0.0)
    t.on_packet(b"\0", 0.1)
    assert t.state == FAILED and "too short" in t.reason


def data(n, payload):
    return pk.data_header(n) + payload


def test_write_in_order_dally_and_reack():
    t = WriteTransfer(Negotiated(blksize=8), retries=2, now=0.0, max_size=100)
    assert t.start(0.0) == ack(0)
    assert wrote(t, t.on_packet(data(1, b"A" * 8), 0.1)) == ((0, b"A" * 8), ack(1))
    assert wrote(t, t.on_packet(data(1, b"A" * 8), 0.2)) == (None, ack(1))  # a retransmission is acknowledged again
    write, reply = wrote(t, t.on_packet(data(2, b"BB"), 0.3))
    assert write == (8, b"BB") and reply == ack(2) and t.state == DALLY and t.size == 10
    assert wrote(t, t.on_packet(data(2, b"BB"), 0.4)) == (None, ack(2))  # the last ACK was lost
    assert t.on_timer(5.0) is None and t.state == DONE


def test_write_window_acks_every_windowsize_and_gap():
    t = WriteTransfer(Negotiated(blksize=8, windowsize=2), retries=2, now=0.0, max_size=100)
    t.start(0.0)
    assert wrote(t, t.on_packet(data(1, b"x" * 8), 0.1))[1] is None
    assert wrote(t, t.on_packet(data(2, b"x" * 8), 0.1))[1] == ack(2)
    assert wrote(t, t.on_packet(data(4, b"x" * 8), 0.1)) == (None, ack(2))  # gap: ack the last in order


def test_write_too_large_is_error_3_and_timeout_fails():
    t = WriteTransfer(Negotiated(blksize=8), retries=1, now=0.0, max_size=10)
    t.start(0.0)
    wrote(t, t.on_packet(data(1, b"x" * 8), 0.1))
    write, reply = wrote(t, t.on_packet(data(2, b"x" * 8), 0.2))
    assert write is None and reply[:4] == b"\0\x05\0\x03" and t.state == FAILED
    t = WriteTransfer(Negotiated(blksize=8), retries=1, now=0.0, max_size=10)
    t.start(0.0)
    assert t.on_timer(1.0) == ack(0)
    assert t.on_timer(2.0)[:4] == b"\0\x05\0\x00" and t.state == FAILED


from hypothesis import given, settings, strategies as st  # noqa: E402

_events = st.lists(
    st.one_of(
        st.tuples(st.just("ack"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("raw"), st.binary(max_size=12)),
        st.tuples(st.just("timer"), st.floats(0, 5)),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 5000), st.sampled_from([8, 512]), st.integers(1, 8), st.booleans(), _events)
def test_fuzz_read_transfer_invariants(size, blksize, windowsize, with_oack, events):
    t = ReadTransfer(size, Negotiated(blksize=blksize, windowsize=windowsize), retries=3, now=0.0,
                     oack=pk.build_oack({"blksize": blksize}) if with_oack else None)
    now = 0.0
    t.start(now)
    for kind, value in events:
        if kind == "ack":
            out = t.on_packet(pk.build_ack(value), now)
        elif kind == "raw":
            out = t.on_packet(value, now)
        else:
            now += value
            out = t.on_timer(now)
        count, first = out, t.first
        assert 0 <= t.acked <= t.sent <= t.total
        if count and first:
            assert first == t.acked + 1 and first + count - 1 <= t.total and count <= windowsize
            offset, length = t.block_bounds(first + count - 1)
            assert 0 <= length <= blksize and offset + length <= size
        if t.state in (DONE, FAILED):
            break
    if t.state == DONE:
        assert t.acked == t.total


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), _events)
def test_fuzz_write_transfer_never_writes_out_of_order(windowsize, events):
    t = WriteTransfer(Negotiated(blksize=8, windowsize=windowsize), retries=3, now=0.0, max_size=200)
    t.start(0.0)
    now, written = 0.0, 0
    for kind, value in events:
        if kind == "ack":  # reuse the numbers as DATA blocks with a full payload
            write, _ = wrote(t, t.on_packet(data(value, b"d" * 8), now))
        elif kind == "raw":
            write, _ = wrote(t, t.on_packet(value, now))
        else:
            now += value
            t.on_timer(now)
            write = None
        if write is not None:
            assert write[0] == written  # each write continues where the last ended
            written += len(write[1])
        if t.state in (DONE, FAILED):
            break
    assert written <= 200
