"""The `http` section and `boot.transport`: defaults, errors that name the field, and the URLs iPXE is given."""

import pytest
from pydantic import ValidationError

from shared.boot import file_url, script_bootfile
from shared.config.model import BootfleetConfig


def test_defaults():
    config = BootfleetConfig()
    assert config.http.enabled is False and config.http.port == 8069 and config.http.address is None
    assert config.http.keepalive_timeout == 60.0 and config.http.max_connections == 1000
    assert config.boot.transport == "tftp"


@pytest.mark.parametrize("doc, field", [
    ({"boot": {"transport": "http"}}, "http.enabled"),
    ({"boot": {"transport": "ftp"}}, "boot.transport"),
    ({"http": {"port": 70000}}, "http.port"),
    ({"http": {"address": "10.0.0.300"}}, "http.address"),
    ({"http": {"keepalive_timeout": 0}}, "http.keepalive_timeout"),
    ({"http": {"listen": 1}}, "http.listen"),  # a typo is an error, not a setting ignored
])
def test_errors_name_the_field(doc, field):
    with pytest.raises(ValidationError) as exc:
        BootfleetConfig.model_validate(doc)
    assert field in str(exc.value)


def test_urls_follow_the_transport():
    tftp = BootfleetConfig()
    assert script_bootfile(tftp, "10.0.0.1") == "boot.ipxe"
    assert file_url(tftp, "10.0.0.1", "menu.ipxe") == "tftp://10.0.0.1/menu.ipxe"
    http = BootfleetConfig.model_validate({"boot": {"transport": "http"}, "http": {"enabled": True}})
    assert script_bootfile(http, "10.0.0.1") == "http://10.0.0.1:8069/boot.ipxe"
    assert file_url(http, "10.0.0.1", "/sub/x.efi") == "http://10.0.0.1:8069/sub/x.efi"
    elsewhere = BootfleetConfig.model_validate(
        {"boot": {"transport": "http", "server": "192.168.1.5"}, "http": {"enabled": True, "port": 80}})
    assert script_bootfile(elsewhere, "10.0.0.1") == "http://192.168.1.5/boot.ipxe"


def test_dhcp_hands_ipxe_the_script_url_with_http_transport():
    """The one line services/dhcp/boot_answer.py takes from shared/boot.py: option 67 (and `file`) for an iPXE
    client is the script's http:// URL with boot.transport: http, its bare name otherwise; PXE ROMs still get
    the loader by name (TFTP)."""
    from services.dhcp import options as opt
    from services.dhcp import packet as pk
    from services.dhcp.core import DhcpCore, Interface
    from services.dhcp.lease_table import MemoryLeaseTable
    from shared.config.loader import config_from_dict

    def offer(transport, options):
        doc = {
            "boot": {"server": "10.0.0.1", "default_target": "iqn.2026-11.org.x:d", "transport": transport},
            "iscsi": {"targets": [{"name": "iqn.2026-11.org.x:d", "luns": [{"id": 0, "backstore": {"type": "ram", "size": 1048576}}]}]},
            "http": {"enabled": transport == "http"},
            "dhcp": {"interfaces": [{"name": "eth0"}], "scopes": [{"name": "lan", "subnet": "10.0.0.0/24",
                     "interface": "eth0", "ranges": [{"start": "10.0.0.100", "end": "10.0.0.110"}]}]},
        }
        core = DhcpCore(config_from_dict(doc), MemoryLeaseTable())
        request = pk.parse(pk.build_request(pk.DISCOVER, bytes((2, 0, 0, 0, 0, 1)), options=options))
        reply = pk.parse(core.handle(request, Interface("eth0", pk.ip_int("10.0.0.1")), 1_800_000_000.0).data)
        return reply.options[opt.BOOTFILE_NAME].decode(), reply.file.rstrip(b"\0").decode()

    ipxe = {opt.USER_CLASS: b"iPXE", opt.IPXE_ENCAP: b"\x13\x01\x01", opt.CLIENT_ARCH: b"\x00\x00"}
    pxe = {opt.VENDOR_CLASS: b"PXEClient:Arch:00000:UNDI:002001", opt.CLIENT_ARCH: b"\x00\x00"}
    assert offer("http", ipxe) == ("http://10.0.0.1:8069/boot.ipxe",) * 2
    assert offer("tftp", ipxe) == ("boot.ipxe",) * 2
    assert offer("http", pxe) == ("undionly.kpxe",) * 2
