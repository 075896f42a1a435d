"""The iscsi config section: defaults, sizes, validation messages, boot credentials."""

import pytest
from pydantic import ValidationError

from shared.config.iscsi import IscsiConfig, ip_allowed, parse_size, AuthConfig
from shared.config.model import BootfleetConfig
from shared import boot

T = "iqn.2026-11.org.test:disk"


def test_defaults_are_safe():
    c = IscsiConfig()
    assert c.targets == [] and c.auth.mode == "anonymous"
    assert (c.portals[0].ip, c.portals[0].port) == ("0.0.0.0", 3260)
    assert c.busy_poll_us == 0


def test_sizes():
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("512k") == 512 << 10
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def lun(**bs):
    return {"id": 0, "backstore": {"type": "ram", "size": "1MiB", **bs}}


def test_validation_messages_name_the_problem():
    with pytest.raises(ValidationError, match="defined twice"):
        IscsiConfig(targets=[{"name": T, "luns": [lun(), lun()]}])
    with pytest.raises(ValidationError, match="already defined"):
        IscsiConfig(targets=[{"name": T}, {"name": T.upper()}])
    with pytest.raises(ValidationError, match="multiple of block_size 4096"):
        IscsiConfig(targets=[{"name": T, "luns": [lun(size=4096 + 512, block_size=4096)]}])
    with pytest.raises(ValidationError, match="12..16"):
        AuthConfig(mode="chap", users=[{"username": "a", "secret": "short"}])
    with pytest.raises(ValidationError, match="needs at least one CHAP user"):
        AuthConfig(mode="chap")
    with pytest.raises(ValidationError, match="needs ip_filters"):
        AuthConfig(mode="ip")
    with pytest.raises(ValidationError, match="needs a path"):
        IscsiConfig(targets=[{"name": T, "luns": [{"id": 0, "backstore": {"type": "file"}}]}])
    with pytest.raises(ValidationError, match="not a valid IQN"):
        IscsiConfig(targets=[{"name": "iqn.bad"}])


def test_boot_credentials():
    users = [{"username": "boot", "secret": "bootsecret12"}]
    c = IscsiConfig(targets=[{"name": T}])
    assert c.boot_credentials(T) is None
    c = IscsiConfig(auth={"mode": "chap", "users": users}, targets=[{"name": T}])
    assert c.boot_credentials(T) == ("boot", "bootsecret12")
    c = IscsiConfig(auth={"mode": "chap", "users": users}, targets=[{"name": T, "auth": {"mode": "anonymous"}}])
    assert c.boot_credentials(T) is None
    c = IscsiConfig(auth={"mode": "chap", "users": users, "guest": True}, targets=[{"name": T}])
    assert c.boot_credentials(T) is None


def test_shared_boot_uses_port_and_credentials():
    cfg = BootfleetConfig(boot={"default_target": T},
                          iscsi={"portals": [{"port": 3261}], "targets": [{"name": T}],
                                 "auth": {"mode": "chap", "users": [{"username": "boot", "secret": "bootsecret12"}]}})
    assert boot.root_path(cfg, "10.0.0.1") == f"iscsi:10.0.0.1::3261::{T}"
    assert "set username boot" in boot.ipxe_script(cfg, "10.0.0.1")


def test_ip_filters_first_match_wins():
    auth = AuthConfig(mode="ip", ip_filters=[{"network": "10.1.0.0/16", "action": "deny"},
                                             {"network": "10.0.0.0/8", "action": "allow"}])
    assert ip_allowed(auth, "10.2.3.4") and not ip_allowed(auth, "10.1.3.4") and not ip_allowed(auth, "8.8.8.8")
