"""A service's side of the Clone pattern: a local replica of the controller's store, kept in a thread.

Theory of operation. Subscribe first, then ask for a snapshot, so no update falls between the two; updates
with a seq at or below the snapshot's are dropped (already in it), the next one is applied, and one that
skips a number means an update was lost: take a new snapshot. A heartbeat with a new epoch (the controller
restarted) or a seq we have not seen also calls for a snapshot. No heartbeat for `timeout` seconds: the
controller is away; the replica stays as it is (the service keeps serving) and we keep asking for a
snapshot until one arrives.

Callbacks run in the client's thread: `on_snapshot(store)` with the whole store (key -> value) after each
snapshot, `on_update(key, value)` for each update (value None: deleted), `on_presence(bool)` when the
controller goes away or comes back.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from shared.bus import message as m
from shared.bus.endpoints import Endpoints
from shared.bus.keys import client_secure

log = logging.getLogger("bootfleet.bus")


class CloneClient:
    def __init__(
        self,
        endpoints: Endpoints,
        on_snapshot: Callable[[dict[str, Any]], None],
        on_update: Callable[[str, Any], None],
        on_presence: Callable[[bool], None] = lambda up: None,
        *,
        timeout: float = 5.0,
        state_dir: Path | None = None,
        context: zmq.Context | None = None,
    ):
        self.endpoints = endpoints
        self.on_snapshot = on_snapshot
        self.on_update = on_update
        self.on_presence = on_presence
        self.timeout = timeout
        self.state_dir = state_dir
        self.ctx = context or zmq.Context.instance()
        self.epoch: str | None = None
        self.seq = -1
        self.present = False
        self.snapshots = 0  # how many snapshots this client took (status, tests)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bus-clone", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        if self.endpoints.curve and self.state_dir:
            client_secure(sock, self.state_dir)
        sock.connect(endpoint)
        return sock

    def _run(self) -> None:
        sub = self._socket(zmq.SUB, self.endpoints.publish)
        sub.subscribe(b"")
        try:
            while not self._stop.is_set():
                if not self._snapshot(sub):
                    continue
                self._follow(sub)
        finally:
            sub.close()

    def _set_presence(self, up: bool) -> None:
        if up != self.present:
            self.present = up
            try:
                self.on_presence(up)
            except Exception:
                log.exception("presence callback failed")

    def _snapshot(self, sub: zmq.Socket) -> bool:
        """Ask for the whole store; True once a complete snapshot was applied."""
        dealer = self._socket(zmq.DEALER, self.endpoints.snapshot)
        try:
            dealer.send(m.pack(m.ICANHAZ))
            store: dict[str, Any] = {}
            deadline = time.monotonic() + self.timeout
            while not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or not dealer.poll(min(left, 0.2) * 1000):
                    if left <= 0:
                        self._set_presence(False)
                        return False
                    continue
                try:
                    msg = m.unpack(dealer.recv())
                except m.BadMessage as exc:
                    log.warning("snapshot: %s", exc)
                    continue
                if msg["t"] == m.KV:
                    store[msg["key"]] = msg.get("val")
                elif msg["t"] == m.KTHXBAI:
                    self.epoch, self.seq = msg["epoch"], msg["seq"]
                    self.snapshots += 1
                    self._set_presence(True)
                    try:
                        self.on_snapshot(store)
                    except Exception:
                        log.exception("snapshot callback failed")
                    return True
            return False
        finally:
            dealer.close()

    def _follow(self, sub: zmq.Socket) -> None:
        """Apply updates until a gap, a new epoch, or the controller goes away."""
        last_heard = time.monotonic()
        while not self._stop.is_set():
            if not sub.poll(200):
                if time.monotonic() - last_heard > self.timeout:
                    log.warning("controller silent for %.1f s: serving on the cached configuration", self.timeout)
                    self._set_presence(False)
                    return
                continue
            try:
                msg = m.unpack(sub.recv())
            except m.BadMessage as exc:
                log.warning("update: %s", exc)
                continue
            last_heard = time.monotonic()
            if msg["epoch"] != self.epoch:
                log.info("controller restarted (epoch %s): resynchronising", msg["epoch"])
                return
            if msg["t"] == m.HUGZ:
                if msg["seq"] > self.seq:
                    log.warning("missed updates %d..%d: resynchronising", self.seq + 1, msg["seq"])
                    return
                continue
            seq = msg["seq"]
            if seq <= self.seq:
                continue  # already in our snapshot
            if seq != self.seq + 1:
                log.warning("update %d arrived after %d: one was lost, resynchronising", seq, self.seq)
                return
            self.seq = seq
            try:
                self.on_update(msg["key"], msg.get("val"))
            except Exception:
                log.exception("update callback failed for %s", msg["key"])
