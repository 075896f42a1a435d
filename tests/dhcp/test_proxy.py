"""ProxyDHCP decisions (services/dhcp/proxy.py), bytes in and bytes out: who gets an answer, what it carries
(never an address), port 67 against port 4011, and the events the controller's timeline reads."""

from __future__ import annotations

import struct

import pytest

from services.dhcp import options as opt
from services.dhcp import packet as pk
from services.dhcp.core import BROADCAST, Interface
from services.dhcp.packet import ip_int
from services.dhcp.proxy import PXE_PORT, ProxyCore
from shared.config.loader import config_from_dict

SERVER = "10.0.0.2"
IFACE = Interface("eth0", ip_int(SERVER))
SITE_DHCP = struct.pack("!I", ip_int("10.0.0.1"))
ASSIGNED = "02:00:00:00:00:bb"
UUID = bytes.fromhex("00112233445566778899aabbccddeeff")

BIOS_PXE = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00", 94: b"\x01\x02\x01", 97: b"\x00" + UUID}
UEFI_PXE = {60: b"PXEClient:Arch:00007:UNDI:003016", 93: b"\x00\x07", 94: b"\x01\x03\x10", 97: b"\x00" + UUID}
IPXE = {60: b"PXEClient:Arch:00000:UNDI:002001", 77: b"iPXE", 93: b"\x00\x00", 175: b"\x13\x01\x01"}
IPXE_NO_60 = {77: b"\x04iPXE"}  # iPXE built without the PXE vendor class, RFC 3004 form
PLAIN = {60: b"MSFT 5.0", 12: b"laptop"}


def config(**boot):
    return config_from_dict({
        "boot": {"server": SERVER, "default_target": "iqn.2026-11.org.x:default", **boot},
        "clients": [{"mac": ASSIGNED, "target": "iqn.2026-11.org.x:bb", "lun": 2}],
        "dhcp": {"mode": "proxy", "interfaces": [{"name": "eth0"}]},
    })


@pytest.fixture
def proxy():
    return ProxyCore(config())


def mac(n: int) -> bytes:
    return bytes.fromhex(f"0200000000{n:02x}")


def request(mtype, hw, options, ciaddr=0, flags=0):
    return pk.parse(pk.build_request(mtype, hw, xid=0xABCD, options=options, ciaddr=ciaddr, flags=flags))


def on_67(core, mtype, hw, options, **kw):
    reply = core.handle(request(mtype, hw, options, **kw), IFACE, 1000.0)
    return reply, (pk.parse(reply.data) if reply else None)


def on_4011(core, mtype, hw, options, ciaddr, source=None):
    src = source or (ciaddr, 68)
    reply = core.handle_pxe(request(mtype, hw, options, ciaddr=ciaddr), IFACE, 1000.0, src)
    return reply, (pk.parse(reply.data) if reply else None)


def vendor_suboptions(msg) -> dict[int, bytes]:
    data = msg.options[43]
    assert data.endswith(b"\xff")
    return opt.parse_suboptions(data[:-1])


def events(core, kind):
    return [e.fields() for e in core.take_events() if e.type == kind]


def test_bios_pxe_offer_is_the_boot_part_only(proxy):
    reply, msg = on_67(proxy, pk.DISCOVER, mac(1), BIOS_PXE)
    assert msg.op == pk.BOOTREPLY and msg.msg_type == pk.OFFER and msg.xid == 0xABCD
    assert msg.yiaddr == 0 and msg.ciaddr == 0  # no address, ever
    assert msg.options[60] == b"PXEClient" and msg.options[54] == IFACE.packed
    assert msg.siaddr == ip_int(SERVER) and msg.file.rstrip(b"\0") == b"undionly.kpxe"
    assert msg.options[67] == b"undionly.kpxe"
    assert msg.options[97] == b"\x00" + UUID  # echoed (PXE spec)
    subs = vendor_suboptions(msg)
    assert subs[6] == b"\x08"  # PXE_DISCOVERY_CONTROL: skip discovery, use the file in this offer
    assert subs[10][0] == 0  # menu prompt, timeout 0
    for code in (1, 3, 50, 51, 58, 59, 17):
        assert code not in msg.options, code  # no lease, no subnet: the site's server says those
    assert (reply.dest, reply.port) == (BROADCAST, 68) and msg.broadcast


def test_uefi_pxe_offer_leaves_43_out_and_is_confirmed_on_4011(proxy):
    _, msg = on_67(proxy, pk.DISCOVER, mac(2), UEFI_PXE)
    assert msg.msg_type == pk.OFFER and msg.yiaddr == 0
    assert msg.options[67] == b"snponly.efi" and msg.siaddr == ip_int(SERVER)
    assert 43 not in msg.options  # EDK2 takes it as a "BINL" proxy offer and asks port 4011
    assert events(proxy, "dhcp.proxy.offered")[0]["confirm_on_4011"] is True
    pc = ip_int("10.0.0.150")
    reply, ack = on_4011(proxy, pk.REQUEST, mac(2), {**UEFI_PXE, 54: IFACE.packed}, ciaddr=pc)
    assert ack.msg_type == pk.ACK and ack.yiaddr == 0 and ack.options[54] == IFACE.packed
    assert ack.options[67] == b"snponly.efi" and ack.file.rstrip(b"\0") == b"snponly.efi"
    assert vendor_suboptions(ack)[6] == b"\x08" and ack.options[60] == b"PXEClient"
    assert (reply.dest, reply.port) == (pc, 68)  # back where the request came from
    assert events(proxy, "dhcp.proxy.ack") == [{"mac": "02:00:00:00:00:02", "ip": "10.0.0.150", "client_class": "pxe-efi",
                                                "bootfile": "snponly.efi", "root_path": None}]


def test_ipxe_gets_its_script_and_root_path_never_the_loader(proxy):
    _, msg = on_67(proxy, pk.DISCOVER, bytes.fromhex(ASSIGNED.replace(":", "")), IPXE)
    assert msg.yiaddr == 0
    # named for the PC: the TFTP service renders it without knowing the PC's address yet
    assert msg.options[67] == b"boot.ipxe-02-00-00-00-00-bb" and msg.siaddr == ip_int(SERVER)
    assert msg.options[17] == b"iscsi:10.0.0.2:::2:iqn.2026-11.org.x:bb"
    assert opt.parse_suboptions(msg.options[175])[8] == b"\x01"  # keep-san
    assert opt.IPXE_NO_PXEDHCP not in opt.parse_suboptions(msg.options[175])
    assert vendor_suboptions(msg)[6] == b"\x08"
    _, msg = on_67(proxy, pk.DISCOVER, mac(3), IPXE_NO_60)
    assert msg.options[67] == b"boot.ipxe-02-00-00-00-00-03"
    assert msg.options[17] == b"iscsi:10.0.0.2::::iqn.2026-11.org.x:default"


def test_http_transport_hands_ipxe_the_script_url():
    core = ProxyCore(config_from_dict({
        "boot": {"server": SERVER, "default_target": "iqn.2026-11.org.x:default", "transport": "http"},
        "http": {"enabled": True}, "dhcp": {"mode": "proxy", "interfaces": [{"name": "eth0"}]},
    }))
    _, msg = on_67(core, pk.DISCOVER, mac(3), IPXE)
    assert msg.options[67] == b"http://10.0.0.2:8069/boot.ipxe-02-00-00-00-00-03"


@pytest.mark.parametrize("options", [PLAIN, {}, {93: b"\x00\x00"}, {60: b"HTTPClient:Arch:00016"}])
def test_clients_that_are_not_pxe_get_nothing(proxy, options):
    for mtype in (pk.DISCOVER, pk.REQUEST, pk.INFORM):
        assert on_67(proxy, mtype, mac(4), options)[0] is None
        assert on_4011(proxy, mtype, mac(4), options, ip_int("10.0.0.160"))[0] is None
    assert proxy.take_events() == []
    assert proxy.counters["not_pxe"] == 6


def test_never_acks_or_naks_on_port_67(proxy):
    # SELECTING the site server's offer: silent, but the address is learned for the timeline
    selecting = {**IPXE, 54: SITE_DHCP, 50: struct.pack("!I", ip_int("10.0.0.151"))}
    assert on_67(proxy, pk.REQUEST, mac(5), selecting)[0] is None
    assert events(proxy, "dhcp.proxy.address") == [{"mac": "02:00:00:00:00:05", "ip": "10.0.0.151"}]
    # a REQUEST naming us (some client took our offer for an address offer): no ACK, no NAK
    assert on_67(proxy, pk.REQUEST, mac(5), {**IPXE, 54: IFACE.packed, 50: struct.pack("!I", ip_int("10.0.0.9"))})[0] is None
    for mtype in (pk.DECLINE, pk.RELEASE, pk.INFORM):
        assert on_67(proxy, mtype, mac(5), IPXE, ciaddr=ip_int("10.0.0.151"))[0] is None
    assert proxy.counters["offers"] == proxy.counters["acks"] == 0


def test_4011_request_for_another_proxy_is_not_ours(proxy):
    other = struct.pack("!I", ip_int("10.0.0.3"))
    assert on_4011(proxy, pk.REQUEST, mac(6), {**BIOS_PXE, 54: other}, ip_int("10.0.0.152"))[0] is None


def test_relayed_requests_are_not_answered(proxy):
    relayed = pk.parse(pk.build_request(pk.DISCOVER, mac(7), options=BIOS_PXE, giaddr=ip_int("10.9.0.1")))
    assert proxy.handle(relayed, IFACE, 1000.0) is None


def test_discover_event_carries_identity_and_the_pc_is_remembered_by_mac(proxy):
    on_67(proxy, pk.DISCOVER, mac(8), BIOS_PXE)
    got = proxy.take_events()
    (d,) = [e.fields() for e in got if e.type == "dhcp.discover"]
    assert d == {"mac": "02:00:00:00:00:08", "client_class": "pxe-bios", "arch": 0, "mode": "proxy",
                 "uuid": "33221100-5544-7766-8899-aabbccddeeff", "nic": "undi-2.1", "firmware": "bios"}
    (o,) = [e.fields() for e in got if e.type == "dhcp.proxy.offered"]
    assert o["bootfile"] == "undionly.kpxe" and o["confirm_on_4011"] is False
    row = proxy.clients["02:00:00:00:00:08"]
    assert row.uuid == "33221100-5544-7766-8899-aabbccddeeff" and row.arch == 0
    assert proxy.expire(2000.0) == 0 and proxy.release("02:00:00:00:00:08", 2000.0) == []


def test_boot_unknown_ignore_answers_only_configured_pcs():
    core = ProxyCore(config(unknown="ignore"))
    assert on_67(core, pk.DISCOVER, mac(9), IPXE)[0] is None
    assert [e["mac"] for e in events(core, "dhcp.unknown_client")] == ["02:00:00:00:00:09"]
    assert on_67(core, pk.DISCOVER, bytes.fromhex(ASSIGNED.replace(":", "")), IPXE)[1] is not None


def test_boot_unknown_menu_gives_no_root_path_so_the_script_shows_the_menu():
    core = ProxyCore(config(unknown="menu"))
    _, msg = on_67(core, pk.DISCOVER, mac(10), IPXE)
    assert 17 not in msg.options and msg.options[67] == b"boot.ipxe-02-00-00-00-00-0a"
    _, msg = on_67(core, pk.DISCOVER, bytes.fromhex(ASSIGNED.replace(":", "")), IPXE)
    assert msg.options[17].endswith(b"iqn.2026-11.org.x:bb")


def test_configured_class_overrides_the_loader():
    cfg = config_from_dict({
        "dhcp": {"mode": "proxy", "interfaces": [{"name": "eth0"}],
                 "classes": [{"name": "uefi32", "arch": [6], "bootfile": "ipxe32.efi", "next_server": "10.0.0.9"}]},
    })
    core = ProxyCore(cfg)
    _, msg = on_67(core, pk.DISCOVER, mac(11), {**UEFI_PXE, 93: b"\x00\x06"})
    assert msg.options[67] == b"ipxe32.efi" and msg.siaddr == ip_int("10.0.0.9")


def test_processes_split_the_broadcasts():
    cores = [ProxyCore(config(), i, 2) for i in range(2)]
    for n in range(20):
        answered = [c.handle(request(pk.DISCOVER, mac(n), IPXE), IFACE, 1000.0) is not None for c in cores]
        assert answered.count(True) == 1


def test_port_constant():
    assert PXE_PORT == 4011
