"""The Clone pattern's rules without sockets: snapshots, gaps, epochs, presence (shared/bus/replica.py)."""

from shared.bus import message as m
from shared.bus.replica import Apply, Replica, Resync


def kv(seq, key, val, epoch="e1"):
    return {"t": m.KV, "epoch": epoch, "seq": seq, "key": key, "val": val}


def hugz(seq, epoch="e1"):
    return {"t": m.HUGZ, "epoch": epoch, "seq": seq}


def snapshot(replica, now=0.0, seq=5, epoch="e1", store=None):
    replica.begin_snapshot(now)
    for key, val in (store or {"config": {"revision": 1}}).items():
        assert replica.snapshot_message(kv(3, key, val, epoch), now) is None
    return replica.snapshot_message({"t": m.KTHXBAI, "epoch": epoch, "seq": seq}, now)


def test_snapshot_gives_the_store_and_the_controller_is_present():
    r = Replica(timeout=1.0)
    assert r.present is False
    store = snapshot(r, store={"config": {"revision": 1}, "lease/10.0.0.5": {"mac": "m"}})
    assert store == {"config": {"revision": 1}, "lease/10.0.0.5": {"mac": "m"}}
    assert (r.epoch, r.seq, r.snapshots, r.present) == ("e1", 5, 1, True)
    assert r.take_presence() == [True] and r.take_presence() == []


def test_updates_at_or_below_the_snapshot_are_dropped_the_next_applied():
    r = Replica()
    snapshot(r, seq=5)
    assert r.update(kv(4, "old", 1), 0.1) is None
    assert r.update(kv(5, "old", 1), 0.1) is None
    assert r.update(kv(6, "config", {"revision": 2}), 0.1) == Apply("config", {"revision": 2})
    assert r.update(kv(7, "lease/10.0.0.5", None), 0.1) == Apply("lease/10.0.0.5", None)
    assert r.seq == 7
    assert r.update(hugz(7), 0.2) is None  # a heartbeat at our seq: nothing missed


def test_a_gap_asks_for_a_new_snapshot():
    r = Replica()
    snapshot(r, seq=5)
    action = r.update(kv(7, "config", {}), 0.1)
    assert isinstance(action, Resync) and action.lost and "lost" in action.reason
    assert r.seq == 5  # the update after the gap is not applied


def test_a_heartbeat_beyond_our_seq_asks_for_a_new_snapshot():
    r = Replica()
    snapshot(r, seq=5)
    action = r.update(hugz(6), 0.1)
    assert isinstance(action, Resync) and action.lost


def test_a_new_epoch_asks_for_a_new_snapshot():
    r = Replica()
    snapshot(r, seq=5)
    for msg in (hugz(0, epoch="e2"), kv(1, "config", {}, epoch="e2")):
        action = r.update(msg, 0.1)
        assert isinstance(action, Resync) and not action.lost and "e2" in action.reason
    snapshot(r, seq=1, epoch="e2")
    assert (r.epoch, r.seq, r.snapshots) == ("e2", 1, 2)
    assert r.update(kv(2, "config", {"revision": 9}, epoch="e2"), 0.2) == Apply("config", {"revision": 9})


def test_silence_past_the_timeout_means_away_then_a_snapshot_means_back():
    r = Replica(timeout=1.0)
    snapshot(r, now=10.0)
    r.take_presence()
    assert r.silent(10.9) is False
    r.update(hugz(5), 10.9)  # heard: the clock restarts
    assert r.silent(11.8) is False
    assert r.silent(12.0) is True and r.present is False
    assert r.take_presence() == [False]
    snapshot(r, now=20.0)
    assert r.present and r.take_presence() == [True]


def test_a_snapshot_that_does_not_come_means_away():
    r = Replica(timeout=1.0)
    snapshot(r, now=0.0)
    r.take_presence()
    r.begin_snapshot(5.0)
    assert r.snapshot_expired(5.5) is False and r.present
    assert r.snapshot_expired(6.0) is True and r.present is False
    assert r.take_presence() == [False]
    assert r.snapshot_expired(7.0) is True and r.take_presence() == []  # reported once


def test_a_snapshot_starts_from_an_empty_store():
    r = Replica()
    r.begin_snapshot(0.0)
    r.snapshot_message(kv(1, "stale", 1), 0.0)
    r.begin_snapshot(1.0)  # the first answer never ended; ask again
    assert snapshot(r, now=1.0, store={"config": {}}) == {"config": {}}
