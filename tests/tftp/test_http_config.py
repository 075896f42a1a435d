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
