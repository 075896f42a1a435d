"""A service under the controller: configuration from the bus, events to it, a cached revision when it is away.

Start-up: if `<state_dir>/cache/<service>-<instance>.msgpack` holds a revision this process applied before,
start on it at once (the controller may be down); then follow the controller's store. Each new `config`
revision is turned into the typed model and applied in the asyncio loop, cached atomically, and reported
(`service.applied` event and the revision in every heartbeat). A revision that changes none of the service's
`sections` is not passed to its `apply` but is reported applied all the same. A revision that fails to apply
is reported and the previous one stays; its reason (`shared/failures.py`: a sentence, not a repr) rides in
every heartbeat as `failed: {revision, reason}` until a revision applies, so `bootfleet status` shows it. A
revision that applied but cannot be served in full (`BaseService.problems()`: a DHCP interface whose socket
is refused, retried each second) is reported the same way while it lasts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgpack

from shared import events
from shared.atomic_file import write_atomic
from shared.bus import message as m
from shared.bus.clone_client import CloneClient
from shared.bus.endpoints import endpoints
from shared.bus.event_sender import EventSender
from shared.config.loader import ConfigError, config_from_dict
from shared.config.model import BusConfig
from shared.failures import reason as failure_reason
from shared.service import BaseService, ServiceContext, setup_logging, stop_within_bound, wait_for_signal

log = logging.getLogger("bootfleet")


def bus_from_env() -> BusConfig:
    """BOOTFLEET_BUS: unset or `ipc` (sockets in the state dir), or `tcp://HOST:PORT_BASE[?curve=0]`."""
    url = os.environ.get("BOOTFLEET_BUS", "ipc")
    if url == "ipc":
        return BusConfig()
    parsed = urlparse(url)
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        raise SystemExit(f"BOOTFLEET_BUS={url}: expected ipc or tcp://HOST:PORT")
    return BusConfig(transport="tcp", host=parsed.hostname, port_base=parsed.port, curve="curve=0" not in parsed.query)


def touches(sections: tuple[str, ...] | None, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether going from configuration `old` to `new` changes one of `sections` (None: always)."""
    if sections is None:
        return True
    return any(old.get(section) != new.get(section) for section in sections)


class ManagedRuntime:
    def __init__(self, service_cls: type[BaseService], instance: int, state_dir: Path):
        self.service_cls = service_cls
        self.name = service_cls.name
        self.state_dir = state_dir
        self.bus = bus_from_env()
        self.endpoints = endpoints(state_dir, self.bus)
        curve_dir = state_dir if self.endpoints.curve else None
        self.sender = EventSender(
            self.endpoints.events, self.name, instance, beat_info=self._beat_info, curve_state_dir=curve_dir
        )
        self.ctx = ServiceContext(self.name, instance, state_dir, self.sender.emit)
        self.service: BaseService | None = None
        self.revision = -1
        self.failed: dict[str, Any] | None = None  # the last revision that failed to apply: {revision, reason}
        self.data: dict[str, Any] = {}  # the configuration of `revision`, as published
        self.cache_path = state_dir / "cache" / f"{self.name}-{instance}.msgpack"
        self.command_prefix = m.command_prefix(self.name)
        self.commands_done: set[str] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._apply_lock = asyncio.Lock()
        self.client = CloneClient(
            self.endpoints,
            self._on_snapshot,
            self._on_update,
            self._on_presence,
            timeout=self.bus.heartbeat_timeout,
            state_dir=curve_dir,
        )

    def _beat_info(self) -> dict[str, Any]:
        counters = self.service.counters() if self.service else {}
        return {"revision": self.revision, "counters": counters, "controller": self.client.present, "failed": self._failure()}

    def _failure(self) -> dict[str, Any] | None:
        """The last revision that failed to apply; else what keeps the applied one from serving (problems())."""
        if self.failed or self.service is None:
            return self.failed
        try:
            problems = self.service.problems()
        except Exception:
            log.exception("problems() failed")
            return None
        return {"revision": self.revision, "reason": "; ".join(problems)} if problems else None

    # Callbacks from the bus thread: hand over to the asyncio loop.
    def _on_snapshot(self, store: dict[str, Any]) -> None:
        leases = {k[len(m.LEASE_PREFIX) :]: v["mac"] for k, v in store.items() if k.startswith(m.LEASE_PREFIX) and v}
        self.loop.call_soon_threadsafe(self._replace_leases, leases)
        pcboot = {k[len(m.PCBOOT_PREFIX) :]: v for k, v in store.items() if k.startswith(m.PCBOOT_PREFIX) and v}
        self.loop.call_soon_threadsafe(setattr, self.ctx, "pcboot", pcboot)
        if m.CONFIG_KEY in store:
            self._schedule(store[m.CONFIG_KEY])
        for key, val in store.items():
            if key.startswith(self.command_prefix) and val:
                self._command(key, val)

    def _on_update(self, key: str, val: Any) -> None:
        if key == m.CONFIG_KEY and val:
            self._schedule(val)
        elif key.startswith(m.LEASE_PREFIX):
            ip = key[len(m.LEASE_PREFIX) :]
            self.loop.call_soon_threadsafe(self._set_lease, ip, val["mac"] if val else None)
        elif key.startswith(m.PCBOOT_PREFIX):
            self.loop.call_soon_threadsafe(self._set_pcboot, key[len(m.PCBOOT_PREFIX) :], val)
        elif key.startswith(self.command_prefix) and val:
            self._command(key, val)

    def _command(self, key: str, val: dict[str, Any]) -> None:
        # a command stays in the store for a while; a snapshot taken meanwhile must not run it twice
        if key in self.commands_done or not isinstance(val, dict) or self.service is None:
            return
        self.commands_done.add(key)
        asyncio.run_coroutine_threadsafe(self.service.command(str(val.get("name")), val.get("args") or {}), self.loop)

    def _on_presence(self, up: bool) -> None:
        log.info("controller %s", "reachable" if up else "away: serving on revision %d" % self.revision)

    def _replace_leases(self, leases: dict[str, str]) -> None:
        self.ctx.leases = leases

    def _set_lease(self, ip: str, mac: str | None) -> None:
        if mac:
            self.ctx.leases[ip] = mac
        else:
            self.ctx.leases.pop(ip, None)

    def _set_pcboot(self, mac: str, val: dict | None) -> None:
        if val:
            self.ctx.pcboot[mac] = val
        else:
            self.ctx.pcboot.pop(mac, None)

    def _schedule(self, doc: dict) -> None:
        asyncio.run_coroutine_threadsafe(self.apply(doc["revision"], doc["config"]), self.loop)

    async def apply(self, revision: int, data: dict, *, from_cache: bool = False) -> bool:
        async with self._apply_lock:
            if revision == self.revision:
                return True
            try:
                config = config_from_dict(data)
            except ConfigError as exc:
                log.error("revision %d rejected: %s", revision, exc)
                self._failed(revision, str(exc))
                return False
            setup_logging(config.logging.level, self.name, self.ctx.instance)
            self.ctx.instances = config.scale.processes(self.name)
            self.sender.interval = config.bus.heartbeat_interval
            self.sender.queue.maxsize = config.bus.event_queue
            self.client.timeout = config.bus.heartbeat_timeout
            try:
                if self.service is None:
                    service = self.service_cls(self.ctx)
                    await service.start(config)
                    self.service = service
                elif touches(self.service.sections, self.data, data):
                    await self.service.apply(config)
                else:
                    log.debug("revision %d changes none of %s: not applied to the service", revision, self.service.sections)
            except Exception as exc:
                text = failure_reason(exc)
                if text.startswith(type(exc).__name__):
                    log.exception("revision %d failed to apply", revision)  # not a known failure: the traceback
                else:
                    log.error("revision %d failed to apply: %s", revision, text)
                self._failed(revision, text)
                return False
            self.revision, self.data, self.failed = revision, data, None
            if not from_cache:
                write_atomic(self.cache_path, msgpack.packb({"revision": revision, "config": data}))
            log.info("applied revision %d%s", revision, " (cached)" if from_cache else "")
            self.ctx.emit(events.ServiceApplied(revision=revision, cached=from_cache))
            return True

    def _failed(self, revision: int, text: str) -> None:
        self.failed = {"revision": revision, "reason": text}
        self.ctx.emit(events.ServiceApplyFailed(revision=revision, reason=text))

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.sender.start()
        self.ctx.emit(events.ServiceStarted(pid=os.getpid()))
        if self.cache_path.exists():
            try:
                cached = msgpack.unpackb(self.cache_path.read_bytes())
                await self.apply(cached["revision"], cached["config"], from_cache=True)
            except Exception as exc:
                log.warning("cached configuration %s unusable: %s", self.cache_path, exc)
        self.client.start()
        await wait_for_signal()
        self.ctx.emit(events.ServiceStopping(pid=os.getpid()))
        if self.service:
            await stop_within_bound(self.service)
        self.client.stop()
        self.sender.stop()
        return 0


async def run_managed(service_cls: type[BaseService], instance: int, state_dir: Path) -> int:
    return await ManagedRuntime(service_cls, instance, state_dir).run()
