"""The DHCP service in proxy mode (`dhcp.mode: proxy`) as a process in a network namespace: crafted PXE
requests on the wire (scapy frames on port 67, a UDP socket to port 4011); nothing on the host's interfaces."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from dhcp_lab import SERVER_IP
from test_integration import client_exchange, ip
from services.dhcp import packet as pk

pytestmark = pytest.mark.integration

CONFIG = """
logging: {level: info}
boot:
  server: 10.77.0.1
  default_target: iqn.2026-11.org.bootfleet:demo
clients:
  - {mac: "52:54:00:00:00:0a", target: "iqn.2026-11.org.bootfleet:pc10"}
dhcp:
  mode: proxy
  interfaces: [{name: @SRV_IF@}]
"""
PC_IP = "10.77.0.150"
UEFI = [("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003016"), (93, b"\x00\x07")]


@pytest.fixture
def proxy_lab(fresh_lab):
    fresh_lab.start_server(fresh_lab.write_config(CONFIG))
    return fresh_lab


def test_proxy_offers_no_address_answers_4011_and_ignores_plain_clients(proxy_lab):
    lab = proxy_lab
    offer, eth = client_exchange(lab, "52:54:00:00:00:0a", [("message-type", "discover"), ("user_class", b"iPXE"),
                                                             ("vendor_class_id", b"PXEClient")], 0x1001)
    assert offer is not None and offer.msg_type == pk.OFFER, lab.log.read_text()[-2000:]
    assert offer.yiaddr == 0 and offer.options[60] == b"PXEClient" and ip(offer.siaddr) == SERVER_IP
    assert offer.options[67] == b"boot.ipxe-52-54-00-00-00-0a"
    assert offer.options[17] == b"iscsi:10.77.0.1::::iqn.2026-11.org.bootfleet:pc10"
    assert eth["IP"].dst == "255.255.255.255"

    plain, _ = client_exchange(lab, "52:54:00:00:00:0c", [("message-type", "discover"), ("hostname", b"laptop")],
                               0x1002, timeout=1.0)
    assert plain is None

    offer, _ = client_exchange(lab, "52:54:00:00:00:0d", [("message-type", "discover")] + UEFI, 0x1003)
    assert offer is not None and 43 not in offer.options and offer.options[67] == b"snponly.efi"

    # the firmware, now holding the site server's address, confirms with the proxy on port 4011
    lab.run(lab.cli, "ip", "addr", "add", f"{PC_IP}/24", "dev", lab.cli_if)
    with lab.inside(lab.cli):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((PC_IP, 68))
        sock.settimeout(3.0)
        request = pk.build_request(pk.REQUEST, bytes.fromhex("52540000000d"), xid=0x1004, ciaddr=pk.ip_int(PC_IP),
                                   options={60: b"PXEClient:Arch:00007:UNDI:003016", 93: b"\x00\x07",
                                            54: socket.inet_aton(SERVER_IP)})
        deadline = time.monotonic() + 5
        ack = None
        while ack is None and time.monotonic() < deadline:
            sock.sendto(request, (SERVER_IP, 4011))
            try:
                data, source = sock.recvfrom(2048)
            except socket.timeout:
                continue
            ack = pk.parse(data)
        assert ack is not None, lab.log.read_text()[-2000:]
        assert source == (SERVER_IP, 4011)
        assert ack.msg_type == pk.ACK and ack.yiaddr == 0 and ack.xid == 0x1004
        assert ack.options[67] == b"snponly.efi" and ack.options[43].startswith(b"\x06\x01\x08")
    finally:
        sock.close()
    lab.wait_event("dhcp.proxy.ack", mac="52:54:00:00:00:0d", ip=PC_IP)
    assert lab.events("dhcp.lease.offered") == [] and lab.events("dhcp.lease.granted") == []
    assert not list(lab.tmp.glob("*.sqlite")), "proxy mode keeps no lease store"
