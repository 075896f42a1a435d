import logging
import select

from shared.log_limit import LogLimiter
from shared.wakeup import Wakeup


def test_log_limiter_allows_rate_then_counts_and_reports(caplog):
    lim = LogLimiter(logging.getLogger("t"), "bad packets", rate=3)
    assert [lim.allow(now=100.2) for _ in range(5)] == [True, True, True, False, False]
    with caplog.at_level(logging.WARNING):
        assert lim.allow(now=101.0)
    assert "2 more bad packets were not logged" in caplog.text


def test_wakeup_wakes_a_poller_and_drains():
    w = Wakeup()
    p = select.poll()
    p.register(w.fd, select.POLLIN)
    assert p.poll(0) == []
    w.wake()
    w.wake()
    assert p.poll(0)
    w.drain()
    assert p.poll(0) == []
    w.close()
