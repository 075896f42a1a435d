"""Events up to the controller without ever blocking the service.

`emit()` (any thread) puts the event on a bounded queue and returns; when the queue is full the event is
dropped and counted. A sender thread owns the PUSH socket: it sends queued events, and a heartbeat (`beat`,
with the counts of emitted and dropped events, the applied revision and the service's counters) every
interval. When the controller is away, ZeroMQ's own queue fills, then ours, then events are dropped; the
service itself never waits.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from shared.bus import message as m
from shared.bus.keys import client_secure

log = logging.getLogger("bootfleet.bus")


class EventSender:
    def __init__(
        self,
        endpoint: str,
        service: str,
        instance: int,
        *,
        capacity: int = 10000,
        interval: float = 1.0,
        beat_info: Callable[[], dict[str, Any]] = dict,
        curve_state_dir: Path | None = None,
        context: zmq.Context | None = None,
    ):
        self.endpoint = endpoint
        self.service = service
        self.instance = instance
        self.interval = interval
        self.beat_info = beat_info
        self.curve_state_dir = curve_state_dir
        self.ctx = context or zmq.Context.instance()
        self.queue: queue.Queue[bytes] = queue.Queue(maxsize=capacity)
        self.pid = os.getpid()
        self.started = time.time()
        self.emitted = 0
        self.dropped = 0
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bus-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush: float = 1.0) -> None:
        """Stop after trying for up to `flush` seconds to send what is queued."""
        deadline = time.monotonic() + flush
        while not self.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(timeout=flush + 1)

    def emit(self, type: str, fields: dict[str, Any]) -> None:
        frame = m.pack(
            m.EVENT, service=self.service, instance=self.instance, pid=self.pid, ts=time.time(), type=type, fields=fields
        )
        with self._count_lock:
            self.emitted += 1
        try:
            self.queue.put_nowait(frame)
        except queue.Full:
            with self._count_lock:
                self.dropped += 1

    def _beat(self) -> bytes:
        info = {"revision": -1, "counters": {}}
        try:
            info.update(self.beat_info())
        except Exception:
            log.exception("heartbeat info failed")
        with self._count_lock:
            emitted, dropped = self.emitted, self.dropped
        return m.pack(
            m.BEAT,
            service=self.service,
            instance=self.instance,
            pid=self.pid,
            started=self.started,
            emitted=emitted,
            dropped=dropped,
            **info,
        )

    def _run(self) -> None:
        push = self.ctx.socket(zmq.PUSH)
        push.linger = 0
        push.sndhwm = 1000
        if self.curve_state_dir:
            client_secure(push, self.curve_state_dir)
        push.connect(self.endpoint)
        pending: bytes | None = None
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.interval
                    try:
                        push.send(self._beat(), zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # the controller is away; the next beat will say the same
                if pending is None:
                    try:
                        pending = self.queue.get(timeout=max(0.0, min(0.2, next_beat - time.monotonic())))
                    except queue.Empty:
                        continue
                # a burst: send what is queued without going back to the blocking get each time
                for _ in range(1000):
                    try:
                        push.send(pending, zmq.NOBLOCK)
                    except zmq.Again:
                        self._stop.wait(0.05)
                        break
                    try:
                        pending = self.queue.get_nowait()
                    except queue.Empty:
                        pending = None
                        break
        finally:
            push.close()
