"""The controller's I/O loop: owns the configuration, publishes it, collects events, answers the CLI.

One thread runs a ZeroMQ poll loop over three bound sockets (snapshot, events, control) and publishes on a
fourth; supervisord calls (which can take seconds) run in a worker thread so heartbeats never stall.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import msgpack
import yaml
import zmq

from shared.bus import message as m
from shared.bus.clone_server import CloneServer
from shared.bus.endpoints import endpoints
from shared.bus.keys import server_secure
from shared.config.loader import ConfigError
from shared.config.model import SERVICES, BootfleetConfig
from shared.paths import state_path
from services.controller import media_commands
from services.controller.commands import dispatch, events_answer
from services.controller.config_store import ConfigStore, digest
from services.controller.event_store import EventStore
from services.controller.event_watch import EventWatches, Watch
from services.controller.events import WebApplied, WebApplyFailed
from services.controller.facade import Facade, LoopStats
from services.controller.fleet import Fleet
from services.controller.leases import Leases
from services.controller.pcboot import PcBoots
from shared.images.store import ImageStore
from services.controller.supervisor_rpc import Supervisor, SupervisorError
from services.controller.waiters import CommandKeys, Waiter, Waiters

log = logging.getLogger("bootfleet.controller")

MAX_BATCH = 5000  # events taken from the socket per loop turn (one SQLite transaction)


class Controller:
    def __init__(self, state_dir: Path, seed_file: Path | None):
        self.state_dir = Path(state_dir).resolve()
        self.seed_file = seed_file
        self.store = ConfigStore(self.state_dir)
        self.fleet = Fleet()
        self.supervisor = Supervisor(self.state_dir)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervisor")
        # image imports, exports, publishes: two at a time (the store locks per image), never behind supervisord
        self.image_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="images")
        self.posted: queue.SimpleQueue = queue.SimpleQueue()  # events from worker threads, filed by the loop
        self.pending: list[tuple[list[bytes], Future, Callable[[Any], dict]]] = []
        self.waiters = Waiters()
        self.web = None  # the web server's host (web/host.py), set by main(): a Controller built by a test has none
        self.watches = EventWatches()
        self.running = True
        self._load_config()
        cfg = self.config
        self.events = EventStore(self.state_dir / "controller" / "events.db", cfg.events.retention_days, cfg.events.max_rows)
        self._bind()
        self.stats = LoopStats(pid=os.getpid(), started=time.time(), epoch=self.clone.epoch)
        self.command_keys = CommandKeys(self.clone)
        self.leases = Leases(self.clone, lambda: state_path(self.state_dir, self.config.dhcp.lease_file))
        self.images = ImageStore.for_state_dir(self.state_dir, self.config.image_store.reserve)
        self.pcboot = PcBoots(self.clone, self.images, self.state_dir / "controller" / "pcboot.json",
                              self.fleet.clients.mac_of)
        self.facade = Facade(
            config=self.store, fleet=self.fleet, events=self.events, leases=self.leases, supervisor=self.supervisor,
            stats=self.stats, commit=self.commit, submit=self.submit, ask=self.ask,
            watch=self.watches.add, emit=self.emit,
            images=self.images, pcboot=self.pcboot, run_images=self.run_images, post=self.posted.put,
        )
        self.clone.set(m.CONFIG_KEY, self.store.document())
        self.pcboot.load()  # the keys running PCs booted with, as they were
        self.pcboot.reconfigure(self.config, update_keys=False)
        self._replay_events()
        self.pcboot.reconfigure(self.config)
        self.pcboot.flush()

    @property
    def config(self) -> BootfleetConfig:
        assert self.store.config is not None
        return self.store.config

    # -- start-up -----------------------------------------------------------------------------------
    def _load_config(self) -> None:
        have_running = self.store.load()
        if self.seed_file is None:
            if not have_running:
                self.store.commit(self.store.stage({}))
            return
        try:
            seed = yaml.safe_load(self.seed_file.read_text())
            seed_digest = digest(seed)
            if not have_running or self.store.seed_digest != seed_digest:
                revision = self.store.commit(self.store.stage(seed), seed_digest=seed_digest)
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
        clients = self.fleet.clients
        for e in self.events.query(since=time.time() - 86400, limit=200_000):
            clients.observe(e["type"], e["fields"], e["ts"])
            self.pcboot.replay(e)  # who is logged in (no power-on is decided from the past)
        for client in self.config.clients:
            clients.ensure(client.mac)
        self.leases.seed(clients.mac_by_ip)

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
            self._file_posted()  # first: a finished operation's last progress is filed before its end
            self._finish_pending()
            self.pcboot.flush()
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
        self.image_executor.shutdown(wait=False, cancel_futures=True)
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
                self.stats.bad_messages += 1
                log.warning("event socket: %s", exc)
                continue
            if msg["t"] == m.BEAT:
                self.fleet.services.beat(msg, now)
            elif msg["t"] == m.EVENT:
                self.stats.events_received += 1
                self.fleet.services.event(msg)
                self._observe(msg)
                batch.append(msg)
            else:
                log.warning("event socket: unexpected %s", msg["t"])
        self._store(batch)

    def _store(self, batch: list[dict[str, Any]]) -> None:
        self.events.add_many(batch)
        if batch and len(self.watches):
            # pushed, not polled: held events-wait requests look at the store once per stored batch
            for envelope, answer in self.watches.filed({e["type"] for e in batch}, self.events.query, events_answer):
                self.reply(envelope, answer)

    def emit(self, event) -> None:
        """File an event of the controller's own (a long operation it runs: operation.progress), as if sent."""
        msg = {"service": "controller", "instance": 0, "pid": self.stats.pid, "ts": time.time(),
               "type": event.type, "fields": event.fields()}
        self._observe(msg)
        self._store([msg])

    def _file_posted(self) -> None:
        """Events worker threads posted (an image operation's progress), filed from the loop."""
        while True:
            try:
                event = self.posted.get_nowait()
            except queue.Empty:
                return
            self.emit(event)

    def _observe(self, msg: dict[str, Any]) -> None:
        for envelope, answer in self.waiters.matched(msg):
            self.reply(envelope, answer)
        self.pcboot.observe(msg["type"], msg["fields"], msg["ts"], msg.get("instance", 0), msg.get("service", ""))
        self.fleet.clients.observe(msg["type"], msg["fields"], msg["ts"])
        self.leases.observe(msg["type"], msg["fields"])
        media_commands.observe(self.facade, msg)  # a PC's one-shot install boot seen: its `install` goes

    def _expire(self, now: float) -> None:
        for envelope, answer in self.waiters.expired(now):
            self.reply(envelope, answer)
        for envelope, answer in self.watches.expired(now, events_answer):
            self.reply(envelope, answer)
        self.command_keys.expire(now)

    def ask(self, service: str, name: str, args: dict[str, Any], waiter: Waiter) -> None:
        """Ask every process of `service` to perform `name` once; `waiter` answers the request."""
        self.command_keys.send(service, name, args, time.time())
        self.waiters.add(waiter)

    # -- control requests ---------------------------------------------------------------------------
    def _take_requests(self) -> None:
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
                answer = dispatch(self.facade, envelope, req["command"], req.get("arguments") or {})
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

    def run_images(self, envelope: list[bytes] | None, fn: Callable[[], Any], finish: Callable[[Any], dict]) -> None:
        """As `submit`, on the image lane (image_commands.py)."""
        self.pending.append((envelope or [], self.image_executor.submit(fn), finish))

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
        web_before = self.config.web
        candidate = self.store.stage(data)
        if self.store.unchanged(candidate):
            return self.store.revision  # unchanged: no new revision (`make up` twice is harmless)
        revision = self.store.commit(candidate)
        self.clone.set(m.CONFIG_KEY, self.store.document())
        for client in self.config.clients:
            self.fleet.clients.ensure(client.mac)
        self.images.reserve = self.images.space_guard.reserve = self.config.image_store.reserve
        self.pcboot.reconfigure(self.config)
        self.events.retention_days = self.config.events.retention_days
        self.events.max_rows = self.config.events.max_rows
        if self.config.scale.model_dump() != before:
            self.submit(None, self._reconcile, lambda r: {})
        if self.web is not None and self.config.web != web_before:
            self._restart_web(revision)
        log.info("revision %d published", revision)
        return revision

    def _restart_web(self, revision: int) -> None:
        """The web server on the new `web` section, in the host's thread; status-get and an event say how it went."""
        def finish(status: dict[str, Any]) -> dict:
            self.stats.web = status
            if status["state"] == "failed":
                self.emit(WebApplyFailed(revision=revision, reason=status["reason"], url=status.get("url")))
            else:
                self.emit(WebApplied(revision=revision, state=status["state"], url=status.get("url")))
            return {}

        self.pending.append(([], self.web.submit(self.config.web, revision), finish))

    def _reconcile(self) -> dict[str, Any]:
        """Start or stop service processes so each runs as many as `scale` says."""
        if not self.supervisor.available():
            return {}
        done = {}
        for service in SERVICES:
            want = self.config.scale.processes(service)
            try:
                done[service] = self.supervisor.scale(service, want)
            except SupervisorError as exc:
                log.warning("%s", exc)
            self.fleet.services.forget(service, want)
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
    from services.controller.web.host import WebHost  # here: a Controller built by a test serves no web

    # its own thread; it talks to us over the control socket. status-get says whether it runs, where, or why not;
    # a revision that changes the web section restarts it (Controller.commit)
    controller.web = WebHost(controller.state_dir)
    controller.stats.web = controller.web.apply(controller.config.web)
    try:
        controller.run()
    finally:
        controller.web.stop()
