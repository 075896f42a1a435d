"""The DHCP service process: sockets, one serving thread, the lease store, events.

One thread polls the interfaces' sockets. Each turn it reads every datagram waiting (up to BATCH), lets the
sans-IO core (server.py) decide, commits the lease writes of the whole turn in one SQLite transaction (group
commit) and only then sends the replies: a lease is durable before its ACK leaves. Nothing in the turn waits on
the network (no ping-before-offer). Once a second it expires leases and refreshes interface addresses.
"""

from __future__ import annotations

import asyncio
import gc
import os
import select
import socket
import threading
import time

from services.dhcp import packet as pk
from services.dhcp.lease_store import LeaseStore
from services.dhcp.ra import build_ra, is_router_solicitation
from services.dhcp.server import DhcpServer, Interface, ip_str
from services.dhcp.transport import (
    ALL_NODES,
    add_arp_entry,
    interface_address,
    interface_mac,
    open_dhcp_socket,
    open_ra_socket,
)
from shared import events as ev
from shared.config.base import normalize_mac
from shared.paths import state_path
from shared.service import BaseService

BATCH = 16  # datagrams per turn: bounds the wait of the first one (latency) while grouping commits
HOUSEKEEPING = 1.0
CHECKPOINT_INTERVAL = 2.0
GC_SWEEP = 600.0  # seconds between full collections (~0.1 s pause with 65,000 leases)


class DhcpService(BaseService):
    name = "dhcp"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.lock = threading.Lock()
        self.sockets: dict[str, socket.socket] = {}
        self.ifaces: dict[str, Interface] = {}
        self.ra_sockets: dict[str, tuple[socket.socket, int, bytes]] = {}
        self.fd_map: dict[int, tuple[str, str]] = {}  # fd -> (kind, interface)
        self.poller = select.poll()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.poller.register(self.wake_r, select.POLLIN)
        self.running = False
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.store: LeaseStore | None = None
        self.core: DhcpServer | None = None
        self.buf = bytearray(4096)
        self.view = memoryview(self.buf)
        self.malformed = 0
        self.ras_sent = 0
        self.unicast = "arp"
        self._exhausted_logged: dict[str, float] = {}
        self._open_failed: set = set()
        self._next_sweep = time.monotonic() + GC_SWEEP
        self._dest_cache: dict[tuple[int, int], tuple[str, int]] = {}

    # -- life ------------------------------------------------------------------------------------------------

    async def start(self, config) -> None:
        path = state_path(self.ctx.state_dir, config.dhcp.lease_file)
        self.store = LeaseStore(path, config.dhcp.durability)
        self.core = DhcpServer(config, self.store, self.ctx.instance, max(1, self.ctx.instances))
        self._apply_sockets(config)
        self.running = True
        self.thread = threading.Thread(target=self._serve, name="dhcp-serve", daemon=True)
        self.thread.start()
        self.checkpointer = threading.Thread(target=self._checkpoints, name="dhcp-checkpoint", daemon=True)
        self.checkpointer.start()
        self.log.info("serving %s; lease store %s (%d leases)", ", ".join(self.sockets) or "no interface",
                      path, len(self.store.by_ip))

    async def apply(self, config) -> None:
        with self.lock:
            if config.dhcp.lease_file != self.core.config.dhcp.lease_file:
                self.log.warning("dhcp.lease_file changes on restart only; still using %s", self.store.path)
            self.core.instances = max(1, self.ctx.instances)
            self.core.apply(config)
            self._apply_sockets(config)
        self._wake()

    async def stop(self) -> None:
        self.running = False
        self.stopping.set()
        self._wake()
        if self.thread:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 5.0)
        if getattr(self, "checkpointer", None):
            await asyncio.get_running_loop().run_in_executor(None, self.checkpointer.join, CHECKPOINT_INTERVAL + 1)
        with self.lock:
            for sock in list(self.sockets.values()):
                sock.close()
            for sock, _, _ in self.ra_sockets.values():
                sock.close()
            self.sockets.clear()
            self.ra_sockets.clear()
            if self.store:
                self.store.close()

    def counters(self) -> dict[str, float]:
        out = dict(self.core.counters) if self.core else {}
        out.update(malformed=self.malformed, leases=len(self.store.by_ip) if self.store else 0,
                   commits=self.store.commits if self.store else 0, router_advertisements=self.ras_sent)
        return out

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
        freed = await asyncio.get_running_loop().run_in_executor(None, self.release, mac)
        self.log.info("lease-release %s: %s", mac, ", ".join(freed) or "no lease held")

    def release(self, mac: str) -> list[str]:
        """Free a client's leases on the operator's request (`bootfleet lease release MAC`)."""
        with self.lock:
            freed = self.core.release(mac.lower(), time.time())
            self.store.commit()
            self._emit_events()
        return freed

    # -- sockets ---------------------------------------------------------------------------------------------

    def _apply_sockets(self, config) -> None:
        self.unicast = config.dhcp.unicast
        wanted = {i.name: i for i in config.dhcp.interfaces}
        for name in list(self.sockets):
            if name not in wanted:
                sock = self.sockets.pop(name)
                self.poller.unregister(sock.fileno())
                self.fd_map.pop(sock.fileno(), None)
                sock.close()
                self.ifaces.pop(name, None)
        for name in wanted:
            if name not in self.sockets:
                try:
                    sock = open_dhcp_socket(name)
                except OSError as exc:
                    if name not in self._open_failed:  # retried each second; said once
                        self.log.error("interface %s: cannot serve DHCP (retrying): %s", name, exc)
                        self._open_failed.add(name)
                    continue
                if name in self._open_failed:
                    self._open_failed.discard(name)
                    self.log.warning("interface %s: serving DHCP now", name)
                self.sockets[name] = sock
                self.fd_map[sock.fileno()] = ("dhcp", name)
                self.poller.register(sock.fileno(), select.POLLIN)
            self._refresh_address(name)
        for name in list(self.ra_sockets):
            if name not in wanted or not wanted[name].ipv6_ra:
                sock = self.ra_sockets.pop(name)[0]
                self.poller.unregister(sock.fileno())
                self.fd_map.pop(sock.fileno(), None)
                sock.close()
        for name, iface in wanted.items():
            if iface.ipv6_ra and name not in self.ra_sockets:
                try:
                    sock, ifindex = open_ra_socket(name)
                except OSError as exc:
                    if ("ra", name) not in self._open_failed:
                        self.log.error("interface %s: cannot answer router solicitations (retrying): %s", name, exc)
                        self._open_failed.add(("ra", name))
                    continue
                self._open_failed.discard(("ra", name))
                mac = interface_mac(sock, name)
                self.ra_sockets[name] = (sock, ifindex, build_ra(mac))
                self.fd_map[sock.fileno()] = ("ra", name)
                self.poller.register(sock.fileno(), select.POLLIN)

    def _refresh_address(self, name: str) -> None:
        sock = self.sockets.get(name)
        if sock is None:
            return
        address = interface_address(sock, name)
        known = self.ifaces.get(name)
        if address is None:
            if ("addr", name) not in self._open_failed:
                self.log.warning("interface %s has no IPv4 address; not answering there", name)
                self._open_failed.add(("addr", name))
            self.ifaces.pop(name, None)
        elif known is None or known.address != address:
            self._open_failed.discard(("addr", name))
            self.ifaces[name] = Interface(name, address)

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    # -- the serving thread ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        next_housekeeping = time.monotonic() + HOUSEKEEPING
        while self.running:
            timeout = max(0.0, next_housekeeping - time.monotonic())
            try:
                ready = self.poller.poll(timeout * 1000)
            except InterruptedError:
                continue
            with self.lock:
                for fd, _mask in ready:
                    if fd == self.wake_r:
                        try:
                            os.read(self.wake_r, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    kind, name = self.fd_map.get(fd, (None, None))
                    try:
                        if kind == "dhcp":
                            self._turn(name)
                        elif kind == "ra":
                            self._answer_rs(name)
                    except Exception:  # one bad turn never stops the server
                        self.log.exception("interface %s: serving turn failed", name)
                if time.monotonic() >= next_housekeeping:
                    next_housekeeping = time.monotonic() + HOUSEKEEPING
                    try:
                        self.core.expire(time.time())
                        self.store.commit()
                    except Exception:
                        self.log.exception("lease expiry failed")
                    # interfaces that were missing may have appeared; addresses may have changed
                    self._apply_sockets(self.core.config)
                    self._emit_events()
                    # long-lived leases leave the collector's view: a full collection over tens of
                    # thousands of them would stall the loop for milliseconds (the p99 latency). Every
                    # GC_SWEEP seconds one full collection reclaims any cyclic garbage frozen meanwhile.
                    if time.monotonic() >= self._next_sweep:
                        self._next_sweep = time.monotonic() + GC_SWEEP
                        gc.unfreeze()
                        gc.collect()
                    gc.freeze()

    def _checkpoints(self) -> None:
        """Fold the WAL into the database every few seconds, outside the serving thread."""
        while not self.stopping.wait(CHECKPOINT_INTERVAL):
            try:
                self.store.checkpoint()
            except Exception as exc:  # busy or closing: the next round catches up
                self.log.debug("checkpoint: %s", exc)

    def _turn(self, name: str) -> None:
        sock = self.sockets.get(name)
        iface = self.ifaces.get(name)
        if sock is None:
            return
        replies = []
        core, view, buf = self.core, self.view, self.buf
        now = time.time()
        for _ in range(BATCH):
            try:
                n, _addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.log.warning("interface %s: receive failed: %s", name, exc)
                break
            if iface is None:
                continue
            try:
                msg = pk.parse(bytes(view[:n]))  # one copy; slicing bytes beats slicing a memoryview per option
                reply = core.handle(msg, iface, now)
            except pk.PacketError as exc:
                self.malformed += 1
                if self.log.isEnabledFor(10):
                    self.log.debug("interface %s: dropped a datagram: %s", name, exc)
                continue
            except Exception:
                self.malformed += 1
                self.log.exception("interface %s: request could not be handled", name)
                continue
            if reply is not None:
                replies.append(reply)
        try:
            self.store.commit()  # durable before any ACK of this turn leaves
        except Exception:
            self.log.exception("lease store commit failed; replies of this turn withheld")
            try:
                self.store.load()
            except Exception:
                self.log.exception("lease store reload failed")
            return
        for reply in replies:
            self._send(sock, reply)
        if core.events:
            self._emit_events()

    def _send(self, sock: socket.socket, reply) -> None:
        dest = reply.dest
        if reply.arp and not (self.unicast == "arp" and add_arp_entry(sock, reply.iface.name, dest, reply.hwaddr)):
            dest = 0xFFFFFFFF
        addr = self._dest_cache.get((dest, reply.port))
        if addr is None:
            if len(self._dest_cache) > 4096:
                self._dest_cache.clear()
            addr = self._dest_cache[(dest, reply.port)] = (ip_str(dest), reply.port)
        try:
            sock.sendto(reply.data, addr)
        except OSError as exc:
            self.log.warning("reply to %s:%d failed: %s", ip_str(dest), reply.port, exc)

    def _answer_rs(self, name: str) -> None:
        sock, ifindex, ra = self.ra_sockets[name]
        for _ in range(BATCH):
            try:
                data, addr = sock.recvfrom(1500)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if is_router_solicitation(data):
                try:
                    sock.sendto(ra, (ALL_NODES, 0, 0, ifindex))
                    self.ras_sent += 1
                except OSError as exc:
                    self.log.warning("interface %s: router advertisement failed: %s", name, exc)

    def _emit_events(self) -> None:
        events, self.core.events = self.core.events, []
        for type_, fields in events:
            if type_ == ev.DHCP_POOL_EXHAUSTED:
                now = time.monotonic()
                scope = fields.get("scope")
                if now - self._exhausted_logged.get(scope, -60.0) >= 10.0:  # a storm logs once per 10 s
                    self._exhausted_logged[scope] = now
                    self.log.warning("scope %s: pool exhausted, no offer for %s", scope, fields.get("mac"))
            self.ctx.emit(type_, **fields)
