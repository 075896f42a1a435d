"""The lease store: durable commits, read-only listing for the controller, offline release."""

import multiprocessing
import sqlite3

import pytest

from services.dhcp.lease_store import BOUND, Lease, LeaseStore, release_offline


def test_commit_is_durable_and_listed_read_only(tmp_path):
    path = tmp_path / "l.sqlite"
    store = LeaseStore(path)
    store.put(Lease(0x0A000064, "02:00:00:00:00:01", None, "lan", BOUND, 2000.0, "pc1"), 1000.0)
    reader = LeaseStore.open_readonly(path)
    assert reader.list(now=1500.0) == []  # not committed yet
    assert store.dirty and store.commit() == 1 and not store.dirty
    rows = reader.list(now=1500.0)
    assert rows == [{"ip": "10.0.0.100", "mac": "02:00:00:00:00:01", "scope": "lan", "state": "bound",
                     "expires": 2000.0, "hostname": "pc1", "client_id": None}]
    assert reader.list(now=2500.0) == []  # expired leases are not held
    assert len(reader.list(now=2500.0, include_free=True)) == 1
    with pytest.raises(PermissionError):
        reader.delete(0x0A000064)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_one_row_per_address(tmp_path):
    store = LeaseStore(tmp_path / "l.sqlite")
    store.put(Lease(1, "02:00:00:00:00:01", None, "lan", BOUND, 2000.0, None), 1000.0)
    store.commit()
    store.put(Lease(1, "02:00:00:00:00:02", None, "lan", BOUND, 2000.0, None), 1001.0)
    store.commit()
    assert [l.mac for l in LeaseStore(tmp_path / "l.sqlite").by_ip.values()] == ["02:00:00:00:00:02"]
    assert store.for_mac("02:00:00:00:00:01") == []


def test_release_offline(tmp_path):
    path = tmp_path / "l.sqlite"
    store = LeaseStore(path)
    store.put(Lease(0x0A000064, "02:00:00:00:00:01", None, "lan", BOUND, 2000.0, None), 1000.0)
    store.close()
    assert release_offline(path, "02:00:00:00:00:01", now=1500.0) == ["10.0.0.100"]
    assert LeaseStore.open_readonly(path).list(now=1500.0) == []


@pytest.mark.parametrize("durability,level", [("process", 1), ("power", 2)])  # NORMAL, FULL
def test_durability_setting(tmp_path, durability, level):
    store = LeaseStore(tmp_path / "l.sqlite", durability)
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == level
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    store.put(Lease(1, "02:00:00:00:00:01", None, "lan", BOUND, 2000.0, None), 1000.0)
    store.commit()
    store.checkpoint()
    assert [(l.ip, l.mac) for l in LeaseStore.open_readonly(tmp_path / "l.sqlite").by_ip.values()] == [(1, "02:00:00:00:00:01")]


def _open_together(path, barrier, results):
    barrier.wait()
    try:
        LeaseStore(path)
        results.put("ok")
    except Exception as exc:  # reported to the test, which shows it
        results.put(repr(exc))


def test_two_processes_create_one_store_together(tmp_path):
    # scale.dhcp: 2 on a first start: both switch the new store to WAL at once (SQLite said "database is
    # locked" to one of them about a time in four before the retry)
    ctx = multiprocessing.get_context("fork")
    for i in range(30):
        path = tmp_path / f"leases{i}.sqlite"
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_open_together, args=(path, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [results.get(timeout=5) for _ in procs] == ["ok", "ok"], f"round {i}"


def test_core_over_the_store_keeps_leases_after_kill_9(tmp_path):
    """The store as the core's lease table: what a turn committed is there after the process dies unflushed."""
    from services.dhcp import packet as pk
    from services.dhcp.core import DhcpCore, Interface
    from shared.config.loader import config_from_dict

    cfg = config_from_dict({"dhcp": {"scopes": [
        {"name": "r", "subnet": "10.9.0.0/24", "ranges": [{"start": "10.9.0.10", "end": "10.9.0.11"}]}]}})
    iface, relay, now = Interface("x", pk.ip_int("10.0.0.1")), pk.ip_int("10.9.0.1"), 1_800_000_000.0
    path = tmp_path / "l.sqlite"
    store = LeaseStore(path)
    core = DhcpCore(cfg, store)
    mac = bytes.fromhex("020000000001")

    def ask(core, mtype, mac, options=None):
        reply = core.handle(pk.parse(pk.build_request(mtype, mac, giaddr=relay, options=options)), iface, now)
        return pk.parse(reply.data) if reply else None

    offer = ask(core, pk.DISCOVER, mac)
    assert ask(core, pk.REQUEST, mac, {54: iface.packed, 50: offer.yiaddr.to_bytes(4, "big")}).msg_type == pk.ACK
    store.commit()
    store.db.close()  # as after kill -9: nothing flushed at exit
    again = DhcpCore(cfg, LeaseStore(path))
    assert ask(again, pk.DISCOVER, bytes.fromhex("020000000002")).yiaddr != offer.yiaddr
    assert ask(again, pk.DISCOVER, mac).yiaddr == offer.yiaddr
