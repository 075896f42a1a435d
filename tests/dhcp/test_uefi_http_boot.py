"""UEFI HTTP boot (option 93 = 16, option 60 `HTTPClient`): the EFI loader's URL in option 67 and option 60
`HTTPClient` back, in server and proxy mode, bytes in and out; with http.enabled off, no HTTP answer."""

from __future__ import annotations

import logging

from services.dhcp import options as opt
from services.dhcp import packet as pk
from services.dhcp.core import DhcpCore, Interface
from services.dhcp.lease_table import MemoryLeaseTable
from services.dhcp.proxy import ProxyCore
from shared.config.loader import config_from_dict

HTTP_CLIENT = {opt.VENDOR_CLASS: b"HTTPClient:Arch:00016:UNDI:003001", opt.CLIENT_ARCH: b"\x00\x10"}
IFACE = Interface("eth0", pk.ip_int("10.0.0.1"))
URL = b"http://10.0.0.1:8069/snponly.efi"


def doc(enabled: bool, mode: str = "server") -> dict:
    d = {"boot": {"server": "10.0.0.1", "default_target": "iqn.2026-11.org.x:d"}, "http": {"enabled": enabled}}
    if mode == "server":
        d["dhcp"] = {"interfaces": [{"name": "eth0"}], "scopes": [{"name": "lan", "subnet": "10.0.0.0/24",
                     "interface": "eth0", "ranges": [{"start": "10.0.0.100", "end": "10.0.0.110"}]}]}
    else:
        d["dhcp"] = {"mode": "proxy", "interfaces": [{"name": "eth0"}]}
    return d


def discover(core, options=HTTP_CLIENT):
    request = pk.parse(pk.build_request(pk.DISCOVER, bytes((2, 0, 0, 0, 0, 1)), options=options))
    reply = core.handle(request, IFACE, 1_800_000_000.0)
    return pk.parse(reply.data) if reply else None


def test_server_mode_hands_the_loader_url_and_httpclient():
    reply = discover(DhcpCore(config_from_dict(doc(True)), MemoryLeaseTable()))
    assert reply.options[opt.BOOTFILE_NAME] == URL and reply.file.rstrip(b"\0") == URL
    assert reply.options[opt.VENDOR_CLASS] == b"HTTPClient"
    assert reply.yiaddr != 0  # server mode: an address as well


def test_server_mode_without_http_gives_an_address_and_no_http_answer(caplog):
    with caplog.at_level(logging.WARNING):
        reply = discover(DhcpCore(config_from_dict(doc(False)), MemoryLeaseTable()))
    assert reply.yiaddr != 0 and opt.BOOTFILE_NAME not in reply.options and opt.VENDOR_CLASS not in reply.options
    assert "http.enabled is off" in caplog.text


def test_proxy_mode_hands_the_loader_url_and_httpclient_without_an_address():
    reply = discover(ProxyCore(config_from_dict(doc(True, "proxy"))))
    assert reply.yiaddr == 0 and reply.options[opt.BOOTFILE_NAME] == URL
    assert reply.options[opt.VENDOR_CLASS] == b"HTTPClient" and 43 not in reply.options


def test_proxy_mode_without_http_does_not_answer(caplog):
    with caplog.at_level(logging.WARNING):
        assert discover(ProxyCore(config_from_dict(doc(False, "proxy")))) is None
    assert "http.enabled is off" in caplog.text


def test_a_pxe_uefi_client_still_gets_the_loader_by_name():
    pxe = {opt.VENDOR_CLASS: b"PXEClient:Arch:00007:UNDI:003016", opt.CLIENT_ARCH: b"\x00\x07"}
    reply = discover(DhcpCore(config_from_dict(doc(True)), MemoryLeaseTable()), pxe)
    assert reply.options[opt.BOOTFILE_NAME] == b"snponly.efi"
