"""The I/O loop's scatter-gather send: every byte in order across partial sends and IOV_MAX batches."""

from services.iscsi_target import io_loop


class ShortSocket:
    """Accepts at most `limit` bytes per sendmsg, as a full socket buffer does."""

    def __init__(self, limit):
        self.limit = limit
        self.sent = bytearray()
        self.calls = []

    def sendmsg(self, bufs):
        assert len(bufs) <= io_loop.IOV_MAX
        self.calls.append(len(bufs))
        data = b"".join(bytes(b) for b in bufs)[: self.limit]
        self.sent += data
        return len(data)


def test_send_all_resumes_after_partial_sends():
    bufs = [bytes([i]) * (i + 1) for i in range(50)]
    sock = ShortSocket(limit=97)
    io_loop.send_all(sock, list(bufs))
    assert bytes(sock.sent) == b"".join(bufs) and len(sock.calls) > 1


def test_send_all_batches_by_iov_max():
    bufs = [b"x"] * (io_loop.IOV_MAX * 2 + 5)
    sock = ShortSocket(limit=1 << 30)
    io_loop.send_all(sock, bufs)
    assert sock.calls == [io_loop.IOV_MAX, io_loop.IOV_MAX, 5] and len(sock.sent) == len(bufs)


class FullSocket(ShortSocket):
    """Takes `limit` bytes in all, then would block."""

    def sendmsg(self, bufs):
        if self.limit <= 0:
            raise BlockingIOError
        n = super().sendmsg(bufs)
        self.limit -= n
        return n


def test_send_some_returns_what_a_full_socket_did_not_take():
    bufs = [bytes([i]) * (i + 1) for i in range(50)] + [b"y"] * (io_loop.IOV_MAX + 3)
    whole = b"".join(bufs)
    sock = FullSocket(limit=300)
    rest = io_loop.send_some(sock, list(bufs))
    assert bytes(sock.sent) + b"".join(bytes(b) for b in rest) == whole and len(sock.sent) == 300
    sock.limit = 1 << 30
    assert io_loop.send_some(sock, rest) == [] and bytes(sock.sent) == whole
