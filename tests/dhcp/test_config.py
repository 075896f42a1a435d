"""The dhcp section: safe defaults, validation messages that name the problem."""

import pytest

from shared.config.dhcp import DhcpConfig
from shared.config.loader import ConfigError, config_from_dict


def test_default_serves_nothing():
    d = DhcpConfig()
    assert d.interfaces == [] and d.scopes == []


def errors(dhcp):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"dhcp": dhcp})
    return str(exc.value)


SCOPE = {"name": "lan", "subnet": "10.0.0.0/24"}


@pytest.mark.parametrize(
    "dhcp,words",
    [
        ({"options": {"root-path": "iscsi:10.0.0.1::iqn.2026-11.org.x:d"}}, "iPXE needs 4"),
        ({"options": {"root-path": "iscsi:10.0.0.1:::x:iqn.2026-11.org.x:d"}}, "LUN 'x'"),
        ({"options": {"root-path": "iscsi:10.0.0.1::"}}, "no iqn."),
        ({"scopes": [{**SCOPE, "ranges": [{"start": "10.0.0.9", "end": "10.0.1.5"}]}]}, "outside the subnet"),
        ({"scopes": [{**SCOPE, "ranges": [{"start": "10.0.0.9", "end": "10.0.0.5"}]}]}, "is after end"),
        ({"scopes": [{**SCOPE, "ranges": [{"start": "10.0.0.0", "end": "10.0.0.5"}]}]}, "network or broadcast"),
        ({"scopes": [{**SCOPE, "interface": "eth0"}]}, "not in dhcp.interfaces"),
        ({"scopes": [SCOPE, {**SCOPE, "name": "b", "subnet": "10.0.0.0/16"}]}, "overlaps"),
        ({"scopes": [SCOPE, SCOPE]}, "already used"),
        ({"scopes": [{**SCOPE, "reservations": [{"mac": "02:00:00:00:00:01", "ip": "10.1.0.1"}]}]}, "outside the subnet"),
        ({"scopes": [{**SCOPE, "reservations": [{"mac": "02:00:00:00:00:01"}, {"mac": "02-00-00-00-00-01"}]}]}, "already reserved"),
        ({"scopes": [{**SCOPE, "lease_time": 600, "renewal_time": 600}]}, "renewal_time"),
        ({"classes": [{"name": "x"}]}, "names no criterion"),
        ({"options": {"routers": "10.0.0.256"}}, "not an IPv4 address"),
        ({"options": {"3": "10.0.0.1", "routers": "10.0.0.2"}}, "given twice"),
        ({"interfaces": [{"name": "eth0"}, {"name": "eth0"}]}, "listed twice"),
        ({"bogus": 1}, "dhcp.bogus"),
    ],
)
def test_rejections_name_the_problem(dhcp, words):
    assert words in errors(dhcp)


def test_ipxe_root_path_form_accepted():
    cfg = config_from_dict({"dhcp": {"options": {"root-path": "iscsi:10.0.0.1::3260:1:iqn.2026-11.org.x:d"}}})
    assert cfg.dhcp.options["root-path"].startswith("iscsi:")
