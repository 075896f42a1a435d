"""`boot.unknown`: what a PC in no clients[] entry gets: nothing, the default target, or an iPXE menu of the
targets it could boot (shared/boot.py, rendered per PC by the TFTP service's dynamic.py)."""

from __future__ import annotations

import pytest

from shared.boot import ipxe_script, root_path
from shared.config.loader import ConfigError, config_from_dict

RAM = {"type": "ram", "size": 1048576}
KNOWN = "52:54:00:00:00:01"
NEW = "52:54:00:00:00:99"


def config(unknown: str):
    return config_from_dict({
        "boot": {"default_target": "iqn.2026-11.org.x:a", "unknown": unknown},
        "clients": [{"mac": KNOWN, "target": "iqn.2026-11.org.x:b"}],
        "iscsi": {"portals": [{"ip": "10.0.0.1", "port": 3260}], "targets": [
            {"name": "iqn.2026-11.org.x:a", "luns": [{"id": 0, "backstore": RAM}]},
            {"name": "iqn.2026-11.org.x:b", "luns": [{"id": 2, "backstore": RAM}]},
        ]},
    })


def test_menu_lists_the_targets_and_says_how_to_adopt_the_pc():
    cfg = config("menu")
    assert root_path(cfg, "10.0.0.1", NEW) is None  # no default target: iPXE's autoboot attaches nothing
    script = ipxe_script(cfg, "10.0.0.1", NEW)
    assert script.startswith("#!ipxe\n")
    assert f"menu Bootfleet: new PC {NEW}" in script and "${uuid}" in script
    assert f"bootfleet client assign {NEW} --target IQN" in script
    assert "item t0 Boot iqn.2026-11.org.x:a\n" in script and "item t1 Boot iqn.2026-11.org.x:b lun 2\n" in script
    assert "sanboot iscsi:10.0.0.1::::iqn.2026-11.org.x:a || goto shell" in script
    assert "sanboot iscsi:10.0.0.1:::2:iqn.2026-11.org.x:b || goto shell" in script
    assert "choose --default shell selected || goto shell\ngoto ${selected}" in script
    # a configured PC boots its own target, no menu
    assert "menu" not in ipxe_script(cfg, "10.0.0.1", KNOWN)
    assert "sanboot iscsi:10.0.0.1::::iqn.2026-11.org.x:b" in ipxe_script(cfg, "10.0.0.1", KNOWN)


def test_default_gives_the_default_target_as_before():
    cfg = config("default")
    assert root_path(cfg, "10.0.0.1", NEW) == "iscsi:10.0.0.1::::iqn.2026-11.org.x:a"
    assert "menu" not in ipxe_script(cfg, "10.0.0.1", NEW)


def test_a_wrong_value_names_the_field():
    with pytest.raises(ConfigError, match=r"boot\.unknown"):
        config("maybe")
