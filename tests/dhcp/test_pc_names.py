"""Option 203 (iPXE's initiator-iqn) and the root-path of a PC on an image (issue 13): the PC's own target
and initiator names, from shared/boot.py, in the DHCP core's answers."""

from __future__ import annotations

from services.dhcp import packet as pk
from services.dhcp.boot_answer import ISCSI_INITIATOR_IQN
from services.dhcp.core import DhcpCore
from services.dhcp.lease_table import MemoryLeaseTable
from shared.config.loader import config_from_dict
from tests.dhcp.test_core import IPXE, PXE_BIOS, boot_of, dora, send

PC1 = bytes.fromhex("525400000001")
PC2 = bytes.fromhex("525400000002")


def core(**boot):
    config = config_from_dict({
        "boot": {"server": "10.0.0.1", "default_target": "iqn.2026-11.org.x:default", **boot},
        "iscsi": {"targets": [{"name": "iqn.2026-11.org.x:default"}, {"name": "iqn.2026-11.org.x:bb"}]},
        "images": [{"name": "win10"}],
        "clients": [{"mac": "52:54:00:00:00:01", "name": "pc1", "image": "win10"},
                    {"mac": "52:54:00:00:00:02", "image": "win10", "mode": "persistent"},
                    {"mac": "02:00:00:00:00:bb", "target": "iqn.2026-11.org.x:bb"}],
        "dhcp": {"interfaces": [{"name": "eth0"}],
                 "scopes": [{"name": "lan", "subnet": "10.0.0.0/24", "interface": "eth0",
                             "ranges": [{"start": "10.0.0.100", "end": "10.0.0.120"}]}]},
    })
    return DhcpCore(config, MemoryLeaseTable())


def test_a_pc_on_an_image_gets_its_target_and_its_initiator_name():
    srv = core()
    offer, ack, _ = dora(srv, PC1, options=IPXE)
    for msg in (offer, ack):
        assert boot_of(msg)[2] == "iscsi:10.0.0.1::::iqn.2026-12.org.bootfleet:win10.pc1"
        assert msg.options[ISCSI_INITIATOR_IQN] == b"iqn.2026-12.org.bootfleet:pc.pc1"
    # no name: the MAC without colons, in both names; each PC its own (not a cached neighbour's answer)
    _, msg = send(srv, pk.DISCOVER, PC2, options=IPXE)
    assert boot_of(msg)[2] == "iscsi:10.0.0.1::::iqn.2026-12.org.bootfleet:win10.525400000002"
    assert msg.options[ISCSI_INITIATOR_IQN] == b"iqn.2026-12.org.bootfleet:pc.525400000002"


def test_the_prefix_is_configurable_and_others_get_no_203():
    srv = core(iqn_prefix="iqn.2027-01.lan.school")
    _, msg = send(srv, pk.DISCOVER, PC1, options=IPXE)
    assert msg.options[ISCSI_INITIATOR_IQN] == b"iqn.2027-01.lan.school:pc.pc1"
    assert boot_of(msg)[2].endswith(":iqn.2027-01.lan.school:win10.pc1")
    # a client with a target of its own, an unknown PC and the PXE ROM stage: no initiator name imposed
    for mac, options in ((bytes.fromhex("0200000000bb"), IPXE), (bytes.fromhex("020000000099"), IPXE), (PC1, PXE_BIOS)):
        _, msg = send(srv, pk.DISCOVER, mac, options=options)
        assert ISCSI_INITIATOR_IQN not in msg.options


def test_proxy_dhcp_gives_a_pc_on_an_image_its_names_too():
    from services.dhcp.proxy import ProxyCore
    from tests.dhcp.test_proxy import IFACE, IPXE as PROXY_IPXE, request

    proxy = ProxyCore(config_from_dict({
        "boot": {"server": "10.0.0.2"}, "images": [{"name": "win10"}],
        "clients": [{"mac": "52:54:00:00:00:01", "name": "pc1", "image": "win10"}],
        "dhcp": {"mode": "proxy", "interfaces": [{"name": "eth0"}]}}))
    reply = proxy.handle(request(pk.DISCOVER, PC1, PROXY_IPXE), IFACE, 1000.0)
    msg = pk.parse(reply.data)
    assert msg.options[ISCSI_INITIATOR_IQN] == b"iqn.2026-12.org.bootfleet:pc.pc1"
    assert boot_of(msg)[2] == "iscsi:10.0.0.2::::iqn.2026-12.org.bootfleet:win10.pc1"
    reply = proxy.handle(request(pk.DISCOVER, bytes.fromhex("020000000077"), PROXY_IPXE), IFACE, 1000.0)
    assert reply is None or ISCSI_INITIATOR_IQN not in pk.parse(reply.data).options
