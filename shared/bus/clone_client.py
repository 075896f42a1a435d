"""A service's side of the Clone pattern: the sockets of a local replica of the controller's store, in a thread.

The rules (gaps, epochs, presence) are in `replica.py`; this module only moves messages between ZeroMQ and a
`Replica`: subscribe, ask for a snapshot, feed what arrives, and do what the replica answers.

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
from shared.bus.replica import Apply, Replica, Resync

log = logging.getLogger("bootfleet.bus")

POLL_MS = 200  # how often the loop looks at the stop flag and the clock while nothing arrives


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
        self.replica = Replica(timeout)
        self.state_dir = state_dir
        self.ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bus-clone", daemon=True)

    # the replica's state, read by the service (heartbeats) and tests
    @property
    def timeout(self) -> float:
        return self.replica.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self.replica.timeout = value

    epoch = property(lambda self: self.replica.epoch)
    seq = property(lambda self: self.replica.seq)
    present = property(lambda self: self.replica.present)
    snapshots = property(lambda self: self.replica.snapshots)

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
                if self._snapshot():
                    self._follow(sub)
        finally:
            sub.close()

    def _report_presence(self) -> None:
        for up in self.replica.take_presence():
            try:
                self.on_presence(up)
            except Exception:
                log.exception("presence callback failed")

    def _snapshot(self) -> bool:
        """Ask for the whole store; True once a complete snapshot was applied."""
        dealer = self._socket(zmq.DEALER, self.endpoints.snapshot)
        try:
            dealer.send(m.pack(m.ICANHAZ))
            self.replica.begin_snapshot(time.monotonic())
            while not self._stop.is_set():
                if not dealer.poll(POLL_MS):
                    if self.replica.snapshot_expired(time.monotonic()):
                        self._report_presence()
                        return False
                    continue
                try:
                    msg = m.unpack(dealer.recv())
                except m.BadMessage as exc:
                    log.warning("snapshot: %s", exc)
                    continue
                store = self.replica.snapshot_message(msg, time.monotonic())
                if store is not None:
                    self._report_presence()
                    try:
                        self.on_snapshot(store)
                    except Exception:
                        log.exception("snapshot callback failed")
                    return True
            return False
        finally:
            dealer.close()

    def _follow(self, sub: zmq.Socket) -> None:
        """Apply updates until the replica asks for a new snapshot, or the controller goes away."""
        while not self._stop.is_set():
            if not sub.poll(POLL_MS):
                if self.replica.silent(time.monotonic()):
                    log.warning("controller silent for %.1f s: serving on the cached configuration", self.replica.timeout)
                    self._report_presence()
                    return
                continue
            try:
                msg = m.unpack(sub.recv())
            except m.BadMessage as exc:
                log.warning("update: %s", exc)
                continue
            action = self.replica.update(msg, time.monotonic())
            if isinstance(action, Resync):
                log.log(logging.WARNING if action.lost else logging.INFO, "%s", action.reason)
                return
            if isinstance(action, Apply):
                try:
                    self.on_update(action.key, action.val)
                except Exception:
                    log.exception("update callback failed for %s", action.key)
