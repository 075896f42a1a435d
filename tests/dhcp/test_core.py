"""The sans-IO decision core: requests in, replies, lease writes and events out (RFC 2131 states, boot answers).

The core is given an in-memory lease table: no database file."""

from __future__ import annotations

import socket
import struct
import weakref

import pytest

from services.dhcp import options as opt
from services.dhcp import packet as pk
from services.dhcp.allocator import serves
from services.dhcp.core import BROADCAST, DhcpCore, Interface
from services.dhcp.lease_table import MemoryLeaseTable
from services.dhcp.packet import ip_int
from shared.config.loader import config_from_dict

T0 = 1_800_000_000.0
IFACE = Interface("eth0", ip_int("10.0.0.1"))
RELAY = ip_int("10.9.0.1")


def base_config(**dhcp):
    d = {
        "interfaces": [{"name": "eth0"}],
        "options": {"domain-name-servers": ["10.0.0.53"], "domain-name": "global.lan", "ntp-servers": ["10.0.0.123"]},
        "classes": [
            {"name": "gPXE", "user_class": "gPXE", "options": {67: "script.gpxe", 17: "iscsi:10.0.0.1::::iqn.2026-11.org.x:seed"}},
            {"name": "efi-extra", "arch": [7], "options": {"domain-name": "class.lan"}},
        ],
        "scopes": [
            {
                "name": "lan", "subnet": "10.0.0.0/24", "interface": "eth0",
                "ranges": [{"start": "10.0.0.100", "end": "10.0.0.103"}],
                "lease_time": 600,
                "options": {"routers": "10.0.0.1", "domain-name": "scope.lan"},
                "reservations": [
                    {"mac": "02:00:00:00:00:aa", "ip": "10.0.0.10", "hostname": "pc-aa", "target": "iqn.2026-11.org.x:aa",
                     "bootfile": "aa.ipxe", "options": {"domain-name": "host.lan"}},
                ],
            },
            {"name": "relayed", "subnet": "10.9.0.0/24", "ranges": [{"start": "10.9.0.50", "end": "10.9.0.51"}],
             "boot_target": "iqn.2026-11.org.x:relayed"},
        ],
    }
    d.update(dhcp)
    return config_from_dict({
        "boot": {"server": "10.0.0.1", "default_target": "iqn.2026-11.org.x:default"},
        "clients": [{"mac": "02:00:00:00:00:bb", "target": "iqn.2026-11.org.x:bb", "lun": 2}],
        "dhcp": d,
    })


@pytest.fixture
def srv():
    return DhcpCore(base_config(), MemoryLeaseTable())


def mac_of(n: int) -> bytes:
    return bytes((2, 0, 0, 0, 0, n))


def send(server, mtype, mac, now=T0, iface=IFACE, **kw):
    reply = server.handle(pk.parse(pk.build_request(mtype, mac, **kw)), iface, now)
    server.leases.commit()
    return reply, (pk.parse(reply.data) if reply else None)


def u32(ip: str) -> bytes:
    return socket.inet_aton(ip)


def dora(server, mac, now=T0, options=None, **kw):
    r, offer = send(server, pk.DISCOVER, mac, now, options=dict(options or {}), **kw)
    assert offer.msg_type == pk.OFFER
    req = dict(options or {})
    req.update({opt.SERVER_ID: u32("10.0.0.1"), opt.REQUESTED_ADDRESS: struct.pack("!I", offer.yiaddr)})
    r, ack = send(server, pk.REQUEST, mac, now, options=req, **kw)
    assert ack.msg_type == pk.ACK, ack.options.get(opt.MESSAGE)
    return offer, ack, r


_TAKEN = weakref.WeakKeyDictionary()  # core -> every event it has handed out so far


def events(server, kind):
    """The wire fields of the events of type `kind` the core has handed out (take_events) so far."""
    taken = _TAKEN.setdefault(server, [])
    taken.extend(server.take_events())
    return [e.fields() for e in taken if e.type == kind]


# -- the four-way exchange and its destinations ---------------------------------------------------------------

def test_discover_offer_request_ack(srv):
    offer, ack, reply = dora(srv, mac_of(1), flags=pk.BROADCAST_FLAG)
    assert offer.yiaddr == ack.yiaddr == ip_int("10.0.0.100")
    assert ack.options[opt.SERVER_ID] == u32("10.0.0.1")
    assert struct.unpack("!I", ack.options[opt.LEASE_TIME])[0] == 600
    assert struct.unpack("!I", ack.options[opt.RENEWAL_TIME])[0] == 300
    assert struct.unpack("!I", ack.options[opt.REBINDING_TIME])[0] == 525
    assert ack.options[opt.SUBNET_MASK] == u32("255.255.255.0")
    assert ack.options[28] == u32("10.0.0.255")
    assert reply.dest == BROADCAST and reply.port == 68 and not reply.arp
    lease = srv.leases.get(ip_int("10.0.0.100"))
    assert lease.mac == "02:00:00:00:00:01" and lease.expires == T0 + 600
    assert events(srv, "dhcp.lease.offered")[0]["ip"] == "10.0.0.100"
    granted = events(srv, "dhcp.lease.granted")[0]
    assert granted["mac"] == "02:00:00:00:00:01" and granted["client_class"] == "plain"


def test_unicast_to_yiaddr_with_arp_when_broadcast_flag_clear(srv):
    reply, offer = send(srv, pk.DISCOVER, mac_of(1))
    assert reply.arp and reply.dest == offer.yiaddr and reply.hwaddr == mac_of(1)


def test_same_client_gets_same_offer_and_lease(srv):
    _, first = send(srv, pk.DISCOVER, mac_of(1))
    _, again = send(srv, pk.DISCOVER, mac_of(1))
    _, other = send(srv, pk.DISCOVER, mac_of(2))
    assert first.yiaddr == again.yiaddr != other.yiaddr


def test_request_for_another_servers_offer_withdraws_ours(srv):
    _, offer = send(srv, pk.DISCOVER, mac_of(1))
    reply, _ = send(srv, pk.REQUEST, mac_of(1), options={opt.SERVER_ID: u32("10.0.0.99"), opt.REQUESTED_ADDRESS: struct.pack("!I", offer.yiaddr)})
    assert reply is None
    assert offer.yiaddr not in srv.offers
    offered = {send(srv, pk.DISCOVER, mac_of(n))[1].yiaddr for n in range(2, 6)}
    assert offer.yiaddr in offered  # free again: four other clients fill the pool of four


def test_selecting_an_address_held_by_another_is_naked(srv):
    _, ack1, _ = dora(srv, mac_of(1))
    reply, nak = send(srv, pk.REQUEST, mac_of(2), options={opt.SERVER_ID: u32("10.0.0.1"), opt.REQUESTED_ADDRESS: struct.pack("!I", ack1.yiaddr)})
    assert nak.msg_type == pk.NAK and reply.dest == BROADCAST
    assert b"leased to another client" in nak.options[opt.MESSAGE]
    assert events(srv, "dhcp.nak")[0]["reason"].endswith("is leased to another client")


def test_init_reboot(srv):
    _, ack, _ = dora(srv, mac_of(1))
    ip = struct.pack("!I", ack.yiaddr)
    _, again = send(srv, pk.REQUEST, mac_of(1), now=T0 + 10, options={opt.REQUESTED_ADDRESS: ip})
    assert again.msg_type == pk.ACK and again.yiaddr == ack.yiaddr
    assert len(events(srv, "dhcp.lease.granted")) == 2 and not events(srv, "dhcp.lease.renewed")  # a new boot
    _, nak = send(srv, pk.REQUEST, mac_of(2), options={opt.REQUESTED_ADDRESS: ip})
    assert nak.msg_type == pk.NAK
    _, nak = send(srv, pk.REQUEST, mac_of(3), options={opt.REQUESTED_ADDRESS: u32("192.168.5.5")})
    assert nak.msg_type == pk.NAK and b"not in subnet" in nak.options[opt.MESSAGE]
    # a free pool address the client remembers (lease store lost, say): granted
    _, ok = send(srv, pk.REQUEST, mac_of(4), options={opt.REQUESTED_ADDRESS: u32("10.0.0.103")})
    assert ok.msg_type == pk.ACK and ok.yiaddr == ip_int("10.0.0.103")


def test_init_reboot_non_authoritative_stays_silent():
    server = DhcpCore(base_config(authoritative=False), MemoryLeaseTable())
    reply, _ = send(server, pk.REQUEST, mac_of(3), options={opt.REQUESTED_ADDRESS: u32("192.168.5.5")})
    assert reply is None


def test_renewing_and_rebinding(srv):
    _, ack, _ = dora(srv, mac_of(1))
    reply, renew = send(srv, pk.REQUEST, mac_of(1), now=T0 + 300, ciaddr=ack.yiaddr)
    assert renew.msg_type == pk.ACK and renew.ciaddr == ack.yiaddr
    assert reply.dest == ack.yiaddr and reply.port == 68 and not reply.arp  # unicast to ciaddr
    assert srv.leases.get(ack.yiaddr).expires == T0 + 300 + 600
    assert events(srv, "dhcp.lease.renewed")[-1]["ip"] == "10.0.0.100"
    reply, rebind = send(srv, pk.REQUEST, mac_of(1), now=T0 + 560, ciaddr=ack.yiaddr, flags=pk.BROADCAST_FLAG)
    assert rebind.msg_type == pk.ACK
    reply, nak = send(srv, pk.REQUEST, mac_of(2), now=T0 + 560, ciaddr=ack.yiaddr)
    assert nak.msg_type == pk.NAK


def test_release_then_returning_client_gets_its_address_back(srv):
    _, ack, _ = dora(srv, mac_of(1))
    reply, _ = send(srv, pk.RELEASE, mac_of(1), ciaddr=ack.yiaddr, options={opt.SERVER_ID: u32("10.0.0.1")})
    assert reply is None
    assert srv.leases.get(ack.yiaddr).state == "released"
    assert events(srv, "dhcp.lease.released") == [{"mac": "02:00:00:00:00:01", "ip": "10.0.0.100"}]
    _, offer = send(srv, pk.DISCOVER, mac_of(1), now=T0 + 5)
    assert offer.yiaddr == ack.yiaddr


def test_release_by_another_client_is_ignored(srv):
    _, ack, _ = dora(srv, mac_of(1))
    send(srv, pk.RELEASE, mac_of(2), ciaddr=ack.yiaddr)
    assert srv.leases.get(ack.yiaddr).state == "bound"


def test_decline_quarantines_the_address(srv):
    _, ack, _ = dora(srv, mac_of(1))
    send(srv, pk.DECLINE, mac_of(1), options={opt.REQUESTED_ADDRESS: struct.pack("!I", ack.yiaddr), opt.SERVER_ID: u32("10.0.0.1")})
    assert srv.leases.get(ack.yiaddr).state == "declined"
    assert events(srv, "dhcp.lease.declined")[0]["ip"] == "10.0.0.100"
    _, offer = send(srv, pk.DISCOVER, mac_of(1), now=T0 + 1)
    assert offer.yiaddr != ack.yiaddr
    srv.expire(T0 + 86400 + 1)
    srv.leases.commit()
    assert srv.leases.get(ack.yiaddr) is None  # quarantine over


def test_inform_gets_options_but_no_lease(srv):
    reply, ack = send(srv, pk.INFORM, mac_of(7), ciaddr=ip_int("10.0.0.77"))
    assert ack.msg_type == pk.ACK and ack.yiaddr == 0
    assert opt.LEASE_TIME not in ack.options and ack.options[opt.ROUTERS] == u32("10.0.0.1")
    assert reply.dest == ip_int("10.0.0.77") and reply.port == 68
    assert srv.leases.by_ip == {}


def test_expiry_emits_events(srv):
    _, ack, _ = dora(srv, mac_of(1))
    assert srv.expire(T0 + 599) == 0
    assert srv.expire(T0 + 601) == 1
    assert srv.leases.get(ack.yiaddr).state == "expired"
    assert events(srv, "dhcp.lease.expired") == [{"mac": "02:00:00:00:00:01", "ip": "10.0.0.100"}]


def test_exhausted_pool_no_offer_and_event(srv):
    for n in range(1, 5):
        dora(srv, mac_of(n))
    reply, _ = send(srv, pk.DISCOVER, mac_of(9))
    assert reply is None
    assert events(srv, "dhcp.pool_exhausted") == [{"mac": "02:00:00:00:00:09", "scope": "lan"}]
    # expired leases come back to the pool
    srv.expire(T0 + 700)
    _, offer = send(srv, pk.DISCOVER, mac_of(9), now=T0 + 700)
    assert offer is not None


def test_offer_hold_expires(srv):
    for n in range(1, 5):
        send(srv, pk.DISCOVER, mac_of(n))
    assert send(srv, pk.DISCOVER, mac_of(9))[0] is None
    assert send(srv, pk.DISCOVER, mac_of(9), now=T0 + 31)[1] is not None


# -- relays -------------------------------------------------------------------------------------------------

def test_relayed_request_goes_back_to_the_relay_with_option_82(srv):
    agent = b"\x01\x04eth7\x02\x03sw1"
    reply, offer = send(srv, pk.DISCOVER, mac_of(1), giaddr=RELAY, hops=1, options={opt.RELAY_AGENT_INFO: agent})
    assert reply.dest == RELAY and reply.port == 67
    assert offer.giaddr == RELAY and offer.hops == 1
    assert offer.yiaddr == ip_int("10.9.0.50")
    assert offer.options[opt.RELAY_AGENT_INFO] == agent
    reply, nak = send(srv, pk.REQUEST, mac_of(1), giaddr=RELAY, options={opt.REQUESTED_ADDRESS: u32("10.0.0.100")})
    assert nak.msg_type == pk.NAK and nak.flags & pk.BROADCAST_FLAG and reply.dest == RELAY


def test_option_82_not_echoed_without_relay(srv):
    _, offer = send(srv, pk.DISCOVER, mac_of(1), options={opt.RELAY_AGENT_INFO: b"\x01\x01x"})
    assert opt.RELAY_AGENT_INFO not in offer.options


def test_unknown_relay_subnet_is_ignored(srv):
    assert send(srv, pk.DISCOVER, mac_of(1), giaddr=ip_int("172.16.0.1"))[0] is None


def test_other_interface_is_ignored(srv):
    assert send(srv, pk.DISCOVER, mac_of(1), iface=Interface("eth9", ip_int("10.5.0.1")))[0] is None


# -- boot answers -------------------------------------------------------------------------------------------

PXE_BIOS = {opt.VENDOR_CLASS: b"PXEClient:Arch:00000:UNDI:002001", opt.CLIENT_ARCH: b"\x00\x00"}
PXE_EFI = {opt.VENDOR_CLASS: b"PXEClient:Arch:00007:UNDI:003016", opt.CLIENT_ARCH: b"\x00\x07"}
IPXE = {opt.USER_CLASS: b"iPXE", opt.IPXE_ENCAP: b"\x13\x01\x01", opt.CLIENT_ARCH: b"\x00\x00"}


def boot_of(msg):
    return (
        msg.file.rstrip(b"\0").decode() or None,
        socket.inet_ntoa(struct.pack("!I", msg.siaddr)) if msg.siaddr else None,
        msg.options[opt.ROOT_PATH].decode() if opt.ROOT_PATH in msg.options else None,
    )


def test_pxe_bios_and_efi_get_their_loader(srv):
    _, bios = send(srv, pk.DISCOVER, mac_of(1), options=PXE_BIOS)
    _, efi = send(srv, pk.DISCOVER, mac_of(2), options=PXE_EFI)
    assert boot_of(bios) == ("undionly.kpxe", "10.0.0.1", None)
    assert boot_of(efi) == ("snponly.efi", "10.0.0.1", None)
    assert bios.options[opt.BOOTFILE_NAME] == b"undionly.kpxe"


def test_loader_is_decided_on_option_93_not_option_60(srv):
    _, efi = send(srv, pk.DISCOVER, mac_of(1), options={opt.VENDOR_CLASS: b"PXEClient:Arch:00000:UNDI:002001", opt.CLIENT_ARCH: b"\x00\x09"})
    assert boot_of(efi)[0] == "snponly.efi"


def test_ipxe_gets_script_and_root_path(srv):
    _, ipxe = send(srv, pk.DISCOVER, mac_of(1), options=IPXE)
    assert boot_of(ipxe) == ("boot.ipxe", "10.0.0.1", "iscsi:10.0.0.1::::iqn.2026-11.org.x:default")
    subs = opt.parse_suboptions(ipxe.options[opt.IPXE_ENCAP])
    assert subs[opt.IPXE_NO_PXEDHCP] == b"\x01" and subs[opt.IPXE_KEEP_SAN] == b"\x01"
    # the client's assignment in clients[] (with its LUN)
    _, bb = send(srv, pk.DISCOVER, bytes.fromhex("0200000000bb"), options=IPXE)
    assert boot_of(bb)[2] == "iscsi:10.0.0.1:::2:iqn.2026-11.org.x:bb"
    # a relayed scope's own default target
    _, rel = send(srv, pk.DISCOVER, mac_of(3), giaddr=RELAY, options=IPXE)
    assert boot_of(rel)[2] == "iscsi:10.0.0.1::::iqn.2026-11.org.x:relayed"


def test_option_175_alone_means_ipxe(srv):
    _, msg = send(srv, pk.DISCOVER, mac_of(1), options={opt.IPXE_ENCAP: b"\x13\x01\x01", opt.CLIENT_ARCH: b"\x00\x00"})
    assert boot_of(msg)[0] == "boot.ipxe"


@pytest.mark.parametrize("user_class", [b"gPXE", b"\x04gPXE", b"\x03foo\x04gPXE"])
def test_seed_gpxe_class_in_both_option_77_forms(srv, user_class):
    _, msg = send(srv, pk.DISCOVER, mac_of(1), options={opt.USER_CLASS: user_class})
    assert boot_of(msg) == ("script.gpxe", "10.0.0.1", "iscsi:10.0.0.1::::iqn.2026-11.org.x:seed")
    assert msg.options[opt.BOOTFILE_NAME] == b"script.gpxe"


def test_ipxe_rfc3004_form_is_not_sent_the_loader_again(srv):
    _, msg = send(srv, pk.DISCOVER, mac_of(1), options={opt.USER_CLASS: b"\x04iPXE", opt.CLIENT_ARCH: b"\x00\x00"})
    assert boot_of(msg)[0] == "boot.ipxe"


def test_plain_client_gets_no_boot_fields(srv):
    _, msg = send(srv, pk.DISCOVER, mac_of(1))
    assert boot_of(msg) == (None, None, None)
    assert opt.BOOTFILE_NAME not in msg.options


def test_reservation_address_target_bootfile_and_options(srv):
    mac = bytes.fromhex("0200000000aa")
    _, msg = send(srv, pk.DISCOVER, mac, options=IPXE)
    assert msg.yiaddr == ip_int("10.0.0.10")
    assert boot_of(msg) == ("aa.ipxe", "10.0.0.1", "iscsi:10.0.0.1::::iqn.2026-11.org.x:aa")
    assert msg.options[opt.HOSTNAME] == b"pc-aa"
    # the reserved address is never offered to anyone else
    for n in range(1, 5):
        assert send(srv, pk.DISCOVER, mac_of(n))[1].yiaddr != ip_int("10.0.0.10")


def test_option_precedence_global_scope_class_host(srv):
    _, plain = send(srv, pk.DISCOVER, mac_of(1))
    assert plain.options[15] == b"scope.lan"  # scope beats global
    assert plain.options[42] == u32("10.0.0.123")  # global still there
    _, efi = send(srv, pk.DISCOVER, mac_of(2), options=PXE_EFI)
    assert efi.options[15] == b"class.lan"  # class beats scope
    _, host = send(srv, pk.DISCOVER, bytes.fromhex("0200000000aa"), options=PXE_EFI)
    assert host.options[15] == b"host.lan"  # host beats class


def test_chap_credentials_and_initiator_iqn_options():
    cfg = base_config(options={
        "ipxe-encap": {"username": "user1", "password": "secret1"},
        "iscsi-initiator-iqn": "iqn.2026-11.org.x:init",
        150: {"type": "ips", "value": ["10.0.0.1"]},
        224: "hex:01:02",
    })
    server = DhcpCore(cfg, MemoryLeaseTable())
    _, msg = send(server, pk.DISCOVER, mac_of(1), options=IPXE)
    subs = opt.parse_suboptions(msg.options[opt.IPXE_ENCAP])
    assert subs[190] == b"user1" and subs[191] == b"secret1" and subs[opt.IPXE_NO_PXEDHCP] == b"\x01"
    assert subs[opt.IPXE_KEEP_SAN] == b"\x01"  # built-in sub-options merged with the configured ones
    assert msg.options[203] == b"iqn.2026-11.org.x:init"
    assert msg.options[150] == u32("10.0.0.1") and msg.options[224] == b"\x01\x02"


def test_no_pxedhcp_can_be_turned_off():
    server = DhcpCore(base_config(no_pxedhcp=False), MemoryLeaseTable())
    _, msg = send(server, pk.DISCOVER, mac_of(1))
    assert opt.IPXE_ENCAP not in msg.options


def test_known_clients_only():
    cfg = base_config()
    cfg.dhcp.scopes[0].known_clients_only = True
    server = DhcpCore(cfg, MemoryLeaseTable())
    assert send(server, pk.DISCOVER, mac_of(1))[0] is None
    assert events(server, "dhcp.unknown_client") == [
        {"mac": "02:00:00:00:00:01", "scope": "lan", "uuid": None, "firmware": None}]
    assert send(server, pk.DISCOVER, bytes.fromhex("0200000000aa"))[1] is not None  # reservation
    assert send(server, pk.DISCOVER, bytes.fromhex("0200000000bb"))[1] is not None  # clients[]


def test_boot_unknown_ignore_is_known_clients_only_on_every_scope():
    cfg = base_config()
    cfg.boot.unknown = "ignore"
    server = DhcpCore(cfg, MemoryLeaseTable())
    uuid = bytes(range(16))
    assert send(server, pk.DISCOVER, mac_of(1), options={93: b"\0\x07", 97: b"\0" + uuid})[0] is None
    assert events(server, "dhcp.unknown_client") == [{"mac": "02:00:00:00:00:01", "scope": "lan", "firmware": "uefi",
                                                      "uuid": "03020100-0504-0706-0809-0a0b0c0d0e0f"}]
    assert send(server, pk.DISCOVER, bytes.fromhex("0200000000bb"))[1] is not None  # clients[]


def test_discover_event_carries_uuid_nic_and_firmware(srv):
    send(srv, pk.DISCOVER, mac_of(1), options={93: b"\0\0", 94: b"\x01\x02\x01", 97: b"\0" + bytes(range(16)),
                                                  60: b"PXEClient:Arch:00000:UNDI:002001"})
    (d,) = events(srv, "dhcp.discover")
    assert d["uuid"] == "03020100-0504-0706-0809-0a0b0c0d0e0f" and d["nic"] == "undi-2.1" and d["firmware"] == "bios"
    assert d["mode"] == "server"


def test_grant_event_has_boot_fields(srv):
    dora(srv, mac_of(1), options=IPXE)
    granted = events(srv, "dhcp.lease.granted")[0]
    assert granted["client_class"] == "ipxe" and granted["bootfile"] == "boot.ipxe"
    assert granted["root_path"] == "iscsi:10.0.0.1::::iqn.2026-11.org.x:default"


# -- several processes, restart -------------------------------------------------------------------------------

POOL = range(ip_int("10.0.0.100"), ip_int("10.0.0.103") + 1)


def test_two_instances_split_clients_and_pools():
    committed = {}  # the lease file both processes share
    cores = [DhcpCore(base_config(), MemoryLeaseTable(committed), instance=i, instances=2) for i in (0, 1)]
    slices = [{ip for ip in POOL if c.scopes[0].pool.mine(ip)} for c in cores]
    assert slices[0] and slices[1] and not slices[0] & slices[1] and slices[0] | slices[1] == set(POOL)
    offered: list[set[int]] = [set(), set()]
    turned_away = [0, 0]
    for n in range(1, 40):
        mac = mac_of(n)
        owner = 0 if serves(mac, 0, 2) else 1
        replies = [send(c, pk.DISCOVER, mac)[1] for c in cores]
        assert replies[1 - owner] is None  # a broadcast is answered by its hash owner only
        if len(offered[owner]) < len(slices[owner]):
            assert replies[owner].yiaddr in slices[owner] - offered[owner]  # a fresh address of its own slice
            offered[owner].add(replies[owner].yiaddr)
        else:
            assert replies[owner] is None  # its slice is full (offers are held 30 s)
            turned_away[owner] += 1
    assert offered == slices  # each filled its slice: never the same address from both
    assert [c.counters["exhausted"] for c in cores] == turned_away and all(turned_away)


def test_restart_keeps_committed_leases_only():
    committed = {}
    server = DhcpCore(base_config(), MemoryLeaseTable(committed))
    _, ack, _ = dora(server, mac_of(1))
    server.handle(pk.parse(pk.build_request(pk.DISCOVER, mac_of(3))), IFACE, T0)  # an offer: memory only
    server2 = DhcpCore(base_config(), MemoryLeaseTable(committed))  # as after kill -9
    assert {ack.yiaddr} == set(committed) == set(server2.leases.by_ip)
    _, offer = send(server2, pk.DISCOVER, mac_of(2))
    assert offer.yiaddr != ack.yiaddr
    _, again = send(server2, pk.DISCOVER, mac_of(1))
    assert again.yiaddr == ack.yiaddr


def test_operator_release(srv):
    _, ack, _ = dora(srv, mac_of(1))
    assert srv.release("02:00:00:00:00:01", T0 + 1) == ["10.0.0.100"]
    assert srv.leases.get(ack.yiaddr).state == "released"


def test_apply_keeps_leases_and_changes_options(srv):
    _, ack, _ = dora(srv, mac_of(1))
    cfg = base_config()
    cfg.dhcp.scopes[0].options = {"routers": "10.0.0.254"}
    srv.apply(cfg)
    _, renew = send(srv, pk.REQUEST, mac_of(1), ciaddr=ack.yiaddr)
    assert renew.msg_type == pk.ACK and renew.options[opt.ROUTERS] == u32("10.0.0.254")


def test_ignores_replies_and_unknown_types(srv):
    data = bytearray(pk.build_request(pk.DISCOVER, mac_of(1)))
    data[0] = pk.BOOTREPLY
    assert srv.handle(pk.parse(bytes(data)), IFACE, T0) is None
    assert srv.handle(pk.parse(pk.build_request(13, mac_of(1))), IFACE, T0) is None


def test_oversized_reply_keeps_requested_and_boot_options():
    cfg = base_config(options={f"{200 + i}": {"type": "string", "value": "x" * 60} for i in range(8)})
    server = DhcpCore(cfg, MemoryLeaseTable())
    _, small = send(server, pk.DISCOVER, mac_of(1), options={**IPXE, opt.PARAMETER_REQUEST_LIST: bytes([1, 3, 201])})
    assert len(small.options) and 201 in small.options and 202 not in small.options
    assert small.options[opt.ROOT_PATH] and opt.IPXE_ENCAP in small.options and opt.LEASE_TIME in small.options
    assert server.counters["shrunk"] == 1
    _, big = send(server, pk.DISCOVER, mac_of(2), options={**IPXE, opt.MAX_MESSAGE_SIZE: (1500).to_bytes(2, "big")})
    assert all(200 + i in big.options for i in range(8))


def test_init_reboot_to_a_released_address_now_offered_to_another_is_naked(srv):
    _, ack, _ = dora(srv, mac_of(1))
    send(srv, pk.RELEASE, mac_of(1), ciaddr=ack.yiaddr)
    # another client is offered the freed address (the pool walks on, so fill it)
    offered = {send(srv, pk.DISCOVER, mac_of(n))[1].yiaddr for n in range(2, 6)}
    assert ack.yiaddr in offered
    _, nak = send(srv, pk.REQUEST, mac_of(1), options={opt.REQUESTED_ADDRESS: struct.pack("!I", ack.yiaddr)})
    assert nak.msg_type == pk.NAK


def test_two_instances_unicast_reaches_either_process():
    """Relayed and renewing datagrams are unicast: the kernel hands them to one process, which must serve them
    using the shared table; the owner of the address re-reads it before reusing it."""
    committed = {}
    a = DhcpCore(base_config(), MemoryLeaseTable(committed), instance=0, instances=2)
    b = DhcpCore(base_config(), MemoryLeaseTable(committed), instance=1, instances=2)
    mac = next(m for m in map(mac_of, range(1, 60)) if serves(m, 0, 2))
    offer, ack, _ = dora(a, mac, now=T0)  # broadcast: only its hash owner (a) answers
    assert send(b, pk.DISCOVER, mac)[0] is None
    # the renewal reaches b: b reads the lease a wrote, extends it
    _, renew = send(b, pk.REQUEST, mac, now=T0 + 500, ciaddr=ack.yiaddr)
    assert renew.msg_type == pk.ACK
    # a's copy says the lease ended at T0 + 600; the table says T0 + 1100: a must not hand the address out,
    # only the rest of its slice, then nothing
    slice_a = {ip for ip in POOL if a.scopes[0].pool.mine(ip)}
    assert ack.yiaddr in slice_a
    others = [m for m in map(mac_of, range(60, 200)) if serves(m, 0, 2)]
    replies = [send(a, pk.DISCOVER, m, now=T0 + 700)[1] for m in others]
    free = len(slice_a) - 1
    assert {o.yiaddr for o in replies[:free]} == slice_a - {ack.yiaddr}
    assert replies[free:] == [None] * (len(others) - free) and a.counters["exhausted"] == len(others) - free
    # relayed DISCOVER of a client hashed to a, arriving at b: b answers from its own slice
    r, rel = send(b, pk.DISCOVER, mac_of(77), giaddr=RELAY)
    assert rel is not None and rel.msg_type == pk.OFFER


def test_global_option_67_yields_to_the_builtin_loader_but_not_to_a_class():
    server = DhcpCore(base_config(options={"boot-file-name": "pxelinux.0"}), MemoryLeaseTable())
    _, plain = send(server, pk.DISCOVER, mac_of(1))
    _, bios = send(server, pk.DISCOVER, mac_of(2), options=PXE_BIOS)
    _, gpxe = send(server, pk.DISCOVER, mac_of(3), options={opt.USER_CLASS: b"gPXE"})
    assert boot_of(plain)[0] == "pxelinux.0"
    assert boot_of(bios)[0] == "undionly.kpxe"
    assert boot_of(gpxe)[0] == "script.gpxe"
