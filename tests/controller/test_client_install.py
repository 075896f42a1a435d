"""`client-install` (issue 14): the ISO's CD/DVD target and the PC's one-shot `install` in one revision, the
sanhook + sanboot script it renders, and the setting gone once the PC fetched that script; and `lun-resync`'s
refusals, which the controller answers without asking the iSCSI target."""

import pytest

from services.controller.commands import ERROR, SUCCESS, dispatch
from services.controller.io_loop import Controller
from shared.boot import ipxe_script

MAC = "52:54:00:00:00:0a"
DISK = "iqn.2026-11.org.test:pc0"


@pytest.fixture
def controller(tmp_path):
    c = Controller(tmp_path / "state", None)
    assert dispatch(c.facade, [], "config-apply", {"config": {
        "boot": {"keep_san": True, "server": None},
        "clients": [{"mac": MAC, "target": DISK}, {"mac": "52:54:00:00:00:0b", "ip": "10.0.0.9"}],
        "iscsi": {"targets": [{"name": DISK, "luns": [{"id": 0, "backstore": {"type": "ram", "size": "1MiB"}},
                                                      {"id": 2, "backstore": {"type": "mirror", "legs": [
                                                          {"type": "ram", "size": "1MiB"},
                                                          {"type": "ram", "size": "1MiB"}]}}]}]}}})["result"] == SUCCESS
    yield c
    c.close()


def test_client_install_then_the_script_fetch_clears_it(controller, tmp_path):
    iso = tmp_path / "Debian 12 Net Install.iso"
    iso.write_bytes(b"\0" * 4096)
    answer = dispatch(controller.facade, [], "client-install", {"mac": MAC, "iso": str(iso)})
    assert answer["result"] == SUCCESS, answer
    iqn = "iqn.2026-12.org.bootfleet:iso.debian-12-net-install"
    assert answer["arguments"]["target"] == iqn
    config = controller.config
    cd = next(t for t in config.iscsi.targets if t.name == iqn)
    assert cd.luns[0].backstore.type == "cdrom" and cd.luns[0].backstore.path == str(iso)
    script = ipxe_script(config, "10.0.0.1", MAC).splitlines()
    assert script[:4] == ["#!ipxe", "set keep-san 1",
                          f"iseq ${{root-path}} iscsi:10.0.0.1::::{DISK} || sanhook --drive 0x80 iscsi:10.0.0.1::::{DISK} || goto failed",
                          f"sanboot --drive 0x81 iscsi:10.0.0.1::::{iqn} || goto failed"], script
    revision = controller.store.revision
    # another PC's fetch, or another file, changes nothing; this PC's fetch of boot.ipxe ends the one-shot
    controller._observe({"type": "tftp.transfer.finished", "fields": {"file": "boot.ipxe", "mac": "52:54:00:00:00:0b",
                                                                      "ip": "10.0.0.9"}, "ts": 1.0})
    controller._observe({"type": "tftp.transfer.finished", "fields": {"file": "undionly.kpxe", "mac": MAC}, "ts": 1.0})
    controller._observe({"type": "http.transfer.finished", "fields": {"file": "/vmlinuz", "mac": MAC}, "ts": 1.0})
    assert next(c for c in controller.config.clients if c.mac == MAC).install == iqn
    controller._observe({"type": "tftp.transfer.finished", "fields": {"file": "boot.ipxe", "mac": MAC, "ip": "10.0.0.5"},
                         "ts": 2.0})
    assert next(c for c in controller.config.clients if c.mac == MAC).install is None
    assert controller.store.revision == revision + 1
    assert ipxe_script(controller.config, "10.0.0.1", MAC).splitlines()[-1] == f"sanboot iscsi:10.0.0.1::::{DISK}"
    assert any(t.name == iqn for t in controller.config.iscsi.targets)  # the disc stays for the next install


def test_client_install_refusals(controller, tmp_path):
    missing = dispatch(controller.facade, [], "client-install", {"mac": MAC, "iso": str(tmp_path / "nope.iso")})
    assert missing["result"] == ERROR and "nope.iso: no such file" in missing["text"]
    iso = tmp_path / "a.iso"
    iso.write_bytes(b"\0")
    no_disk = dispatch(controller.facade, [], "client-install", {"mac": "52:54:00:00:00:0b", "iso": str(iso)})
    assert no_disk["result"] == ERROR and "has no disk to install onto" in no_disk["text"]


def test_lun_resync_refusals_and_the_ask(controller):
    for args, text in (({"target": DISK, "lun": 0}, f"{DISK} LUN 0 is a ram LUN, not a mirror"),
                       ({"target": DISK, "lun": 7}, f"{DISK} has no LUN 7"),
                       ({"target": "iqn.2026-11.org.test:nope", "lun": 0}, "no target iqn.2026-11.org.test:nope"),
                       ({"target": DISK, "lun": "x"}, "lun must be a number")):
        answer = dispatch(controller.facade, [], "lun-resync", args)
        assert answer["result"] == ERROR and text in answer["text"], answer
    assert dispatch(controller.facade, [b"cli"], "lun-resync", {"target": DISK, "lun": 2, "op": "abc"}) is None
    keys = [k for k in controller.clone.store if k.startswith("command/iscsi_target/")]
    assert controller.clone.get(keys[0]) ["args"] == {"target": DISK, "lun": 2, "op": "abc"}
    assert controller.waiters.matched({"type": "operation.progress", "fields": {"op": "other", "done": 0}}) == []
    [(envelope, answer)] = controller.waiters.matched(
        {"type": "operation.progress", "fields": {"op": "abc", "name": "lun-resync", "done": 0, "total": 1 << 20}})
    assert envelope == [b"cli"] and answer["result"] == SUCCESS and answer["arguments"]["op"] == "abc"
