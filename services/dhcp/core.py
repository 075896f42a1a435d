"""The DHCPv4 server's decisions (RFC 2131): a request and the current time in; a reply, lease changes and events out.

Theory of operation
-------------------
Sans-IO: no sockets, no files. The I/O loop hands `handle()` a parsed `Message`, the `Interface` it arrived on
(name and our address there) and `now`; `handle()` returns a `Reply` (bytes plus where they go) or None, and
writes leases into the `LeaseTable` it was given (lease_table.py). Events (events.py) queue up until the
caller takes them with `take_events()`. The table's owner must make the writes of a batch durable before it
sends that batch's replies: that is what makes a lease durable before its ACK.

Scope: a relayed request (giaddr set) belongs to the scope whose subnet holds giaddr; a direct one to the
scope configured on the interface it arrived on (the one holding ciaddr when several are).

Client states (RFC 2131 4.3.2), told apart by the request's fields:
- SELECTING:   server identifier (54) present, ciaddr 0, requested address (50) = the offered one.
               Another server's identifier: the client took its offer; ours is withdrawn, no reply.
- INIT-REBOOT: no 54, ciaddr 0, 50 present: the client checks a remembered address. Wrong subnet -> NAK;
               our record says another client -> NAK; ours or free -> ACK; no record and not ours -> silent.
- RENEWING / REBINDING: no 54, no 50, ciaddr set (unicast or broadcast): extend if the lease is the
               client's (or the address is free), else NAK.
Offers hold an address for `offer_hold` seconds in memory only; an ACK writes the lease. DECLINE quarantines
the address for `decline_hold` seconds; RELEASE frees it, and the client gets it back on its next DISCOVER
if nobody took it meanwhile. `expire(now)` turns leases past their end into `expired` and emits events.

Several processes (scale.dhcp > 1) share one lease table: each answers the broadcasts of its share of the
clients and allocates from its own slice of the pools (RFC 3074), and re-reads an address (`refresh`) before it
trusts a record another process may have changed. Boot answers: boot_answer.py.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from services.dhcp import events as ev
from services.dhcp import identity
from services.dhcp import options as opt
from services.dhcp import packet as pk
from services.dhcp.allocator import serves
from services.dhcp.boot_answer import BootAnswer, build_boot_answer
from services.dhcp.classify import Classification, ClassMatcher, classify
from services.dhcp.lease_table import BOUND, DECLINED, EXPIRED, RELEASED, Lease, LeaseTable
from services.dhcp.packet import ip_int, ip_str
from services.dhcp.scopes import ScopeRuntime
from shared.boot import assignment_for
from shared.events import Event

log = logging.getLogger("bootfleet.dhcp.core")

BROADCAST = 0xFFFFFFFF
CLIENT_PORT = 68
SERVER_PORT = 67
_U32 = struct.Struct("!I")
MIN_MAX_MESSAGE = 576  # RFC 2131: every client takes a 576-byte IP datagram
ESSENTIAL = frozenset((opt.SUBNET_MASK, opt.ROUTERS, opt.ROOT_PATH, opt.TFTP_SERVER_NAME, opt.BOOTFILE_NAME, opt.IPXE_ENCAP))
COUNTERS = ("received", "replied", "discovers", "requests", "offers", "acks", "naks", "declines", "releases",
            "informs", "ignored", "exhausted", "unknown_clients", "other_server", "shrunk")
# `_acceptable`'s answer for an address in another process's slice: that process answers, we stay silent
_OTHER_SLICE = "another process's slice"


class Interface:
    """Where a request came in: interface name and our address on it (the server identifier)."""

    __slots__ = ("name", "address", "packed")

    def __init__(self, name: str, address: int):
        self.name = name
        self.address = address
        self.packed = _U32.pack(address)


@dataclass(slots=True)
class Reply:
    """A reply and where it goes. `arp` asks the I/O loop to add an ARP entry (dest -> hwaddr) first."""

    data: bytes
    dest: int
    port: int
    arp: bool
    hwaddr: bytes
    iface: Interface


@dataclass(slots=True)
class Offer:
    """An address held for a client between OFFER and REQUEST (memory only)."""

    mac: str
    until: float
    scope: str


class DhcpCore:
    mode = "server"

    def __init__(self, config, leases: LeaseTable, instance: int = 0, instances: int = 1):
        self.leases = leases
        self.instance = instance
        self.instances = instances
        self._events: list[Event] = []
        self.offers: dict[int, Offer] = {}  # by address
        self.offer_of: dict[tuple[str, str], int] = {}  # (scope, mac) -> address offered
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.apply(config)

    def take_events(self) -> list[Event]:
        """The events since the last call, oldest first."""
        events = self._events
        if events:
            self._events = []
        return events

    # -- configuration ---------------------------------------------------------------------------------------

    def apply(self, config) -> None:
        """A new configuration revision: scopes recompiled; leases and offers in flight are kept."""
        self.config = config
        d = config.dhcp
        self.scopes = [ScopeRuntime(s, config, self.instance, self.instances) for s in d.scopes]
        self.by_interface: dict[str, list[ScopeRuntime]] = {}
        for s in self.scopes:
            if s.interface:
                self.by_interface.setdefault(s.interface, []).append(s)
        self.by_giaddr: dict[int, ScopeRuntime | None] = {}
        self.classes = {c.name: c for c in d.classes}
        self.matcher = ClassMatcher(d.classes)
        self.offer_hold = d.offer_hold
        self.decline_hold = d.decline_hold
        self.authoritative = d.authoritative
        self._answers: dict[tuple, BootAnswer] = {}
        self._classes_seen: dict[tuple, Classification] = {}

    # -- helpers ---------------------------------------------------------------------------------------------

    def scope_for(self, msg: pk.Message, iface: Interface) -> ScopeRuntime | None:
        if msg.giaddr:
            try:
                return self.by_giaddr[msg.giaddr]
            except KeyError:
                found = next((s for s in self.scopes if s.contains(msg.giaddr)), None)
                self.by_giaddr[msg.giaddr] = found
                return found
        scopes = self.by_interface.get(iface.name)
        if not scopes:
            return None
        if len(scopes) > 1:
            for probe in (msg.ciaddr, iface.address):
                if probe:
                    for s in scopes:
                        if s.contains(probe):
                            return s
        return scopes[0]

    def _offered_to(self, ip: int, mac: str, now: float) -> bool:
        offer = self.offers.get(ip)
        return offer is not None and offer.mac == mac and offer.until > now

    def _is_free(self, scope: ScopeRuntime, ip: int, mac: str, now: float) -> bool:
        lease = self.leases.get(ip)
        if self.instances > 1 and lease is not None and not lease.held(now):
            lease = self.leases.refresh(ip)  # another process may have renewed it since we last looked
        if lease is not None and lease.expires > now:
            if lease.state == DECLINED or (lease.state == BOUND and lease.mac != mac):
                return False
        offer = self.offers.get(ip)
        if offer is not None and offer.until > now and offer.mac != mac:
            return False
        owner = scope.reserved_ips.get(ip)
        return owner is None or owner == mac

    def _known(self, scope: ScopeRuntime, mac: str) -> bool:
        return mac in scope.reservations or assignment_for(self.config, mac) is not None

    def _choose(self, scope: ScopeRuntime, msg: pk.Message, mac: str, now: float) -> int | None:
        res = scope.reservations.get(mac)
        if res is not None and res.ip:
            ip = ip_int(res.ip)
            if self._is_free(scope, ip, mac, now):
                return ip
            log.warning("reserved address %s of %s is held by another client; using the pool", res.ip, mac)
        held = self.offer_of.get((scope.name, mac))
        if held is not None and self._offered_to(held, mac, now):
            return held
        previous = None
        for lease in self.leases.for_mac(mac):
            if lease.scope != scope.name:
                continue
            if lease.state == BOUND and lease.expires > now:
                return lease.ip
            if lease.state in (RELEASED, EXPIRED) and scope.pool.mine(lease.ip) and self._is_free(scope, lease.ip, mac, now):
                previous = lease.ip
        if previous is not None:
            return previous
        requested = msg.options.get(opt.REQUESTED_ADDRESS)
        if requested is not None and len(requested) == 4:
            ip = _U32.unpack(requested)[0]
            if scope.pool.mine(ip) and self._is_free(scope, ip, mac, now):
                return ip
        return scope.pool.allocate(lambda ip: self._is_free(scope, ip, mac, now))

    def _boot(self, scope: ScopeRuntime, cls: Classification, mac: str, iface: Interface) -> BootAnswer:
        """The client's boot answer, cached per distinct answer."""
        res = scope.reservations.get(mac)
        assigned = cls.kind == "ipxe" and (res is not None or assignment_for(self.config, mac) is not None)
        key = (scope.name, cls.kind, cls.arch, cls.names, res.mac if res else None, iface.address, mac if assigned else None)
        answer = self._answers.get(key)
        if answer is None:
            answer = build_boot_answer(self.config, scope, cls, res, mac, iface.address, self.classes)
            if len(self._answers) > 4096:
                self._answers.clear()
            self._answers[key] = answer
        return answer

    def _reply(self, msg: pk.Message, iface: Interface, mtype: int, yiaddr: int, scope: ScopeRuntime | None,
               boot: BootAnswer | None, lease: bool, message: str | None = None) -> Reply:
        parts = [bytes((opt.MESSAGE_TYPE, 1, mtype, opt.SERVER_ID, 4)), iface.packed]
        file_field, siaddr = b"", 0
        if mtype == pk.NAK:
            if message:
                parts.append(opt.tlv(opt.MESSAGE, message.encode()[:255]))
        else:
            if lease and scope is not None:
                parts.append(scope.times)
            if boot is not None:
                parts.append(boot.options)
                file_field, siaddr = boot.file_field, boot.siaddr
        agent = msg.options.get(opt.RELAY_AGENT_INFO)
        if agent is not None and msg.giaddr:
            parts.append(opt.tlv(opt.RELAY_AGENT_INFO, agent))  # RFC 3046: echoed back unchanged
        flags = msg.flags
        ciaddr = msg.ciaddr if mtype == pk.ACK else 0
        arp = False
        if msg.giaddr:
            dest, port = msg.giaddr, SERVER_PORT
            if mtype == pk.NAK:
                flags |= pk.BROADCAST_FLAG
        elif mtype == pk.NAK:
            dest, port = BROADCAST, CLIENT_PORT
        elif msg.ciaddr:
            dest, port = msg.ciaddr, CLIENT_PORT
        elif msg.broadcast or not yiaddr:
            dest, port = BROADCAST, CLIENT_PORT
        else:
            dest, port, arp = yiaddr, CLIENT_PORT, True
        data = pk.build(msg, yiaddr, siaddr, ciaddr, flags, b"", file_field, b"".join(parts))
        if len(data) + 28 > MIN_MAX_MESSAGE and boot is not None:
            data = self._shrink(msg, data, parts, boot, yiaddr, siaddr, ciaddr, flags, file_field)
        self.counters["replied"] += 1
        return Reply(data, dest, port, arp, msg.hwaddr, iface)

    def _shrink(self, msg, data, parts, boot: BootAnswer, yiaddr, siaddr, ciaddr, flags, file_field) -> bytes:
        """A reply larger than the client can take (option 57, else 576 bytes, RFC 2131) keeps only the options
        it asked for (option 55) and the boot essentials."""
        raw = msg.options.get(opt.MAX_MESSAGE_SIZE)
        limit = max(MIN_MAX_MESSAGE, int.from_bytes(raw[:2], "big")) if raw and len(raw) >= 2 else MIN_MAX_MESSAGE
        if len(data) + 28 <= limit:  # the limit counts the IP and UDP headers
            return data
        wanted = set(msg.options.get(opt.PARAMETER_REQUEST_LIST, b"")) | ESSENTIAL
        body = b"".join(opt.tlv(code, value) for code, value in boot.option_map.items() if code in wanted)
        parts = [body if p is boot.options else p for p in parts]
        self.counters["shrunk"] += 1
        return pk.build(msg, yiaddr, siaddr, ciaddr, flags, b"", file_field, b"".join(parts))

    def _nak(self, msg, iface, scope, mac, ip, reason) -> Reply:
        self.counters["naks"] += 1
        self._events.append(ev.Nak(mac=mac, ip=ip_str(ip) if ip else None, reason=reason,
                                   scope=scope.name if scope else None))
        return self._reply(msg, iface, pk.NAK, 0, scope, None, False, reason)

    def _bind(self, scope: ScopeRuntime, msg: pk.Message, mac: str, ip: int, now: float, cls, boot: BootAnswer) -> None:
        leases = self.leases
        existing = leases.get(ip)
        # RENEWING/REBINDING (ciaddr, no server id) extends a lease; any other ACK starts one, also the ACK of a
        # PC that boots again with its old address: a boot timeline gets its "DHCP ack" each time
        renewed = (msg.ciaddr != 0 and opt.SERVER_ID not in msg.options and existing is not None
                   and existing.mac == mac and existing.state == BOUND and existing.expires > now)
        for other in list(leases.for_mac(mac)):
            if other.ip != ip and other.scope == scope.name and other.state == BOUND:
                leases.set_state(other, RELEASED, now, now)  # one address per client and scope
        res = scope.reservations.get(mac)
        hostname = res.hostname if res and res.hostname else None
        if hostname is None:
            hn = msg.options.get(opt.HOSTNAME)
            hostname = hn.decode("utf-8", "replace") if hn else None
        expires = now + scope.lease_time
        leases.put(Lease(ip, mac, msg.options.get(opt.CLIENT_ID), scope.name, BOUND, expires, hostname), now)
        self.offers.pop(ip, None)
        self.offer_of.pop((scope.name, mac), None)
        self.counters["acks"] += 1
        if renewed:
            self._events.append(ev.LeaseRenewed(mac=mac, ip=ip_str(ip), expires=expires))
        else:
            self._events.append(ev.LeaseGranted(
                mac=mac, ip=ip_str(ip), scope=scope.name, expires=expires, client_class=cls.label,
                bootfile=boot.bootfile, root_path=boot.root_path,
            ))

    # -- the protocol ----------------------------------------------------------------------------------------

    def handle(self, msg: pk.Message, iface: Interface, now: float) -> Reply | None:
        self.counters["received"] += 1
        mtype = msg.msg_type
        if msg.op != pk.BOOTREQUEST or msg.hlen == 0 or mtype not in (pk.DISCOVER, pk.REQUEST, pk.DECLINE, pk.RELEASE, pk.INFORM):
            self.counters["ignored"] += 1
            return None
        if self.instances > 1 and not msg.giaddr and not msg.ciaddr:
            # broadcasts reach every process: each answers its own share of clients (RFC 3074 split). A unicast
            # (relayed, renewing) reaches one process only, which answers whatever client it is from.
            key = msg.options.get(opt.CLIENT_ID) or msg.hwaddr
            if not serves(key, self.instance, self.instances):
                return None
        scope = self.scope_for(msg, iface)
        if scope is None:
            self.counters["ignored"] += 1
            return None
        mac = msg.mac
        if (scope.cfg.known_clients_only or self.config.boot.unknown == "ignore") and not self._known(scope, mac):
            self.counters["unknown_clients"] += 1
            if mtype == pk.DISCOVER:  # once per attempt, with what the PC says it is, so it shows up as `new`
                arch = identity.client_arch(msg.options)
                self._events.append(ev.UnknownClient(mac=mac, scope=scope.name, uuid=identity.client_uuid(msg.options),
                                                     firmware=identity.firmware(arch)))
            return None
        if mtype == pk.DISCOVER:
            self.counters["discovers"] += 1
            return self._discover(scope, msg, iface, mac, now)
        if mtype == pk.REQUEST:
            self.counters["requests"] += 1
            return self._request(scope, msg, iface, mac, now)
        if mtype == pk.DECLINE:
            return self._decline(scope, msg, iface, mac, now)
        if mtype == pk.RELEASE:
            return self._release(scope, msg, iface, mac, now)
        return self._inform(scope, msg, iface, mac)

    def _classify(self, msg) -> Classification:
        o = msg.options
        key = (o.get(opt.USER_CLASS), o.get(opt.VENDOR_CLASS), o.get(opt.CLIENT_ARCH), opt.IPXE_ENCAP in o)
        cls = self._classes_seen.get(key)
        if cls is None:  # a fleet has a handful of distinct kinds of client: classify each once
            cls = classify(o)
            if self.matcher.classes:
                cls.names = self.matcher.match(cls)
            if len(self._classes_seen) > 1024:
                self._classes_seen.clear()
            self._classes_seen[key] = cls
        return cls

    def _discover(self, scope, msg, iface, mac, now) -> Reply | None:
        cls = self._classify(msg)
        if cls.kind != "plain":
            o = msg.options
            self._events.append(ev.Discover(
                mac=mac, client_class=cls.label, arch=cls.arch, uuid=identity.client_uuid(o), nic=identity.client_nic(o),
                firmware=identity.firmware(cls.arch),
            ))
        ip = self._choose(scope, msg, mac, now)
        if ip is None:
            self.counters["exhausted"] += 1
            self._events.append(ev.PoolExhausted(mac=mac, scope=scope.name))
            return None
        self.offers[ip] = Offer(mac, now + self.offer_hold, scope.name)
        self.offer_of[(scope.name, mac)] = ip
        boot = self._boot(scope, cls, mac, iface)
        self.counters["offers"] += 1
        self._events.append(ev.LeaseOffered(mac=mac, ip=ip_str(ip), scope=scope.name, client_class=cls.label))
        return self._reply(msg, iface, pk.OFFER, ip, scope, boot, True)

    def _acceptable(self, scope, mac, ip, now) -> str | None:
        """None if `ip` may be bound to `mac` now, else the reason for a NAK (or _OTHER_SLICE: stay silent)."""
        if not scope.contains(ip):
            return f"{ip_str(ip)} is not in subnet {scope.cfg.subnet}"
        res = scope.reservations.get(mac)
        if res is not None and res.ip and ip_int(res.ip) != ip:
            return f"{mac} has the reserved address {res.ip}"
        # several processes share the table: the lease may have been written by another one
        lease = self.leases.refresh(ip) if self.instances > 1 else self.leases.get(ip)
        if lease is not None and lease.expires > now:
            if lease.state == DECLINED:
                return f"{ip_str(ip)} was declined and is quarantined"
            if lease.state == BOUND and lease.mac != mac:
                return f"{ip_str(ip)} is leased to another client"
        if lease is not None and lease.mac == mac and lease.state == BOUND:
            return None  # its own lease (a released or expired one must still be free: checked below)
        if self._offered_to(ip, mac, now):
            return None
        if res is not None and res.ip and ip_int(res.ip) == ip:
            return None
        if scope.pool.mine(ip) and self._is_free(scope, ip, mac, now):
            return None
        if ip in scope.pool:
            return _OTHER_SLICE if self.instances > 1 else f"{ip_str(ip)} is not available"
        return f"{ip_str(ip)} is not an address this server leases"

    def _request(self, scope, msg, iface, mac, now) -> Reply | None:
        sid = msg.options.get(opt.SERVER_ID)
        requested = msg.options.get(opt.REQUESTED_ADDRESS)
        req_ip = _U32.unpack(requested)[0] if requested is not None and len(requested) == 4 else 0
        if sid is not None:
            if sid != iface.packed:  # SELECTING another server's offer: withdraw ours
                self.counters["other_server"] += 1
                held = self.offer_of.pop((scope.name, mac), None)
                if held is not None:
                    self.offers.pop(held, None)
                return None
            ip = req_ip or msg.ciaddr
            if not ip:
                return self._nak(msg, iface, scope, mac, 0, "REQUEST carries neither option 50 nor ciaddr")
        elif req_ip and not msg.ciaddr:
            ip = req_ip  # INIT-REBOOT
        elif msg.ciaddr:
            ip = msg.ciaddr  # RENEWING (unicast) or REBINDING (broadcast)
        else:
            return self._nak(msg, iface, scope, mac, 0, "REQUEST carries neither option 50 nor ciaddr")
        reason = self._acceptable(scope, mac, ip, now)
        if reason is not None:
            if reason is _OTHER_SLICE:
                return None
            if sid is None and not self.authoritative:
                return None  # RFC 2131 4.3.2: a non-authoritative server stays silent for INIT-REBOOT/RENEWING
            return self._nak(msg, iface, scope, mac, ip, reason)
        cls = self._classify(msg)
        boot = self._boot(scope, cls, mac, iface)
        self._bind(scope, msg, mac, ip, now, cls, boot)
        return self._reply(msg, iface, pk.ACK, ip, scope, boot, True)

    def _decline(self, scope, msg, iface, mac, now) -> None:
        sid = msg.options.get(opt.SERVER_ID)
        if sid is not None and sid != iface.packed:
            return None
        requested = msg.options.get(opt.REQUESTED_ADDRESS)
        if requested is None or len(requested) != 4:
            self.counters["ignored"] += 1
            return None
        ip = _U32.unpack(requested)[0]
        lease = self.leases.get(ip)
        offered = self.offers.get(ip)
        if (lease is None or lease.mac != mac) and (offered is None or offered.mac != mac):
            self.counters["ignored"] += 1
            return None
        self.offers.pop(ip, None)
        self.offer_of.pop((scope.name, mac), None)
        until = now + self.decline_hold
        self.leases.put(Lease(ip, mac, None, scope.name, DECLINED, until, None), now)
        self.counters["declines"] += 1
        self._events.append(ev.LeaseDeclined(mac=mac, ip=ip_str(ip), until=until))
        return None

    def _release(self, scope, msg, iface, mac, now) -> None:
        sid = msg.options.get(opt.SERVER_ID)
        if sid is not None and sid != iface.packed:
            return None
        lease = self.leases.get(msg.ciaddr)
        if lease is None or lease.mac != mac or lease.state != BOUND:
            self.counters["ignored"] += 1
            return None
        self.leases.set_state(lease, RELEASED, now, now)
        self.counters["releases"] += 1
        self._events.append(ev.LeaseReleased(mac=mac, ip=ip_str(lease.ip)))
        return None

    def _inform(self, scope, msg, iface, mac) -> Reply:
        cls = self._classify(msg)
        boot = self._boot(scope, cls, mac, iface)
        self.counters["informs"] += 1
        return self._reply(msg, iface, pk.ACK, 0, scope, boot, False)

    # -- housekeeping ----------------------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Leases past their end become `expired`; quarantines end; stale offers go. Returns leases expired."""
        for ip, offer in list(self.offers.items()):
            if offer.until <= now:
                del self.offers[ip]
                if self.offer_of.get((offer.scope, offer.mac)) == ip:
                    del self.offer_of[(offer.scope, offer.mac)]
        count = 0
        for lease in self.leases.due(now):
            if lease.state == DECLINED:
                self.leases.delete(lease.ip)
                continue
            self.leases.set_state(lease, EXPIRED, lease.expires, now)
            self._events.append(ev.LeaseExpired(mac=lease.mac, ip=ip_str(lease.ip)))
            count += 1
        return count

    def release(self, mac: str, now: float) -> list[str]:
        """Operator's `bootfleet lease release MAC`: free the client's bound leases (the caller commits)."""
        freed = []
        for lease in list(self.leases.for_mac(mac)):
            if lease.state == BOUND:
                self.leases.set_state(lease, RELEASED, now, now)
                freed.append(ip_str(lease.ip))
                self._events.append(ev.LeaseReleased(mac=mac, ip=ip_str(lease.ip), by="operator"))
        return freed
