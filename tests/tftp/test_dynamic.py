"""dynamic.py: the per-client iPXE script under its names."""

from shared.config.model import BootfleetConfig
from services.tftp.dynamic import DynamicFiles

MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"


def config(**tftp):
    return BootfleetConfig.model_validate({
        "boot": {"server": "10.0.0.1", "default_target": "iqn.2026-11.org.example:default"},
        "clients": [
            {"mac": MAC1, "target": "iqn.2026-11.org.example:one"},
            {"mac": MAC2, "target": "iqn.2026-11.org.example:two", "lun": 2, "ip": "10.0.0.52"},
        ],
        "tftp": {"dynamic_files": ["menu.ipxe"], **tftp},
    })


def render(files, name, ip="10.0.0.99", exists=lambda name: False):
    rendered, mac = files.match(name, exists)
    assert rendered, name
    return files.render(name, ip, "10.0.0.1", mac)


def test_two_macs_get_different_scripts_by_every_name():
    files = DynamicFiles(config(), lambda ip: None)
    one, mac = render(files, f"boot.ipxe-{MAC1}")
    assert mac == MAC1
    assert one == b"#!ipxe\nset keep-san 1\nsanboot iscsi:10.0.0.1::::iqn.2026-11.org.example:one\n"
    two, _ = render(files, "boot.ipxe?mac=52-54-00-00-00-02")
    assert b"iscsi:10.0.0.1:::2:iqn.2026-11.org.example:two" in two and one != two
    assert render(files, "menu.ipxe-525400000002")[0] == two
    assert render(files, "pxelinux.cfg/01-52-54-00-00-00-01")[0] == one


def test_requester_by_lease_then_by_ip_then_default():
    leases = {"10.0.0.77": MAC1}
    files = DynamicFiles(config(), leases.get)
    assert b"example:one" in render(files, "boot.ipxe", ip="10.0.0.77")[0]
    assert b"example:two" in render(files, "boot.ipxe", ip="10.0.0.52")[0]
    assert b"example:default" in render(files, "boot.ipxe", ip="10.0.0.200")[0]


def test_real_pxelinux_file_wins_and_other_names_are_files():
    files = DynamicFiles(config(), lambda ip: None)
    assert files.match("pxelinux.cfg/01-52-54-00-00-00-01", lambda name: True) == (False, None)
    assert files.match("boot.ipxe-notamac", lambda name: False) == (False, None)
    assert files.match("undionly.kpxe", lambda name: False) == (False, None)
    off = DynamicFiles(config(pxelinux_paths=False), lambda ip: None)
    assert off.match("pxelinux.cfg/01-52-54-00-00-00-01", lambda name: False) == (False, None)


def test_chap_credentials_where_the_target_needs_them():
    cfg = BootfleetConfig.model_validate({
        "boot": {"server": "10.0.0.1"},
        "clients": [
            {"mac": MAC1, "target": "iqn.2026-11.org.example:chap"},
            {"mac": MAC2, "target": "iqn.2026-11.org.example:open"},
        ],
        "iscsi": {"targets": [
            {"name": "iqn.2026-11.org.example:chap", "luns": [{"id": 0, "backstore": {"type": "ram", "size": 1048576}}],
             "auth": {"mode": "chap", "users": [{"username": "pc1", "secret": "secret-of-pc-1"}]}},
            {"name": "iqn.2026-11.org.example:open", "luns": [{"id": 0, "backstore": {"type": "ram", "size": 1048576}}]},
        ]},
    })
    files = DynamicFiles(cfg, lambda ip: None)
    chap = render(files, f"boot.ipxe-{MAC1}")[0].decode()
    assert chap == ("#!ipxe\nset keep-san 1\nset username pc1\nset password secret-of-pc-1\n"
                    "sanboot iscsi:10.0.0.1::::iqn.2026-11.org.example:chap\n")
    open_ = render(files, f"boot.ipxe-{MAC2}")[0].decode()
    assert "username" not in open_ and "password" not in open_ and "example:open" in open_
