"""The DHCP service's I/O: the interfaces' sockets, one serving thread, the housekeeping timer, WAL checkpoints.

One thread polls the sockets. Each turn it reads every datagram waiting on one interface (up to BATCH), lets the
sans-IO core (core.py) decide, commits the lease writes of the whole turn in one SQLite transaction (group
commit) and only then sends the replies: a lease is durable before its ACK leaves. Nothing in the turn waits on
the network (no ping-before-offer). Once a second it expires leases and re-opens missing interfaces. The core's
events go to `publish` (the service) from this thread, after the commit. `lock` is held while the core or the
store is in use: other threads (the service's apply and commands) take it too.
In proxy mode (`dhcp.mode: proxy`) the core is a `ProxyCore` (proxy.py), the store a `NoLeases`, and each
interface has a second socket, port 4011, whose requests go to `core.handle_pxe` with their source address.
"""

from __future__ import annotations

import gc
import logging
import select
import socket
import threading
import time
from typing import Callable

from services.dhcp import packet as pk
from services.dhcp.core import BROADCAST, DhcpCore, Interface, Reply
from services.dhcp.lease_store import LeaseStore
from services.dhcp.packet import ip_str
from services.dhcp.proxy import PXE_PORT
from services.dhcp.ra import build_ra, is_router_solicitation
from services.dhcp.sockets import (
    ALL_NODES,
    add_arp_entry,
    interface_address,
    interface_mac,
    open_dhcp_socket,
    open_ra_socket,
)
from shared.events import Event
from shared.log_limit import LogLimiter
from shared.wakeup import Wakeup

BATCH = 16  # datagrams per turn: bounds the wait of the first one (latency) while grouping commits
HOUSEKEEPING = 1.0
CHECKPOINT_INTERVAL = 2.0
GC_SWEEP = 600.0  # seconds between full collections (~0.1 s pause with 65,000 leases)


class DhcpIoLoop:
    def __init__(self, core: DhcpCore, store: LeaseStore, log: logging.Logger,
                 publish: Callable[[list[Event]], None]):
        self.core = core
        self.store = store
        self.log = log
        self.publish = publish
        self.lock = threading.Lock()
        self.sockets: dict[str, socket.socket] = {}
        self.pxe_sockets: dict[str, socket.socket] = {}  # port 4011, ProxyDHCP only (dhcp.mode: proxy)
        self.ifaces: dict[str, Interface] = {}
        self.ra_sockets: dict[str, tuple[socket.socket, int, bytes]] = {}
        self.fd_map: dict[int, tuple[str, str]] = {}  # fd -> (kind, interface)
        self.poller = select.poll()
        self.wakeup = Wakeup()
        self.poller.register(self.wakeup.fd, select.POLLIN)
        self.running = False
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.checkpointer: threading.Thread | None = None
        self.buf = bytearray(4096)
        self.view = memoryview(self.buf)
        self.malformed = 0
        self.ras_sent = 0
        self.unicast = "arp"
        self._bad_requests = LogLimiter(log, "messages about bad requests")
        self._open_failed: set = set()  # what is said once until it recovers (missing interface, address)
        self.trouble: dict = {}  # interface (or ("pxe", interface)) -> why its socket is refused, for heartbeats
        self._next_sweep = time.monotonic() + GC_SWEEP
        self._dest_cache: dict[tuple[int, int], tuple[str, int]] = {}

    # -- life ------------------------------------------------------------------------------------------------

    def start(self, config) -> None:
        with self.lock:
            self.apply_sockets(config)
        self.running = True
        self.thread = threading.Thread(target=self._serve, name="dhcp-serve", daemon=True)
        self.thread.start()
        self.checkpointer = threading.Thread(target=self._checkpoints, name="dhcp-checkpoint", daemon=True)
        self.checkpointer.start()

    def wake(self) -> None:
        """Make the serving thread look at its sockets again (after `apply_sockets` from another thread)."""
        self.wakeup.wake()

    def stop(self) -> None:
        """Stop both threads (blocks up to a few seconds: call from an executor) and close the sockets."""
        self.running = False
        self.stopping.set()
        self.wake()
        if self.thread:
            self.thread.join(5.0)
        if self.checkpointer:
            self.checkpointer.join(CHECKPOINT_INTERVAL + 1)
        with self.lock:
            for sock in [*self.sockets.values(), *self.pxe_sockets.values()]:
                sock.close()
            self.pxe_sockets.clear()
            for sock, _, _ in self.ra_sockets.values():
                sock.close()
            self.sockets.clear()
            self.ra_sockets.clear()
        self.wakeup.close()

    # -- sockets (called with `lock` held) --------------------------------------------------------------------

    def apply_sockets(self, config) -> None:
        """Open the configured interfaces that are not open yet, close those no longer configured."""
        self.unicast = config.dhcp.unicast
        wanted = {i.name: i for i in config.dhcp.interfaces}
        proxy_on = self.core.mode == "proxy"
        self.trouble = {k: v for k, v in self.trouble.items()
                        if (k in wanted) or (isinstance(k, tuple) and k[1] in wanted and proxy_on)}
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
                    self.trouble[name] = str(exc)
                    continue
                self.trouble.pop(name, None)
                if name in self._open_failed:
                    self._open_failed.discard(name)
                    self.log.warning("interface %s: serving DHCP now", name)
                self.sockets[name] = sock
                self.fd_map[sock.fileno()] = ("dhcp", name)
                self.poller.register(sock.fileno(), select.POLLIN)
            self._refresh_address(name)
        proxy = self.core.mode == "proxy"
        for name in list(self.pxe_sockets):
            if name not in wanted or not proxy:
                sock = self.pxe_sockets.pop(name)
                self.poller.unregister(sock.fileno())
                self.fd_map.pop(sock.fileno(), None)
                sock.close()
        for name in wanted if proxy else ():
            if name not in self.pxe_sockets:
                try:
                    sock = open_dhcp_socket(name, PXE_PORT)
                except OSError as exc:
                    if ("pxe", name) not in self._open_failed:
                        self.log.error("interface %s: cannot serve ProxyDHCP on port %d (retrying): %s", name, PXE_PORT, exc)
                        self._open_failed.add(("pxe", name))
                    self.trouble[("pxe", name)] = str(exc)
                    continue
                self.trouble.pop(("pxe", name), None)
                self._open_failed.discard(("pxe", name))
                self.pxe_sockets[name] = sock
                self.fd_map[sock.fileno()] = ("pxe", name)
                self.poller.register(sock.fileno(), select.POLLIN)
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

    # -- the serving thread ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        next_housekeeping = time.monotonic() + HOUSEKEEPING
        wake_fd = self.wakeup.fd
        while self.running:
            timeout = max(0.0, next_housekeeping - time.monotonic())
            try:
                ready = self.poller.poll(timeout * 1000)
            except InterruptedError:
                continue
            with self.lock:
                for fd, _mask in ready:
                    if fd == wake_fd:
                        self.wakeup.drain()
                        continue
                    kind, name = self.fd_map.get(fd, (None, None))
                    try:
                        if kind == "dhcp":
                            self._turn(name)
                        elif kind == "pxe":
                            self._turn(name, pxe=True)
                        elif kind == "ra":
                            self._answer_rs(name)
                    except Exception:  # one bad turn never stops the server
                        self.log.exception("interface %s: serving turn failed", name)
                if time.monotonic() >= next_housekeeping:
                    next_housekeeping = time.monotonic() + HOUSEKEEPING
                    self._housekeeping()

    def _housekeeping(self) -> None:
        try:
            self.core.expire(time.time())
            self.store.commit()
        except Exception:
            self.log.exception("lease expiry failed")
        # interfaces that were missing may have appeared; addresses may have changed
        self.apply_sockets(self.core.config)
        events = self.core.take_events()
        if events:
            self.publish(events)
        # long-lived leases leave the collector's view: a full collection over tens of thousands of them would
        # stall the loop for milliseconds (the p99 latency). Every GC_SWEEP seconds one full collection
        # reclaims any cyclic garbage frozen meanwhile.
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

    def _turn(self, name: str, pxe: bool = False) -> None:
        sock = (self.pxe_sockets if pxe else self.sockets).get(name)
        iface = self.ifaces.get(name)
        if sock is None:
            return
        replies = []
        core, view, buf = self.core, self.view, self.buf
        now = time.time()
        for _ in range(BATCH):
            try:
                n, addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.log.warning("interface %s: receive failed: %s", name, exc)
                break
            if iface is None:
                continue
            try:
                msg = pk.parse(bytes(view[:n]))  # one copy; slicing bytes beats slicing a memoryview per option
                if pxe:  # port 4011: the answer goes back where the request came from
                    reply = core.handle_pxe(msg, iface, now, (pk.ip_int(addr[0]), addr[1]))
                else:
                    reply = core.handle(msg, iface, now)
            except pk.PacketError as exc:
                self.malformed += 1
                if self.log.isEnabledFor(logging.DEBUG) and self._bad_requests.allow():
                    self.log.debug("interface %s: dropped a datagram: %s", name, exc)
                continue
            except Exception:
                self.malformed += 1
                if self._bad_requests.allow():
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
        events = core.take_events()
        if events:
            self.publish(events)

    def _send(self, sock: socket.socket, reply: Reply) -> None:
        dest = reply.dest
        if reply.arp and not (self.unicast == "arp" and add_arp_entry(sock, reply.iface.name, dest, reply.hwaddr)):
            dest = BROADCAST
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
