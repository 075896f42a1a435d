"""The image commands and the controller's decisions about PCs on images, through the command handlers and
the controller's own event path (no running loop, no services): power-on -> pcboot keys, sessions, publish,
rollback, prune safety, reset, verify, import and export with real qemu-img, and the keys across a restart."""

from __future__ import annotations

import subprocess
import time

import pytest

from services.controller.commands import EMPTY, SUCCESS, dispatch
from services.controller.io_loop import Controller
from services.controller.pcboot import BOOT_GAP
from services.iscsi_target.scsi.overlay import Overlay
from shared.boot import pc_target_iqn

A, B, S = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:05"
MIB = 1 << 20


class Harness:
    """A controller without its loop: handlers are dispatched, the image lane is waited for and finished,
    events are fed as the loop feeds them."""

    def __init__(self, state):
        self.c = Controller(state, None)
        self.answers: list[tuple[list[bytes], dict]] = []
        self.c.reply = lambda envelope, answer: self.answers.append((envelope, answer))
        self.t = time.time()

    def call(self, command, **args):
        answer = dispatch(self.c.facade, [b"cli"], command, args)
        if answer is None:
            self.drain()
            for envelope, a in self.answers:
                if envelope == [b"cli"]:
                    self.answers.remove((envelope, a))
                    return a
            raise AssertionError(f"{command}: no answer")
        if answer["arguments"].get("op"):
            self.drain()
        return answer

    def drain(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while self.c.pending:
            assert time.monotonic() < deadline, "the image lane did not finish"
            for _, future, _ in list(self.c.pending):
                future.exception(timeout=max(0.0, deadline - time.monotonic()))
            self.c._file_posted()  # as the loop: progress first, then the end
            self.c._finish_pending()

    def event(self, type, fields, dt=0.5, instance=0, service="x"):
        self.t += dt
        self.c._observe({"type": type, "fields": fields, "ts": self.t, "instance": instance, "service": service})
        self.c.pcboot.flush()

    def events(self, type):
        return [e for e in self.c.events.query(type=type, limit=1000)]

    def key(self, mac):
        return self.c.clone.get(f"pcboot/{mac}")

    def target(self, mac):
        return next(pc_target_iqn(self.c.config, cl) for cl in self.c.config.clients if cl.mac == mac)

    def login(self, mac, tsih):
        self.event("iscsi.login", {"ip": "10.0.0.9", "initiator": "i", "target": self.target(mac), "tsih": tsih,
                                   "session_type": "Normal"})

    def logout(self, mac, tsih):
        self.event("iscsi.logout", {"ip": "10.0.0.9", "initiator": "i", "target": self.target(mac), "tsih": tsih,
                                    "reason": "logout"})

    def discover(self, mac, dt=0.5):
        self.event("dhcp.discover", {"mac": mac, "client_class": "ipxe", "arch": 0}, dt=dt)

    def write(self, name, pc, offset, data):
        plan = self.c.images.disk_for(name, pc)
        ov = Overlay(str(plan.version_path), str(plan.overlay_path), base_id=plan.base_id)
        try:
            ov.write(offset, data)
            ov.sync()
        finally:
            ov.close()


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path / "state")
    yield harness
    harness.c.close()


def test_create_assign_and_what_clients_show(h):
    answer = h.call("image-create", name="win10", size="8M")
    assert answer["result"] == SUCCESS, answer
    assert answer["arguments"]["version"] == 1 and answer["arguments"]["revision"] == 2
    assert [i.name for i in h.c.config.images] == ["win10"]
    assert h.call("image-create", name="win10", size="8M")["result"] == 1  # exists
    assert h.call("image-create", name="Bad Name", size="8M")["result"] == 1

    answer = h.call("client-assign", mac=A, image="win10", name="pc-a")
    assert answer["result"] == SUCCESS, answer
    assert answer["arguments"]["target"] == "iqn.2026-12.org.bootfleet:win10.pc-a"
    assert h.key(A) == {"image": "win10", "version": 1, "boot": 1, "mode": "discard"}
    row = next(c for c in h.call("client-list")["arguments"]["clients"] if c["mac"] == A)
    assert (row["image"], row["version"], row["mode"], row["target"], row["overlay"]) == \
        ("win10", 1, "discard", "iqn.2026-12.org.bootfleet:win10.pc-a", 0)
    assert h.call("client-get", mac=A)["arguments"]["client"]["target"] == "iqn.2026-12.org.bootfleet:win10.pc-a"

    # a second super PC is refused naming the first; target and image together are refused
    assert h.call("client-assign", mac=S, image="win10", mode="super", name="teacher")["result"] == SUCCESS
    refused = h.call("client-assign", mac=B, image="win10", mode="super")
    assert refused["result"] == 1 and "teacher is already the super client of image win10" in refused["text"]
    assert h.call("client-assign", mac=B, image="win10", target="iqn.2026-11.org.x:t")["result"] == 1
    listed = h.call("image-list")["arguments"]["images"]
    assert listed == [{"name": "win10", "mode": "discard", "configured": True, "in_store": True, "pcs": 2,
                       "size": 8 * MIB, "current": 1, "versions": [1], "keep_versions": 3,
                       "disk_usage": listed[0]["disk_usage"]}]


def test_power_on_is_a_firmware_signal_never_a_login(h):
    h.call("image-create", name="win10", size="8M")
    h.call("client-assign", mac=A, image="win10", name="pc-a")
    assert h.key(A)["boot"] == 1
    h.discover(A, dt=BOOT_GAP + 1)  # after silence: power-on
    assert h.key(A)["boot"] == 2
    h.discover(A)  # a retransmission, or iPXE after the PXE ROM: the same boot
    assert h.key(A)["boot"] == 2
    h.login(A, 1)
    h.logout(A, 1)  # iPXE hands over
    h.login(A, 2)  # the OS logs in: no new boot
    h.logout(A, 2)
    h.login(A, 3)  # a reconnection after a blip: no new boot
    assert h.key(A)["boot"] == 2 and h.c.pcboot.logged_in(A)
    h.discover(A)  # the firmware DHCPs again after this boot logged in: a reboot, even seconds later
    assert h.key(A)["boot"] == 3
    # the script fetch counts when no discover was seen (a second fetch in one boot is a reboot)
    h.event("tftp.transfer.finished", {"ip": "10.0.0.9", "mac": A, "file": "boot.ipxe"})
    assert h.key(A)["boot"] == 3
    h.event("tftp.transfer.finished", {"ip": "10.0.0.9", "mac": A, "file": "boot.ipxe"})
    assert h.key(A)["boot"] == 4
    h.event("tftp.transfer.finished", {"ip": "10.0.0.9", "mac": A, "file": "undionly.kpxe"})
    assert h.key(A)["boot"] == 4
    # a restarted iSCSI process has no sessions left
    h.event("service.started", {"pid": 1}, instance=0, service="iscsi_target")
    assert not h.c.pcboot.logged_in(A)


def test_reset_publish_rollback_prune_verify(h):
    h.call("image-create", name="win10", size="8M")
    h.call("config-set", path="images[0].keep_versions", value=1)
    h.call("client-assign", mac=A, image="win10", name="pc-a")
    h.call("client-assign", mac=B, image="win10", name="pc-b", mode="persistent")
    h.call("client-assign", mac=S, image="win10", name="teacher", mode="super")
    digest1 = h.call("image-info", name="win10")["arguments"]["image"]["versions"][0]["digest"]

    # client reset: refused while logged in; then the overlay goes and an event says so
    h.write("win10", "pc-b", 4096, b"b" * 4096)
    h.login(B, 7)
    refused = h.call("client-reset", mac=B)
    assert refused["result"] == 1 and "logged in" in refused["text"]
    h.logout(B, 7)
    boot = h.key(B)["boot"]
    answer = h.call("client-reset", mac=B)
    assert answer["result"] == SUCCESS and answer["arguments"]["had_overlay"], answer
    assert h.key(B)["boot"] == boot + 1
    [reset] = h.events("image.overlay.reset")
    assert reset["fields"] == {"mac": B, "pc": "pc-b", "image": "win10", "version": 1, "reason": "operator"}

    # the persistent PC writes on version 1, the discard PC runs version 1, the super PC writes a marker
    h.write("win10", "pc-b", 0, b"p" * 512)
    h.discover(A, dt=BOOT_GAP + 1)
    h.login(A, 1)
    h.write("win10", "teacher", 1 << 20, b"M" * 4096)
    h.login(S, 3)
    refused = h.call("image-publish", name="win10")
    assert refused["result"] == 1 and "teacher" in refused["text"] and "logged in" in refused["text"]
    h.logout(S, 3)
    answer = h.call("image-publish", name="win10", op="op-pub")
    assert answer["result"] == SUCCESS and answer["arguments"]["op"] == "op-pub", answer
    [finished] = h.events("operation.finished")
    assert finished["fields"]["ok"] and finished["fields"]["op"] == "op-pub", finished
    progress = h.events("operation.progress")
    assert progress and progress[0]["fields"]["done"] == 0 and progress[-1]["id"] < finished["id"], progress
    assert progress[-1]["fields"] == {"op": "op-pub", "name": "image-publish", "done": 100, "total": 100, "unit": "%"}
    [published] = h.events("image.version.published")
    assert published["fields"]["version"] == 2 and published["fields"]["pc"] == "teacher"
    info = h.call("image-info", name="win10")["arguments"]["image"]
    assert info["current"] == 2
    pcs = {p["pc"]: p for p in info["pcs"]}
    # the running discard PC keeps version 1; the persistent one stays on its overlay's; the super PC moves on
    assert pcs["pc-a"]["version"] == 1 and pcs["pc-a"]["sessions"] == 1
    assert h.key(S)["version"] == 2
    with open(h.c.images.version_path("win10", 2), "rb") as f:
        f.seek(1 << 20)
        assert f.read(4096) == b"M" * 4096

    # prune (keep 1) keeps version 1: the running discard PC and the persistent PC's overlay use it
    answer = h.call("image-prune", name="win10")
    assert answer["result"] == SUCCESS and answer["arguments"]["deleted"] == [], answer
    assert 1 in answer["arguments"]["in_use"]
    h.discover(A)  # pc-a reboots: now on version 2
    assert h.key(A)["version"] == 2
    h.call("client-reset", mac=B)  # the persistent PC starts over on the current version
    answer = h.call("image-prune", name="win10")
    assert answer["arguments"]["deleted"] == [1] and answer["arguments"]["versions"] == [2], answer

    h.call("image-create", name="other", size="1M")
    answer = h.call("image-rollback", name="win10", version=1)
    assert answer["result"] == 1  # gone
    h.write("win10", "teacher", 0, b"3" * 512)
    h.call("image-publish", name="win10")
    h.discover(A, dt=BOOT_GAP + 1)
    assert h.key(A)["version"] == 3
    assert h.call("image-rollback", name="win10", version=2)["result"] == SUCCESS
    assert [e["fields"] for e in h.events("image.rollback")] == [{"image": "win10", "version": 2}]
    assert h.key(A)["version"] == 3  # running: its key says what it booted, until its next power-on
    h.discover(A, dt=BOOT_GAP + 1)
    assert h.key(A)["version"] == 2

    answer = h.call("image-verify", name="win10", op="op-ver")
    assert answer["result"] == SUCCESS
    fin = [e for e in h.events("operation.finished") if e["fields"]["op"] == "op-ver"]
    assert fin and fin[0]["fields"]["ok"], fin
    assert h.call("image-info", name="win10")["arguments"]["image"]["verified"]["ok"]
    assert digest1  # version 1 was pruned; its digest was recorded at create


def test_keys_and_counters_survive_a_controller_restart(tmp_path):
    h = Harness(tmp_path / "state")
    h.call("image-create", name="win10", size="1M")
    h.call("client-assign", mac=A, image="win10", name="pc-a")
    h.discover(A, dt=BOOT_GAP + 1)
    key = h.key(A)
    h.c.close()
    again = Harness(tmp_path / "state")
    try:
        assert again.key(A) == key
        again.discover(A, dt=BOOT_GAP + 1)
        assert again.key(A)["boot"] == key["boot"] + 1
    finally:
        again.c.close()


def _qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_import_and_export_through_qemu_img(h, tmp_path):
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(MIB)
        f.write(b"golden" * 1000)
    qcow = tmp_path / "src.qcow2"
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    assert h.call("image-import", name="gold", file="relative.qcow2")["result"] == 1
    answer = h.call("image-import", name="gold", file=str(qcow), op="op-imp")
    assert answer["result"] == SUCCESS, answer
    fin = [e["fields"] for e in h.events("operation.finished") if e["fields"]["op"] == "op-imp"]
    assert fin and fin[0]["ok"], fin
    assert [i.name for i in h.c.config.images] == ["gold"]
    out = tmp_path / "out.vhd"
    answer = h.call("image-export", name="gold", file=str(out), format="vpc", op="op-exp")
    assert answer["result"] == SUCCESS
    fin = [e["fields"] for e in h.events("operation.finished") if e["fields"]["op"] == "op-exp"]
    assert fin and fin[0]["ok"], fin
    subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(out), str(raw)], check=True,
                   capture_output=True)
    assert h.call("image-export", name="gold", file=str(out))["result"] == 1  # exists
    assert h.call("image-info", name="nope")["result"] == 1
    assert h.call("image-list")["result"] == SUCCESS


def test_no_images_is_empty(h):
    assert h.call("image-list")["result"] == EMPTY


def test_a_change_for_a_logged_in_pc_waits_for_its_next_power_on(h):
    h.call("image-create", name="win10", size="1M")
    h.call("client-assign", mac=A, image="win10", name="pc-a", mode="persistent")
    h.discover(A, dt=BOOT_GAP + 1)
    h.login(A, 1)
    key = h.key(A)
    answer = h.call("client-assign", mac=A, mode="discard")
    assert answer["result"] == SUCCESS and "next power-on" in answer["text"], answer
    assert h.key(A) == key  # its disk is not switched under its session
    h.discover(A)  # it reboots
    assert h.key(A) == {**key, "mode": "discard", "boot": key["boot"] + 1}
    # off: a revision changes its key at once; off the image: no key
    h.logout(A, 1)
    h.call("config-set", path="clients[0].mode", value="readonly")
    assert h.key(A)["mode"] == "readonly" and h.key(A)["boot"] == key["boot"] + 2
    h.call("config-set", path="clients", value=[])
    assert h.key(A) is None
