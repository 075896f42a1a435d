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
