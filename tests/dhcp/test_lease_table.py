"""The LeaseTable the core sees: the in-memory table of the core's tests behaves as the SQLite store does."""

import pytest

from services.dhcp.lease_store import LeaseStore
from services.dhcp.lease_table import BOUND, DECLINED, EXPIRED, Lease, MemoryLeaseTable

MAC = "02:00:00:00:00:01"


@pytest.fixture(params=["memory", "sqlite"])
def pair(request, tmp_path):
    """Two tables over one backing (two processes sharing one lease file) and a commit function for each."""
    if request.param == "memory":
        committed = {}
        tables = [MemoryLeaseTable(committed), MemoryLeaseTable(committed)]
    else:
        tables = [LeaseStore(tmp_path / "l.sqlite"), LeaseStore(tmp_path / "l.sqlite")]
    yield tables
    if request.param == "sqlite":
        for t in tables:
            t.close()


def test_writes_are_seen_at_once_here_and_after_commit_there(pair):
    a, b = pair
    a.put(Lease(1, MAC, None, "lan", BOUND, 2000.0, "pc1"), 1000.0)
    assert a.get(1).mac == MAC and [l.ip for l in a.for_mac(MAC)] == [1]
    assert b.refresh(1) is None  # not committed yet
    a.commit()
    seen = b.refresh(1)
    assert (seen.mac, seen.state, seen.expires, seen.hostname) == (MAC, BOUND, 2000.0, "pc1")
    assert b.get(1) is seen


def test_own_uncommitted_write_wins_over_the_backing(pair):
    a, b = pair
    a.put(Lease(1, MAC, None, "lan", BOUND, 2000.0, None), 1000.0)
    a.commit()
    b.refresh(1)
    b.set_state(b.get(1), EXPIRED, 1500.0, 1500.0)
    assert b.refresh(1).state == EXPIRED


def test_due_delete_and_for_mac(pair):
    a, _ = pair
    a.put(Lease(1, MAC, None, "lan", BOUND, 2000.0, None), 1000.0)
    a.put(Lease(2, MAC, None, "lan", DECLINED, 1500.0, None), 1000.0)
    a.put(Lease(3, "02:00:00:00:00:02", None, "lan", BOUND, 9000.0, None), 1000.0)
    assert a.due(1400.0) == []
    assert sorted(l.ip for l in a.due(2000.0)) == [1, 2]
    a.delete(2)
    assert a.get(2) is None and sorted(l.ip for l in a.for_mac(MAC)) == [1]
    assert list(a.for_mac("02:00:00:00:00:09")) == []
