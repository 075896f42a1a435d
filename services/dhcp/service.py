"""The DHCP service process: configuration applied, events emitted, counters, the controller's commands.

Its parts: the sans-IO decisions (core.py) over the SQLite lease store (lease_store.py), driven by the I/O loop
(io_loop.py: sockets, the serving thread, timers). An event travels: the core queues it, the I/O loop takes
it (`take_events()`) after the turn's commit and hands it to `_publish` here, which passes it to
`ctx.emit(event)` for the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.dhcp import events as ev
from services.dhcp.core import DhcpCore
from services.dhcp.io_loop import DhcpIoLoop
from services.dhcp.lease_store import LeaseStore
from services.dhcp.proxy import NoLeases, ProxyCore
from shared.config.base import normalize_mac
from shared.events import Event
from shared.log_limit import LogLimiter
from shared.paths import state_path
from shared.service import BaseService


class DhcpService(BaseService):
    name = "dhcp"
    sections = ("dhcp", "boot", "clients", "iscsi", "scale")  # scale: instances split the clients

    def __init__(self, ctx):
        super().__init__(ctx)
        self.store: LeaseStore | None = None
        self.core: DhcpCore | None = None
        self.loop: DhcpIoLoop | None = None
        self._exhausted_log = LogLimiter(self.log, "pool-exhausted warnings", rate=1)  # a storm logs 1 line/s

    # -- life ------------------------------------------------------------------------------------------------

    async def start(self, config) -> None:
        self.core, self.store = self._core_for(config)
        self.loop = DhcpIoLoop(self.core, self.store, self.log, self._publish)
        self.loop.start(config)
        self._say_serving()

    def _core_for(self, config):
        """The decisions and their store for `dhcp.mode`: leases (server) or ProxyDHCP with none (proxy)."""
        instances = max(1, self.ctx.instances)
        if config.dhcp.mode == "proxy":
            return ProxyCore(config, self.ctx.instance, instances), NoLeases()
        store = LeaseStore(state_path(self.ctx.state_dir, config.dhcp.lease_file), config.dhcp.durability)
        return DhcpCore(config, store, self.ctx.instance, instances), store

    def _say_serving(self) -> None:
        where = ", ".join(self.loop.sockets) or "no interface"
        if self.core.mode == "proxy":
            self.log.info("ProxyDHCP on %s (ports 67 and 4011); no leases", where)
        else:
            self.log.info("serving %s; lease store %s (%d leases)", where, self.store.path, len(self.store.by_ip))

    async def apply(self, config) -> None:
        with self.loop.lock:
            if config.dhcp.mode != self.core.mode:  # a new core; offers in flight are dropped, leases stay on disk
                self.store.close()
                self.core, self.store = self._core_for(config)
                self.loop.core, self.loop.store = self.core, self.store
                self.loop.apply_sockets(config)
                self._say_serving()
            else:
                if self.core.mode == "server" and config.dhcp.lease_file != self.core.config.dhcp.lease_file:
                    self.log.warning("dhcp.lease_file changes on restart only; still using %s", self.store.path)
                self.core.instances = max(1, self.ctx.instances)
                self.core.apply(config)
                self.loop.apply_sockets(config)
        self.loop.wake()

    async def stop(self) -> None:
        if self.loop:
            await asyncio.get_running_loop().run_in_executor(None, self.loop.stop)
        if self.store:
            with self.loop.lock if self.loop else contextlib.nullcontext():
                self.store.close()

    def counters(self) -> dict[str, float]:
        out = dict(self.core.counters) if self.core else {}
        loop, store = self.loop, self.store
        out.update(malformed=loop.malformed if loop else 0, leases=len(store.by_ip) if store else 0,
                   commits=store.commits if store else 0, router_advertisements=loop.ras_sent if loop else 0)
        return out

    def problems(self) -> list[str]:
        """Interfaces whose socket is refused (retried each second): `cannot listen on 0.0.0.0:67 on eth1: ...`."""
        return list(dict(self.loop.trouble).values()) if self.loop else []  # dict(): one copy under the GIL

    # -- commands --------------------------------------------------------------------------------------------

    async def command(self, name: str, args: dict) -> None:
        """`lease-release {mac}` from the controller (`bootfleet lease release MAC`): answered by the
        dhcp.lease.released event of each address freed; nothing is emitted when the MAC holds no lease."""
        if name != "lease-release":
            self.log.warning("command %s is not supported by dhcp", name)
            return
        try:
            mac = normalize_mac(args.get("mac"))
        except ValueError as exc:
            self.log.warning("lease-release: %s", exc)
            return
        if self.core.mode == "proxy":
            self.log.info("lease-release %s: proxy mode holds no leases (the site's DHCP server does)", mac)
            return
        freed = await asyncio.get_running_loop().run_in_executor(None, self.release, mac)
        self.log.info("lease-release %s: %s", mac, ", ".join(freed) or "no lease held")

    def release(self, mac: str) -> list[str]:
        """Free a client's leases on the operator's request (`bootfleet lease release MAC`)."""
        with self.loop.lock:
            freed = self.core.release(mac.lower(), time.time())
            self.store.commit()
            events = self.core.take_events()
            if events:
                self._publish(events)
        return freed

    # -- events ----------------------------------------------------------------------------------------------

    def _publish(self, events: list[Event]) -> None:
        """The core's events to the controller (called with the loop's lock held)."""
        for event in events:
            if isinstance(event, ev.PoolExhausted) and self._exhausted_log.allow():
                self.log.warning("scope %s: pool exhausted, no offer for %s", event.scope, event.mac)
            self.ctx.emit(event)
