"""ProxyDHCP (`dhcp.mode: proxy`): the boot part of DHCP beside a site's own DHCP server, which hands out the
addresses. Sans-IO: a parsed request, the interface, the port it came to and the time in; a `Reply` or None
and events out.

What it answers (the PXE specification 2.1, "DHCP proxy"; read against iPXE's src/net/udp/dhcp.c and dnsmasq's
src/rfc2131.c, whose proxy mode sites already run):
- only PXE and iPXE clients: option 60 starting `PXEClient`, or option 77 `iPXE`/`gPXE` (or 175 present).
  Anything else gets nothing, whatever it asks: the site's server answers it.
- port 67, DHCPDISCOVER -> a ProxyDHCPOFFER: yiaddr 0, option 60 `PXEClient`, 54 our address, 97 echoed,
  siaddr + file + 67 (the loader, or iPXE's script), 17 root-path and 175 (keep-san, CHAP) for iPXE, and
  option 43 with PXE_DISCOVERY_CONTROL (sub-option 6) = 8: "skip boot server discovery, the boot file is in
  this offer" (plus an empty menu prompt, sub-option 10, as dnsmasq sends). Broadcast: the client has no
  address yet. iPXE takes an offer with siaddr and option 67 as complete ("pxe options": dhcp_has_pxeopts)
  and needs no port-4011 round trip; its DISCOVER state ends as soon as it holds the site's offer and ours
  (no 2 s ProxyDHCP wait, which it spends only when no ProxyDHCP offer came).
- UEFI PXE firmware (option 93 = 6, 7, 9), as dnsmasq does it: the offer on port 67 carries the boot file but
  no option 43, which EDK2's PxeBcDxe treats as a "BINL" proxy offer and confirms with a DHCPREQUEST to port
  4011 of our address; the 4011 ACK carries the file and option 43.
- port 4011, DHCPREQUEST (or DHCPINFORM) from a client that has its address (ciaddr) -> a DHCPACK with the
  same boot part (yiaddr 0), sent back to where the request came from.
- port 67, a DHCPREQUEST to another server (SELECTING, option 54 not ours): no answer; its option 50 is the
  address the site's server offered, reported (`dhcp.proxy.address`) so the controller maps TFTP and iSCSI
  events (by IP) to the PC. Never an OFFER with an address, never an ACK on port 67, never a NAK.

No leases: the per-PC state (`clients`, by MAC: last seen, address, UUID) is memory only and serves the
timeline and the chain-loop rule, which needs no state at all: iPXE is recognised by its option 77/175 and
gets the script, never the loader again.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from services.dhcp import events as ev
from services.dhcp import identity
from services.dhcp import options as opt
from services.dhcp import packet as pk
from services.dhcp.boot_answer import http_loader_url
from services.dhcp.classify import EFI_ARCHES, HTTP_CLIENT, Classification, ClassMatcher, classify, loader_for
from services.dhcp.core import BROADCAST, CLIENT_PORT, Interface, Reply
from services.dhcp.packet import ip_int, ip_str
from services.dhcp.scopes import merge_options
from services.dhcp.allocator import serves
from services.dhcp.boot_answer import ISCSI_INITIATOR_IQN
from shared.boot import assignment_for, chap_for, file_url, pc_initiator_iqn, root_path, target_for
from shared.events import Event

log = logging.getLogger("bootfleet.dhcp.proxy")

PXE_PORT = 4011
PXE_CLIENT = b"PXEClient"
# PXE spec 2.1 table 2-1: sub-option 6 PXE_DISCOVERY_CONTROL; bit 3 (8): if the boot file name is present,
# download it without boot server discovery. Sub-option 10 PXE_MENU_PROMPT: timeout 0 = no prompt.
DISCOVERY_CONTROL = 6
MENU_PROMPT = 10
PXEBS_SKIP = 8
VENDOR_OPTIONS = opt.tlv(43, bytes((DISCOVERY_CONTROL, 1, PXEBS_SKIP, MENU_PROMPT, 4, 0)) + b"PXE" + b"\xff")
CLIENT_TTL = 3600.0  # a PC not heard from for an hour is forgotten
MAX_CLIENTS = 65536
COUNTERS = ("received", "replied", "offers", "acks", "ignored", "not_pxe", "unknown_clients", "other_server")
_U32 = struct.Struct("!I")


@dataclass(slots=True)
class ProxyClient:
    """What the proxy remembers of a PC, by MAC, in memory only."""

    mac: str
    seen: float
    ip: str | None = None
    uuid: str | None = None
    arch: int | None = None


class ProxyCore:
    """The ProxyDHCP decisions; the I/O loop calls `handle` for port 67 and `handle_pxe` for port 4011."""

    mode = "proxy"

    def __init__(self, config, instance: int = 0, instances: int = 1):
        self.instance = instance
        self.instances = instances
        self._events: list[Event] = []
        self.clients: dict[str, ProxyClient] = {}
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.apply(config)

    def apply(self, config) -> None:
        self.config = config
        if config.dhcp.scopes:
            log.info("dhcp.mode is proxy: dhcp.scopes (%s) are not used; the site's DHCP server leases the addresses",
                     ", ".join(sc.name for sc in config.dhcp.scopes))
        self.classes = {c.name: c for c in config.dhcp.classes}
        self.matcher = ClassMatcher(config.dhcp.classes)
        self._answers: dict[tuple, tuple[bytes, bytes, int, str | None, str | None]] = {}

    def take_events(self) -> list[Event]:
        events = self._events
        if events:
            self._events = []
        return events

    # -- the server-mode core's housekeeping interface: nothing is leased, so nothing expires ---------------

    def expire(self, now: float) -> int:
        if len(self.clients) > MAX_CLIENTS // 2:
            for mac in [m for m, c in self.clients.items() if now - c.seen > CLIENT_TTL]:
                del self.clients[mac]
        return 0

    def release(self, mac: str, now: float) -> list[str]:
        return []  # no leases to free: the site's DHCP server holds them

    # -- requests --------------------------------------------------------------------------------------------

    def handle(self, msg: pk.Message, iface: Interface, now: float) -> Reply | None:
        """A datagram to port 67."""
        return self._handle(msg, iface, now, None)

    def handle_pxe(self, msg: pk.Message, iface: Interface, now: float, source: tuple[int, int]) -> Reply | None:
        """A datagram to port 4011 from `source` (address, port) as an integer and a port."""
        return self._handle(msg, iface, now, source)

    def _handle(self, msg, iface, now, source) -> Reply | None:
        self.counters["received"] += 1
        mtype = msg.msg_type
        if msg.op != pk.BOOTREQUEST or msg.hlen == 0 or msg.giaddr:
            # relayed ProxyDHCP (a relay that forwards to us as well) is not done: the offer would have to go
            # back through the relay; say so by counting it
            self.counters["ignored"] += 1
            return None
        if source is None and self.instances > 1:
            # a broadcast reaches every process: each answers its share of the PCs (RFC 3074), as in server mode
            if not serves(msg.options.get(opt.CLIENT_ID) or msg.hwaddr, self.instance, self.instances):
                return None
        cls = self._classify(msg)
        if cls.kind == "plain" or (cls.kind == "pxe" and not cls.vendor_class.startswith(PXE_CLIENT)):
            self.counters["not_pxe"] += 1
            return None
        mac = msg.mac
        if source is None:
            if mtype == pk.DISCOVER:
                return self._offer(msg, iface, now, cls, mac)
            if mtype == pk.REQUEST:
                self._observe_request(msg, iface, now, mac)
            self.counters["ignored"] += 1
            return None
        if mtype in (pk.REQUEST, pk.INFORM):
            return self._ack(msg, iface, now, cls, mac, source)
        self.counters["ignored"] += 1
        return None

    def _classify(self, msg) -> Classification:
        cls = classify(msg.options)
        if self.matcher.classes:
            cls.names = self.matcher.match(cls)
        return cls

    def _client(self, msg, mac: str, now: float, arch: int | None) -> ProxyClient:
        c = self.clients.get(mac)
        if c is None:
            if len(self.clients) >= MAX_CLIENTS:
                self.expire(now)
                if len(self.clients) >= MAX_CLIENTS:
                    self.clients.clear()
            c = self.clients[mac] = ProxyClient(mac, now)
        c.seen = now
        c.uuid = identity.client_uuid(msg.options) or c.uuid
        if arch is not None:
            c.arch = arch
        return c

    def _turned_away(self, mac: str) -> bool:
        """`boot.unknown: ignore`: a MAC nobody configured gets nothing (it still shows up as `new`)."""
        if self.config.boot.unknown != "ignore" or assignment_for(self.config, mac) is not None:
            return False
        self.counters["unknown_clients"] += 1
        return True

    def _offer(self, msg, iface, now, cls, mac) -> Reply | None:
        o = msg.options
        client = self._client(msg, mac, now, cls.arch)
        uuid, nic = client.uuid, identity.client_nic(o)
        fw = identity.firmware(cls.arch)  # iPXE sends 93 too: bios or uefi, whichever stage asks
        self._events.append(ev.Discover(mac=mac, client_class=cls.label, arch=cls.arch, uuid=uuid, nic=nic,
                                        firmware=fw, mode="proxy"))
        if self._turned_away(mac):
            self._events.append(ev.UnknownClient(mac=mac, scope="proxy", uuid=uuid, firmware=fw))
            return None
        # UEFI's own PXE is asked to confirm on port 4011 (option 43 left out: EDK2's "BINL" offer)
        to_4011 = cls.kind == "pxe" and cls.arch in EFI_ARCHES
        # UEFI HTTP boot: no PXE discovery control (43); option 60 says HTTPClient
        options, file_field, siaddr, bootfile, rpath = self._answer(cls, mac, iface,
                                                                    vendor=not to_4011 and cls.kind != "http")
        if cls.kind == "http" and not bootfile:
            self.counters["ignored"] += 1  # http.enabled off: nothing to hand it (logged by http_loader_url)
            return None
        self.counters["offers"] += 1
        self._events.append(ev.ProxyOffered(mac=mac, client_class=cls.label, bootfile=bootfile, root_path=rpath,
                                            confirm_on_4011=to_4011))
        return self._reply(msg, iface, pk.OFFER, options, file_field, siaddr, BROADCAST, CLIENT_PORT)

    def _ack(self, msg, iface, now, cls, mac, source) -> Reply | None:
        sid = msg.options.get(opt.SERVER_ID)
        if sid is not None and sid != iface.packed:
            self.counters["other_server"] += 1
            return None
        client = self._client(msg, mac, now, cls.arch)
        if msg.ciaddr:
            self._learn_address(client, msg.ciaddr)
        if self._turned_away(mac):
            return None
        options, file_field, siaddr, bootfile, rpath = self._answer(cls, mac, iface, vendor=cls.kind != "http")
        self.counters["acks"] += 1
        ip = ip_str(msg.ciaddr) if msg.ciaddr else None
        self._events.append(ev.ProxyAck(mac=mac, ip=ip, client_class=cls.label, bootfile=bootfile, root_path=rpath))
        src_ip, src_port = source
        dest = src_ip or msg.ciaddr or BROADCAST
        return self._reply(msg, iface, pk.ACK, options, file_field, siaddr, dest, src_port or CLIENT_PORT)

    def _observe_request(self, msg, iface, now, mac) -> None:
        """A REQUEST on port 67 is for the site's server: its option 50 tells the PC's address."""
        sid = msg.options.get(opt.SERVER_ID)
        if sid is not None and sid == iface.packed:
            return  # a client asking us for an address: we have none to give
        requested = msg.options.get(opt.REQUESTED_ADDRESS)
        ip = _U32.unpack(requested)[0] if requested is not None and len(requested) == 4 else msg.ciaddr
        if ip:
            self.counters["other_server"] += 1
            self._learn_address(self._client(msg, mac, now, None), ip)

    def _learn_address(self, client: ProxyClient, ip: int) -> None:
        text = ip_str(ip)
        if client.ip != text:
            client.ip = text
            self._events.append(ev.ProxyAddress(mac=client.mac, ip=text))

    # -- the answer ------------------------------------------------------------------------------------------

    def _answer(self, cls: Classification, mac: str, iface: Interface, vendor: bool):
        """(option bytes after 53/54, file field, siaddr, bootfile, root-path), cached per distinct answer."""
        assigned = cls.kind == "ipxe" and assignment_for(self.config, mac) is not None
        key = (cls.kind, cls.arch, cls.names, iface.address, vendor, mac if cls.kind == "ipxe" else None, assigned)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._build(cls, mac, iface, vendor)
            if len(self._answers) > 4096:
                self._answers.clear()
            self._answers[key] = answer
        return answer

    def _build(self, cls: Classification, mac: str, iface: Interface, vendor: bool):
        config = self.config
        server_ip = ip_str(iface.address)
        server = ip_int(config.boot.server) if config.boot.server else iface.address
        merged: dict[int, bytes] = {}
        rpath = None
        if cls.kind == "pxe":
            bootfile = loader_for(cls.arch, config.boot.loaders)
        elif cls.kind == "http":
            bootfile = http_loader_url(config, ip_str(server))
        else:
            # the script named for this PC: TFTP renders it per MAC without waiting to learn the PC's address
            bootfile = _script_for(config, server_ip, mac)
            rpath = root_path(config, server_ip, mac)
            if rpath:
                merged[opt.ROOT_PATH] = rpath.encode()
            client = assignment_for(config, mac)
            if client is not None and client.image:  # its own initiator name, as the DHCP server's answer
                merged[ISCSI_INITIATOR_IQN] = pc_initiator_iqn(config, client).encode()
            subs = {opt.IPXE_KEEP_SAN: b"\x01" if config.boot.keep_san else b"\x00"}
            target = target_for(config, mac)
            creds = chap_for(config, target[0]) if target else None
            if creds:
                subs[190], subs[191] = creds[0].encode(), creds[1].encode()
            merged[opt.IPXE_ENCAP] = opt.join_suboptions(subs)
        next_server = None
        for name in cls.names:
            c = self.classes[name]
            merge_options(merged, c.options)
            if c.bootfile:
                bootfile = c.bootfile
            if c.next_server:
                next_server = c.next_server
        hand = merged.pop(opt.BOOTFILE_NAME, None)
        if hand is not None:
            bootfile = hand.decode("utf-8", "replace")
        if opt.ROOT_PATH in merged:
            rpath = merged[opt.ROOT_PATH].decode("utf-8", "replace")
        siaddr = (ip_int(next_server) if next_server else server) if bootfile else 0
        parts = [opt.tlv(opt.VENDOR_CLASS, HTTP_CLIENT if cls.kind == "http" else PXE_CLIENT)]
        if vendor:
            parts.append(VENDOR_OPTIONS)
        if bootfile:
            parts.append(opt.tlv(opt.BOOTFILE_NAME, bootfile.encode()[:255]))
        parts.extend(opt.tlv(code, data) for code, data in merged.items())
        file_field = bootfile.encode() if bootfile and len(bootfile.encode()) < 128 else b""
        return b"".join(parts), file_field, siaddr, bootfile, rpath

    def _reply(self, msg, iface, mtype, options, file_field, siaddr, dest, port) -> Reply:
        parts = [bytes((opt.MESSAGE_TYPE, 1, mtype, opt.SERVER_ID, 4)), iface.packed, options]
        uuid = msg.options.get(identity.CLIENT_UUID)
        if uuid is not None:
            parts.append(opt.tlv(identity.CLIENT_UUID, uuid))  # PXE spec: a proxy echoes the client's 97
        flags = msg.flags | (pk.BROADCAST_FLAG if dest == BROADCAST else 0)
        data = pk.build(msg, 0, siaddr, 0, flags, b"", file_field, b"".join(parts))
        self.counters["replied"] += 1
        return Reply(data, dest, port, False, msg.hwaddr, iface)


def _script_for(config, server_ip: str, mac: str) -> str:
    """The iPXE stage's boot file: `<script>-<mac>` (dynamic.py renders that name for that MAC), over TFTP,
    or its http:// URL with `boot.transport: http`."""
    name = f"{config.boot.script}-{mac.replace(':', '-')}"
    if config.boot.transport == "http":
        return file_url(config, server_ip, name)
    return name


class NoLeases:
    """The I/O loop's store in proxy mode: there is nothing to commit, load or checkpoint."""

    path = None
    by_ip: dict = {}
    commits = 0

    def commit(self) -> None:
        pass

    def load(self) -> None:
        pass

    def checkpoint(self) -> None:
        pass

    def close(self) -> None:
        pass
