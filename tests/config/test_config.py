"""The configuration model: names, addresses, error paths, the default config and the schema."""

from pathlib import Path

import pytest

from shared.boot import ipxe_script, root_path
from shared.config.base import normalize_mac, validate_iscsi_name
from shared.config.loader import ConfigError, config_from_dict, load_config_file, parse_yaml
from shared.config.model import BootfleetConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name",
    ["iqn.2026-11.org.bootfleet:demo", "iqn.2006-03.com.kernsafe:gpxe.boot", "IQN.1991-05.COM.Microsoft:PC1",
     "eui.02004567A425678D", "naa.52004567BA64678D", "naa.62004567BA64678D0123456789ABCDEF"],
)
def test_valid_iscsi_names(name):
    assert validate_iscsi_name(name)


@pytest.mark.parametrize(
    "name,reason",
    [("iqn.2026-13.org.x:y", "not a valid IQN"), ("iqn.26-11.org.x", "not a valid IQN"), ("eui.1234", "EUI-64"),
     ("naa.123", "NAA"), ("target0", "must start with iqn."), ("iqn.2026-11.org.x:" + "a" * 230, "223 bytes")],
)
def test_invalid_iscsi_names(name, reason):
    with pytest.raises(ValueError, match=reason):
        validate_iscsi_name(name)


def test_iqn_is_case_folded():
    assert validate_iscsi_name("iqn.1991-05.COM.Microsoft:PC1") == "iqn.1991-05.com.microsoft:pc1"


@pytest.mark.parametrize("text", ["52:54:00:AB:cd:01", "52-54-00-ab-cd-01", "525400abcd01"])
def test_mac_forms(text):
    assert normalize_mac(text) == "52:54:00:ab:cd:01"


def test_errors_name_the_field_path():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"clients": [{"mac": "52:54:00:00:00:01"}, {"mac": "52:54:00:00:00:02", "ip": "10.0.0.300"}],
                          "logging": {"level": "loud"}, "bogus": 1})
    errors = exc.value.errors
    assert "clients[1].ip: 10.0.0.300 is not an IPv4 address" in errors
    assert any(e.startswith("logging.level:") for e in errors)
    assert any(e.startswith("bogus:") and "Extra inputs" in e for e in errors)


def test_duplicate_client_is_rejected():
    with pytest.raises(ConfigError, match=r"clients\[1\].mac: 52:54:00:00:00:01 is already assigned by clients\[0\]"):
        config_from_dict({"clients": [{"mac": "52:54:00:00:00:01"}, {"mac": "52-54-00-00-00-01"}]})


def test_yaml_errors_are_reported():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_yaml("a: [1,\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_yaml("- 1\n")


def test_default_config_is_valid_and_serves_no_dhcp_interface():
    config = load_config_file(ROOT / "deploy" / "bootfleet.yaml")
    dumped = config.model_dump()
    assert not dumped["dhcp"].get("interfaces"), "the default config must serve DHCP on no interface"


def test_schema_has_every_section():
    schema = BootfleetConfig.model_json_schema()
    for section in ("boot", "clients", "iscsi", "dhcp", "tftp", "bus", "scale", "events"):
        assert section in schema["properties"]


def test_assigned_targets_must_exist():
    with pytest.raises(ConfigError, match=r"clients\[0\].target: iqn.2026-11.org.example:nope is not a target in iscsi.targets"):
        config_from_dict({"clients": [{"mac": "52:54:00:00:00:01", "target": "iqn.2026-11.org.example:nope"}]})
    ram = {"type": "ram", "size": 1048576}
    config_from_dict({"iscsi": {"targets": [{"name": "iqn.2026-11.org.example:pc1", "luns": [{"id": 0, "backstore": ram}]}]},
                      "clients": [{"mac": "52:54:00:00:00:01", "target": "iqn.2026-11.org.example:pc1"}]})


def test_ram_disks_are_served_by_any_scale():
    # One owner per target (services/iscsi_target/owners.py): a RAM disk is read and written by one process.
    luns = [{"id": 0, "backstore": {"type": "file", "path": "a.img", "size": 1048576}},
            {"id": 1, "backstore": {"type": "ram", "size": 1048576}}]
    iscsi = {"targets": [{"name": "iqn.2026-11.org.example:pc1", "luns": luns}]}
    config_from_dict({"iscsi": iscsi, "scale": {"iscsi_target": 1}})
    config_from_dict({"iscsi": iscsi, "scale": {"iscsi_target": 3}})


def test_root_path_and_script_per_client():
    config = config_from_dict(
        {
            "boot": {"default_target": "iqn.2026-11.org.example:golden", "server": "10.0.0.1"},
            "clients": [{"mac": "52:54:00:00:00:01", "target": "iqn.2026-11.org.example:pc1", "lun": 2}],
        }
    )
    assert root_path(config, "10.9.9.9", mac="52:54:00:00:00:01") == "iscsi:10.0.0.1:::2:iqn.2026-11.org.example:pc1"
    assert root_path(config, "10.0.0.1", mac="52:54:00:00:00:09") == "iscsi:10.0.0.1::::iqn.2026-11.org.example:golden"
    script = ipxe_script(config, "10.0.0.1", mac="52:54:00:00:00:01")
    assert script.splitlines() == ["#!ipxe", "set keep-san 1", "sanboot iscsi:10.0.0.1:::2:iqn.2026-11.org.example:pc1"]
    none = config_from_dict({})
    assert root_path(none, "10.0.0.1", mac="52:54:00:00:00:01") is None
    assert "no iSCSI target" in ipxe_script(none, "10.0.0.1", mac="52:54:00:00:00:01")


def test_scale_auto_is_one_target_process_per_usable_core(monkeypatch):
    """The iSCSI target defaults to one process per core the host lets us use (Python runs one thread of a
    process at a time), at most supervisord's 8 slots; DHCP and TFTP default to one; a number is taken as it is."""
    import shared.config.model as model

    scale = config_from_dict({}).scale
    assert (scale.dhcp, scale.tftp, scale.iscsi_target) == (1, 1, "auto")
    for cores, want in ((1, 1), (2, 2), (6, 6), (64, 8)):
        monkeypatch.setattr(model, "usable_cores", lambda: cores)
        assert scale.resolved() == {"dhcp": 1, "tftp": 1, "iscsi_target": want}
    assert config_from_dict({"scale": {"iscsi_target": 3, "tftp": "auto"}}).scale.resolved() == {
        "dhcp": 1, "tftp": 8, "iscsi_target": 3}
    assert scale.processes("probe") == 1  # a test's own service
    assert config_from_dict({"scale": {"dhcp": "2"}}).scale.dhcp == 2  # as a form sends it


@pytest.mark.parametrize("value", [9, -1, "two", 1.5, True, None])
def test_scale_refuses_what_is_not_a_process_count(value):
    with pytest.raises(ConfigError, match=r"scale.iscsi_target: .*whole number 0-8 or 'auto'"):
        config_from_dict({"scale": {"iscsi_target": value}})
