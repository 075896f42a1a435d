"""The web server's credentials without a server: token file, password hash, sessions and CSRF; the waterfall."""

import os
import stat

import pytest

from services.controller.web import waterfall
from services.controller.web.auth import COOKIE, Auth, check_password, ensure_token, hash_password
from services.controller.web.server import read_only
from shared.config.loader import ConfigError, config_from_dict


def test_token_file_is_made_once_with_mode_0600(tmp_path):
    token = ensure_token(tmp_path)
    path = tmp_path / "web-token"
    assert len(token) >= 40 and path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_token(tmp_path) == token  # kept across restarts
    os.chmod(path, 0o644)
    ensure_token(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_password_hash_round_trip_and_config_check():
    encoded = hash_password("correct horse", iterations=1000)
    assert check_password("correct horse", encoded) and not check_password("wrong horse", encoded)
    assert not check_password("x", "garbage")
    cfg = config_from_dict({"web": {"password_hash": encoded}})
    assert cfg.web.password_hash == encoded
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"web": {"password_hash": "plain-text-password"}})
    assert "web.password_hash" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"web": {"certificate": "cert.pem"}})
    assert "web" in str(exc.value) and "key" in str(exc.value)
    assert config_from_dict({}).web.address == "127.0.0.1" and config_from_dict({}).web.port == 8080


def test_sessions_need_their_csrf_token_to_act():
    auth = Auth("tok", hash_password("s3cret-pass", iterations=1000), 3600)
    assert auth.login("nope", 0.0) is None
    sid, session = auth.login("s3cret-pass", 0.0)
    cookie = f"other=1; {COOKIE}={sid}"
    assert auth.may_read({"Cookie": cookie}, 10.0)
    assert not auth.may_act({"Cookie": cookie}, 10.0)  # a cross-site form post carries the cookie, not the token
    assert not auth.may_act({"Cookie": cookie, "X-CSRF-Token": "guess"}, 10.0)
    assert auth.may_act({"Cookie": cookie, "X-CSRF-Token": session.csrf}, 10.0)
    assert not auth.may_read({"Cookie": cookie}, 3601.0)  # expired
    assert auth.may_act({"Authorization": "Bearer tok"}, 0.0)
    assert not auth.may_act({"Authorization": "Bearer tok2"}, 0.0)
    assert auth.may_act({"Authorization": "Bearer s3cret-pass"}, 0.0)
    auth.logout(cookie)
    assert not auth.may_read({"Cookie": cookie}, 10.0)


def test_only_list_and_get_commands_are_reads():
    assert read_only("client-list") and read_only("status-get") and read_only("list-commands")
    assert not read_only("service-scale") and not read_only("client-reset") and not read_only("config-set")


STEPS = [
    {"t": 0.0, "step": "DHCP discover", "detail": ""},
    {"t": 0.4, "step": "DHCP ack", "detail": "10.0.0.5"},
    {"t": 0.9, "step": "TFTP file", "detail": "undionly.kpxe"},
    {"t": 1.1, "step": "TFTP file", "detail": "boot.ipxe"},
    {"t": 1.5, "step": "iSCSI login (firmware)", "detail": "iqn.2010-04.org.ipxe:pc1"},
    {"t": 1.6, "step": "first READ", "detail": "t lun 0"},
    {"t": 3.9, "step": "iSCSI login (OS)", "detail": "iqn.1993-08.org.debian:01:pc1"},
]


def test_waterfall_phases_run_from_milestone_to_milestone():
    found = waterfall.phases(STEPS)
    assert [(p.name, p.start, p.end) for p in found] == [
        ("DHCP", 0.0, 0.4), ("TFTP/HTTP", 0.4, 1.1), ("iSCSI login", 1.1, 1.5), ("first READ", 1.5, 1.6), ("OS login", 1.6, 3.9)]
    assert [p.duration for p in found] == [0.4, 0.7, 0.4, 0.1, 2.3]
    svg = waterfall.svg(found)
    assert svg.count('class="phase"') == 5 and 'data-phase="OS login"' in svg and "2.300 s" in svg


def test_waterfall_of_a_boot_still_under_way_and_of_none():
    assert [p.name for p in waterfall.phases(STEPS[:3])] == ["DHCP", "TFTP/HTTP"]
    assert waterfall.phases([]) == [] and "no boot" in waterfall.svg([])
    # HTTP boot: no TFTP step, the script over HTTP
    http = [STEPS[0], STEPS[1], {"t": 0.8, "step": "HTTP file", "detail": "boot.ipxe"}, STEPS[4]]
    assert [p.name for p in waterfall.phases(http)] == ["DHCP", "TFTP/HTTP", "iSCSI login"]


def test_waterfall_in_the_order_things_happened():
    """iPXE given a root-path logs in and reads the disk (attaching it) before it fetches its script, as the lab's
    PCs do (a real timeline of tests/e2e/test_boot.py)."""
    steps = [
        {"t": 0.0, "step": "DHCP discover", "detail": ""},
        {"t": 0.0, "step": "DHCP offer", "detail": "10.77.0.101"},
        {"t": 0.004, "step": "DHCP ack", "detail": "10.77.0.101"},
        {"t": 0.118, "step": "iSCSI login (firmware)", "detail": "iqn.2010-04.org.ipxe:pc0"},
        {"t": 0.121, "step": "first READ", "detail": "iqn.2026-11.org.bootfleet:lab-pc0 lun 0"},
        {"t": 0.13, "step": "TFTP start", "detail": "boot.ipxe"},
        {"t": 0.133, "step": "TFTP file", "detail": "boot.ipxe"},
        {"t": 4.586, "step": "iSCSI logout", "detail": ""},
        {"t": 5.048, "step": "iSCSI login (OS)", "detail": "iqn.2010-04.org.ipxe:pc0"},
        {"t": 5.154, "step": "first READ", "detail": "iqn.2026-11.org.bootfleet:lab-pc0 lun 0"},
        {"t": 6.0, "step": "TFTP file", "detail": "later.cfg"},  # after the OS's login: the OS's, not the firmware's
    ]
    found = waterfall.phases(steps)
    assert [(p.name, p.start, p.end) for p in found] == [
        ("DHCP", 0.0, 0.004), ("iSCSI login", 0.004, 0.118), ("first READ", 0.118, 0.121), ("TFTP/HTTP", 0.121, 0.133),
        ("OS login", 0.133, 5.048)]
    assert found[3].detail == "boot.ipxe"


def test_the_hash_helper_prints_a_hash_the_config_takes(monkeypatch, capsys):
    import io

    from services.controller.web import auth

    monkeypatch.setattr("sys.stdin", io.StringIO("a long passphrase\n"))
    assert auth.main(["hash"]) == 0
    encoded = capsys.readouterr().out.strip()
    assert check_password("a long passphrase", encoded)
    assert config_from_dict({"web": {"password_hash": encoded}}).web.password_hash == encoded
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert auth.main(["hash"]) == 1
    assert auth.main([]) == 2
