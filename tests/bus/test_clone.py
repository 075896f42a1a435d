"""The Clone pattern over real ZeroMQ sockets: late joiners, lost updates, a restarted server."""

import threading
import time

import pytest
import zmq

from shared.bus import message as m
from shared.bus.clone_client import CloneClient
from shared.bus.clone_server import CloneServer
from shared.bus.endpoints import endpoints
from support import wait_for


class Replica:
    """What a service sees: the store, and every key change in the order it was applied."""

    def __init__(self):
        self.store = {}
        self.applied = []
        self.snapshots = 0
        self.lock = threading.Lock()

    def on_snapshot(self, store):
        with self.lock:
            self.store = dict(store)
            self.snapshots += 1

    def on_update(self, key, val):
        with self.lock:
            if val is None:
                self.store.pop(key, None)
            else:
                self.store[key] = val
            self.applied.append((key, val))


class Server:
    def __init__(self, tmp_path):
        self.ctx = zmq.Context.instance()
        self.ep = endpoints(tmp_path, bind=True)
        self.pub = self.ctx.socket(zmq.PUB)
        self.snap = self.ctx.socket(zmq.ROUTER)
        self.pub.bind(self.ep.publish)
        self.snap.bind(self.ep.snapshot)
        self.clone = CloneServer(self.pub, self.snap)
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.lock = threading.Lock()
        self.thread.start()

    def _loop(self):
        last = 0.0
        while self.running:
            if self.snap.poll(20):
                with self.lock:
                    self.clone.handle_snapshot()
            if time.monotonic() - last > 0.1:
                with self.lock:
                    self.clone.heartbeat()
                last = time.monotonic()

    def set(self, key, val, publish=True):
        with self.lock:
            return self.clone.set(key, val) if publish else self.clone.set_unpublished(key, val)

    def close(self):
        self.running = False
        self.thread.join()
        self.pub.close()
        self.snap.close()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.close()


def client_for(server, replica, timeout=1.0):
    c = CloneClient(server.ep, replica.on_snapshot, replica.on_update, timeout=timeout)
    c.start()
    return c


def test_late_joiner_gets_snapshot_then_updates(server):
    for i in range(50):
        server.set(f"k{i}", {"n": i})
    server.set("k3", None)
    replica = Replica()
    client = client_for(server, replica)
    try:
        wait_for(lambda: replica.snapshots == 1, what="snapshot")
        assert len(replica.store) == 49 and "k3" not in replica.store
        assert replica.store["k49"] == {"n": 49}
        for i in range(50, 60):
            server.set(f"k{i}", {"n": i})
        wait_for(lambda: "k59" in replica.store, what="updates after the snapshot")
        # every update after the snapshot applied exactly once, in order
        assert [k for k, _ in replica.applied] == [f"k{i}" for i in range(50, 60)]
        assert client.seq == server.clone.seq
    finally:
        client.stop()


def test_lost_update_is_recovered_by_a_new_snapshot(server):
    replica = Replica()
    server.set("config", {"revision": 1})
    client = client_for(server, replica)
    try:
        wait_for(lambda: replica.snapshots == 1, what="first snapshot")
        server.set("config", {"revision": 2}, publish=False)  # lost on the way
        server.set("other", {"x": 1})  # seq jumps by two: the client sees the gap
        wait_for(lambda: replica.snapshots == 2, what="resynchronisation")
        assert replica.store == {"config": {"revision": 2}, "other": {"x": 1}}
        # a loss followed by silence is caught by the heartbeat's seq
        server.set("config", {"revision": 3}, publish=False)
        wait_for(lambda: replica.snapshots == 3, what="resync from heartbeat")
        assert replica.store["config"] == {"revision": 3}
        assert client.seq == server.clone.seq
    finally:
        client.stop()


def test_new_server_epoch_triggers_resync(tmp_path):
    first = Server(tmp_path)
    first.set("config", {"revision": 1})
    replica = Replica()
    client = client_for(first, replica, timeout=0.5)
    try:
        wait_for(lambda: replica.snapshots == 1, what="snapshot")
        first.close()
        wait_for(lambda: client.present is False, what="the client to notice the server is away")
        assert replica.store == {"config": {"revision": 1}}  # kept while the server is away
        assert replica.snapshots == 1
        second = Server(tmp_path)
        try:
            second.set("config", {"revision": 2})
            wait_for(lambda: replica.store.get("config") == {"revision": 2}, what="resync with the new server")
            assert client.present and client.epoch == second.clone.epoch
        finally:
            second.close()
    finally:
        client.stop()


def test_messages_are_validated():
    with pytest.raises(m.BadMessage, match="not msgpack"):
        m.unpack(b"\xc1")
    with pytest.raises(m.BadMessage, match="unknown type"):
        m.unpack(m.pack("nope"))
    with pytest.raises(m.BadMessage, match="seq"):
        m.unpack(m.pack(m.KV, epoch="e", key="k"))
    assert m.unpack(m.pack(m.HUGZ, epoch="e", seq=3))["seq"] == 3
