"""The controller's side of the Clone pattern: a replicated key-value store, published with sequence numbers.

Theory of operation. The controller owns a dict of keys; every change gets the next sequence number and is
published on a PUB socket. A service that joins late (or lost an update) asks the ROUTER snapshot socket for
the whole store and gets every key, then `kthxbai {epoch, seq}`; it then applies published updates with a
larger seq only. A heartbeat (`hugz {epoch, seq}`) every interval lets services see the controller is alive,
notice a missed update (seq beyond theirs) and a restarted controller (a new epoch).
Single-threaded: the controller's poll loop calls `handle_snapshot()` when the snapshot socket is readable.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import zmq

from shared.bus import message as m

log = logging.getLogger("bootfleet.bus")


class CloneServer:
    def __init__(self, publisher: zmq.Socket, snapshot: zmq.Socket, seq: int = 0):
        self.publisher = publisher
        self.snapshot = snapshot
        self.epoch = uuid.uuid4().hex[:12]
        self.seq = seq
        self.store: dict[str, tuple[int, Any]] = {}

    def set(self, key: str, val: Any) -> int:
        """Change one key (None deletes it) and publish the change; returns its sequence number."""
        seq = self._record(key, val)
        self.publisher.send(m.pack(m.KV, epoch=self.epoch, seq=seq, key=key, val=val))
        return seq

    def set_unpublished(self, key: str, val: Any) -> int:
        """Change a key without publishing: what a subscriber sees when an update is lost on the way
        (PUB drops when a subscriber's queue is full). Tests use it to prove gap recovery."""
        return self._record(key, val)

    def _record(self, key: str, val: Any) -> int:
        self.seq += 1
        if val is None:
            self.store.pop(key, None)
        else:
            self.store[key] = (self.seq, val)
        return self.seq

    def get(self, key: str) -> Any:
        item = self.store.get(key)
        return item[1] if item else None

    def heartbeat(self) -> None:
        self.publisher.send(m.pack(m.HUGZ, epoch=self.epoch, seq=self.seq))

    def handle_snapshot(self) -> None:
        """Answer every pending snapshot request with the whole store."""
        while True:
            try:
                frames = self.snapshot.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning("snapshot socket: request with %d frames ignored", len(frames))
                continue
            identity, body = frames
            try:
                req = m.unpack(body)
            except m.BadMessage as exc:
                log.warning("snapshot socket: %s", exc)
                continue
            if req["t"] != m.ICANHAZ:
                log.warning("snapshot socket: unexpected %s", req["t"])
                continue
            out = [
                m.pack(m.KV, epoch=self.epoch, seq=seq, key=key, val=val) for key, (seq, val) in self.store.items()
            ]
            out.append(m.pack(m.KTHXBAI, epoch=self.epoch, seq=self.seq))
            for part in out:
                self.snapshot.send_multipart([identity, part])
