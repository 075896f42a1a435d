"""The controller process: owns the configuration, publishes it, collects events, answers the CLI.

One thread runs a ZeroMQ poll loop over three bound sockets (snapshot, events, control) and publishes on a
fourth; supervisord calls (which can take seconds) run in a worker thread so heartbeats never stall.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import msgpack
import yaml
import zmq

from shared import events as ev
from shared.bus import message as m
from shared.bus.clone_server import CloneServer
from shared.bus.endpoints import endpoints
from shared.bus.keys import server_secure
from shared.config.loader import ConfigError
from shared.config.model import SERVICES, BootfleetConfig
from services.controller.config_store import ConfigStore, digest
from services.controller.event_store import EventStore
from services.controller.fleet import ClientTable, ServiceTable
from services.controller.supervisor_rpc import Supervisor, SupervisorError

log = logging.getLogger("bootfleet.controller")

LEASE_EVENTS = {ev.LEASE_GRANTED, ev.LEASE_RENEWED}
LEASE_GONE = {ev.LEASE_RELEASED, ev.LEASE_EXPIRED, ev.LEASE_DECLINED}
MAX_BATCH = 5000  # events taken from the socket per loop turn (one SQLite transaction)


COMMAND_TTL = 60.0  # seconds a command key stays in the store (a service restarting meanwhile still sees it)


class Waiter:
    """A CLI request answered when a matching event arrives, or with an error at its deadline."""

    def __init__(self, envelope: list[bytes], match: Callable[[dict], bool], deadline: float,
                 on_event: Callable[[dict], dict], on_timeout: Callable[[], dict]):
        self.envelope, self.match, self.deadline = envelope, match, deadline
        self.on_event, self.on_timeout = on_event, on_timeout


class Controller:
    def __init__(self, state_dir: Path, seed_file: Path | None):
        self.state_dir = Path(state_dir).resolve()
        self.seed_file = seed_file
        self.started = time.time()
        self.pid = os.getpid()
        self.store = ConfigStore(self.state_dir)
        self.services = ServiceTable()
        self.clients = ClientTable()
        self.supervisor = Supervisor(self.state_dir)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervisor")
        self.pending: list[tuple[list[bytes], Future, Callable[[Any], dict]]] = []
        self.waiters: list[Waiter] = []
        self.commands: deque[tuple[float, str]] = deque()  # (expiry, key) of command keys, oldest first
        self.events_received = 0
        self.bad_messages = 0
        self.running = True
        self._load_config()
        cfg = self.config
        self.events = EventStore(self.state_dir / "controller" / "events.db", cfg.events.retention_days, cfg.events.max_rows)
        self._bind()
        self.clone.set("config", self.store.document())
        self._replay_events()

    @property
    def config(self) -> BootfleetConfig:
        assert self.store.config is not None
        return self.store.config

    # -- start-up -----------------------------------------------------------------------------------
    def _load_config(self) -> None:
        have_running = self.store.load()
        if self.seed_file is None:
            if not have_running:
                self.store.commit({})
            return
        try:
            seed = yaml.safe_load(self.seed_file.read_text())
            seed_digest = digest(seed)
            if not have_running or self.store.seed_digest != seed_digest:
                revision = self.store.commit(seed, seed_digest=seed_digest)
                log.info("configuration from %s committed as revision %d", self.seed_file, revision)
        except (OSError, yaml.YAMLError, ConfigError) as exc:
            if not have_running:
                raise SystemExit(f"{self.seed_file}: {exc}") from None
            log.error("%s rejected, keeping revision %d: %s", self.seed_file, self.store.revision, exc)

    def _bind(self) -> None:
        cfg = self.config
        self.ctx = zmq.Context.instance()
        ep = endpoints(self.state_dir, cfg.bus, bind=True)
        self.endpoints = ep
        pub = self.ctx.socket(zmq.PUB)
        snap = self.ctx.socket(zmq.ROUTER)
        pull = self.ctx.socket(zmq.PULL)
        control = self.ctx.socket(zmq.ROUTER)
        pull.rcvhwm = 100_000
        socks = [pub, snap, pull, control]
        self.auth = server_secure(self.ctx, socks[:3], self.state_dir) if ep.curve else None
        for sock, url in zip(socks, (ep.publish, ep.snapshot, ep.events, ep.control)):
            sock.linger = 0
            if url.startswith("ipc://"):
                Path(url[6:]).unlink(missing_ok=True)  # a socket file left by a killed controller
            sock.bind(url)
        self.clone = CloneServer(pub, snap)
        self.pull, self.control = pull, control

    def _replay_events(self) -> None:
        """Rebuild the client table from the last day of stored events."""
        for e in self.events.query(since=time.time() - 86400, limit=200_000):
            self.clients.observe(e["type"], e["fields"], e["ts"])
        for client in self.config.clients:
            self.clients.ensure(client.mac)
        for ip, mac in self.clients.mac_by_ip.items():
            self.clone.set(f"lease/{ip}", {"mac": mac})

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.clone.snapshot, self.pull, self.control):
            poller.register(sock, zmq.POLLIN)
        next_beat = next_prune = 0.0
        self.submit(None, self._reconcile, lambda r: {})
        while self.running:
            ready = dict(poller.poll(100))
            if self.clone.snapshot in ready:
                self.clone.handle_snapshot()
            if self.pull in ready:
                self._take_events()
            if self.control in ready:
                self._take_requests()
            self._finish_pending()
            now = time.monotonic()
            if now >= next_beat:
                self.clone.heartbeat()
                next_beat = now + self.config.bus.heartbeat_interval
            if now >= next_prune:
                self.events.prune()
                next_prune = now + 60
            self._expire(time.time())
        self.close()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.auth:
            self.auth.stop()
        for sock in (self.clone.publisher, self.clone.snapshot, self.pull, self.control):
            sock.close()
        for url in (self.endpoints.publish, self.endpoints.snapshot, self.endpoints.events, self.endpoints.control):
            if url.startswith("ipc://"):
                Path(url[6:]).unlink(missing_ok=True)  # the CLI then says "not running" at once
        self.events.close()

    def _take_events(self) -> None:
        batch = []
        now = time.time()
        for _ in range(MAX_BATCH):
            try:
                frame = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = m.unpack(frame)
            except m.BadMessage as exc:
                self.bad_messages += 1
                log.warning("event socket: %s", exc)
                continue
            if msg["t"] == m.BEAT:
                self.services.beat(msg, now)
            elif msg["t"] == m.EVENT:
                self.events_received += 1
                self.services.event(msg)
                self._observe(msg)
                batch.append(msg)
            else:
                log.warning("event socket: unexpected %s", msg["t"])
        self.events.add_many(batch)

    def _observe(self, msg: dict[str, Any]) -> None:
        if self.waiters:
            for waiter in [w for w in self.waiters if w.match(msg)]:
                self.waiters.remove(waiter)
                self.reply(waiter.envelope, waiter.on_event(msg))
        fields, type = msg["fields"], msg["type"]
        self.clients.observe(type, fields, msg["ts"])
        ip, mac = fields.get("ip"), fields.get("mac")
        # TFTP learns which PC is at which address from these keys (scripts rendered per MAC)
        if type in LEASE_EVENTS and ip and mac:
            key = f"lease/{ip}"
            if (self.clone.get(key) or {}).get("mac") != mac:
                self.clone.set(key, {"mac": mac, "expires": fields.get("expires")})
        elif type in LEASE_GONE and ip:
            if self.clone.get(f"lease/{ip}") is not None:
                self.clone.set(f"lease/{ip}", None)

    def _expire(self, now: float) -> None:
        for waiter in [w for w in self.waiters if w.deadline <= now]:
            self.waiters.remove(waiter)
            self.reply(waiter.envelope, waiter.on_timeout())
        while self.commands and self.commands[0][0] <= now:
            self.clone.set(self.commands.popleft()[1], None)

    def send_command(self, service: str, name: str, args: dict[str, Any]) -> str:
        """Ask every process of `service` to perform `name` once (a key in the replicated store)."""
        key = f"command/{service}/{uuid.uuid4().hex[:12]}"
        now = time.time()
        self.clone.set(key, {"name": name, "args": args, "ts": now})
        self.commands.append((now + COMMAND_TTL, key))
        return key

    # -- control requests ---------------------------------------------------------------------------
    def _take_requests(self) -> None:
        from services.controller.commands import dispatch

        while True:
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope, body = frames[:-1], frames[-1]
            try:
                req = msgpack.unpackb(body, raw=False)
                if not isinstance(req, dict) or not isinstance(req.get("command"), str):
                    raise ValueError("expected {command, arguments}")
            except Exception as exc:
                self.reply(envelope, {"result": 1, "text": f"bad request: {exc}"})
                continue
            try:
                answer = dispatch(self, envelope, req["command"], req.get("arguments") or {})
            except Exception as exc:  # a bug in one command must not take the controller down
                log.exception("command %s failed", req["command"])
                answer = {"result": 1, "text": f"{req['command']}: internal error: {exc}"}
            if answer is not None:
                self.reply(envelope, answer)

    def reply(self, envelope: list[bytes], answer: dict[str, Any]) -> None:
        answer.setdefault("arguments", {})
        self.control.send_multipart([*envelope, msgpack.packb(answer, use_bin_type=True, default=str)])

    def submit(self, envelope: list[bytes] | None, fn: Callable[[], Any], finish: Callable[[Any], dict]) -> None:
        """Run a slow call (supervisord) off the loop; `finish` turns its result into the answer."""
        self.pending.append((envelope or [], self.executor.submit(fn), finish))

    def _finish_pending(self) -> None:
        for item in [p for p in self.pending if p[1].done()]:
            self.pending.remove(item)
            envelope, future, finish = item
            try:
                answer = finish(future.result())
            except SupervisorError as exc:
                answer = {"result": 1, "text": str(exc)}
            except Exception as exc:
                log.exception("background call failed")
                answer = {"result": 1, "text": f"internal error: {exc}"}
            if envelope:
                self.reply(envelope, answer)
            elif answer.get("result"):
                log.error("%s", answer.get("text"))

    # -- configuration ------------------------------------------------------------------------------
    def commit(self, data: Any) -> int:
        """Validate, persist and publish a new revision; raises ConfigError and changes nothing if invalid."""
        before = self.config.scale.model_dump()
        _, normalised = self.store.stage(data)
        if normalised == self.store.data:
            return self.store.revision  # unchanged: no new revision (`make up` twice is harmless)
        revision = self.store.commit(data)
        self.clone.set("config", self.store.document())
        for client in self.config.clients:
            self.clients.ensure(client.mac)
        self.events.retention_days = self.config.events.retention_days
        self.events.max_rows = self.config.events.max_rows
        if self.config.scale.model_dump() != before:
            self.submit(None, self._reconcile, lambda r: {})
        log.info("revision %d published", revision)
        return revision

    def _reconcile(self) -> dict[str, Any]:
        """Start or stop service processes so each runs as many as `scale` says."""
        if not self.supervisor.available():
            return {}
        done = {}
        for service in SERVICES:
            want = getattr(self.config.scale, service)
            try:
                done[service] = self.supervisor.scale(service, want)
            except SupervisorError as exc:
                log.warning("%s", exc)
            self.services.forget(service, want)
        return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.controller")
    parser.add_argument("--config", type=Path, help="configuration to run (committed when it differs from the one it last seeded)")
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("BOOTFLEET_STATE_DIR", "var")))
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s controller %(name)s: %(message)s")
    controller = Controller(args.state_dir, args.config)
    logging.getLogger().setLevel(controller.config.logging.level.upper())

    def stop(*_: Any) -> None:
        controller.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("controller up: revision %d, epoch %s, bus %s", controller.store.revision, controller.clone.epoch, controller.endpoints.publish)
    controller.run()
