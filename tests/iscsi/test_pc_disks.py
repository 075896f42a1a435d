"""PCs on images (issue 13): a target per PC from `clients[]`, served over TCP by the real service in this
process, driven by a small initiator (pc_session.py): its ACL, the modes, the power-on reset at login
(`pcboot/<mac>` as the bus delivers it, in ctx.pcboot), quota and soft threshold, the thin-provisioning
pages, and the disk closed when the PC's last session ends."""

from __future__ import annotations

import asyncio
import os
import struct
import threading

import pytest

import support
from tests.iscsi.pc_session import SYNC10, LoginRefused, PcSession
from services.iscsi_target.login import AUTH_FAILURE, AUTHZ_FAILURE
from services.iscsi_target.service import IscsiTargetService
from shared import events as bus
from shared.config.loader import config_from_dict
from shared.images.store import ImageStore
from shared.service import ServiceContext

MB = 1 << 20
PREFIX = "iqn.2026-12.org.bootfleet"
MAC = {"pc1": "52:54:00:00:00:01", "pc2": "52:54:00:00:00:02", "pc3": "52:54:00:00:00:03"}


def target(pc, image="win10"):
    return f"{PREFIX}:{image}.{pc}"


def initiator(pc):
    return f"{PREFIX}:pc.{pc}"


class Running:
    """The iSCSI service in a thread of this process (its own asyncio loop), on an image store in tmp."""

    def __init__(self, tmp, clients, images=None, size=8 * MB):
        self.tmp, self.port = tmp, support.free_port()
        self.store = ImageStore.for_state_dir(tmp)
        self.base = os.urandom(size)  # the version's data: reads of untouched granules must give it
        src = tmp / "base.raw"
        src.write_bytes(self.base)
        self.store.import_file("win10", src)
        self.events: list = []
        self.ctx = ServiceContext("iscsi_target", 0, tmp, lambda t, f: self.events.append((t, f)))
        self.svc = IscsiTargetService(self.ctx)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.svc.start(self.config(clients, images)))

    def config(self, clients, images=None):
        return config_from_dict({
            "iscsi": {"portals": [{"ip": "127.0.0.1", "port": self.port}], "io_stats_interval": 0},
            "images": images or [{"name": "win10"}],
            "clients": [{"mac": MAC[pc], "name": pc, "image": "win10", **extra} for pc, extra in clients.items()]})

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def session(self, pc, isid=0x800000000001, name=None) -> PcSession:
        return PcSession(self.port, target(pc), name or initiator(pc), isid)

    def power_on(self, pc, boot, version=1):
        self.ctx.pcboot[MAC[pc]] = {"image": "win10", "version": version, "boot": boot, "mode": "discard"}

    def of(self, kind):
        return [f for t, f in self.events if t == kind]

    def disk(self, pc):
        return self.svc.pcs.find(target(pc))

    def stop(self):
        if not self.thread.is_alive():
            return
        self.call(self.svc.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def running(tmp_path):
    made = []

    def make(clients, images=None, size=8 * MB):
        r = Running(tmp_path, clients, images, size)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def closed(r, pc):
    return lambda: r.disk(pc).sessions == 0 and r.disk(pc).lu is None


# ---------------------------------------------------------------------------------------------- access
def test_only_the_pc_itself_may_log_in(running):
    r = running({"pc1": {}, "pc2": {"ip": "127.0.0.1"}})
    with pytest.raises(LoginRefused) as info:
        r.session("pc1", name="iqn.2010-04.org.ipxe:00000000-0000-0000-0000-000000000000")
    assert info.value.status == AUTHZ_FAILURE
    with pytest.raises(LoginRefused):
        r.session("pc1", name=initiator("pc2"))  # another PC's name
    s = r.session("pc1")  # its own initiator name (DHCP option 203)
    assert s.read(0, 8) == r.base[:4096]
    s.logout()
    s = r.session("pc2", name="iqn.1991-05.com.microsoft:whatever")  # any name from the PC's own address
    s.logout()
    failed = support.wait_for(lambda: r.of(bus.ISCSI_LOGIN_FAILED), 5)
    assert "is not PC pc1" in failed[0]["reason"]
    # the PC's sessions are filed under its MAC (no DHCP lease here); a stranger's refusal is not
    logins = support.wait_for(lambda: [f for f in r.of(bus.ISCSI_LOGIN) if f["target"] == target("pc1")], 5)
    assert logins[0]["mac"] == MAC["pc1"] and "mac" not in failed[0]


def test_refuse_mode_refuses_the_login(running):
    r = running({"pc1": {"mode": "refuse"}})
    with pytest.raises(LoginRefused) as info:
        r.session("pc1")
    assert info.value.status == AUTH_FAILURE
    assert "mode refuse" in support.wait_for(lambda: r.of(bus.ISCSI_LOGIN_FAILED), 5)[0]["reason"]


def test_readonly_mode_reads_the_version_and_refuses_writes(running):
    r = running({"pc1": {"mode": "readonly"}})
    s = r.session("pc1")
    assert s.read(16, 16) == r.base[16 * 512:32 * 512]
    assert s.write(16, b"x" * 4096) == (2, (0x07, 0x27, 0x00))  # DATA PROTECT, WRITE PROTECTED
    assert s.read(16, 16) == r.base[16 * 512:32 * 512]
    s.logout()
    assert not (r.tmp / "images/win10/overlays/pc1.bitmap").exists()


# ---------------------------------------------------------------------------------------------- the disk
def test_the_disk_opens_at_login_and_closes_with_the_last_session(running):
    r = running({"pc1": {"mode": "persistent"}})
    assert r.disk("pc1").lu is None  # nothing open before the PC logs in
    a = r.session("pc1")
    b = r.session("pc1", isid=0x800000000002)  # iPXE's session and the OS's, side by side
    assert a.write(0, b"A" * 4096) == (0, None)
    assert r.store.overlay_in_use("win10", "pc1")
    a.logout()
    assert b.read(0, 8) == b"A" * 4096  # still open for the other session
    b.logout()
    assert support.wait_for(closed(r, "pc1"), 5)
    assert not r.store.overlay_in_use("win10", "pc1")  # publish / client reset may take it now
    c = r.session("pc1")
    assert c.read(0, 8) == b"A" * 4096 and c.read(8, 8) == r.base[4096:8192]
    c.logout()


def test_thin_provisioning_pages_of_an_overlay_lun(running):
    r = running({"pc1": {}})
    s = r.session("pc1")
    status, _, b0 = s.command(bytes([0x12, 1, 0xB0, 0, 0x40, 0]), 0x40)
    assert status == 0 and struct.unpack_from(">I", b0, 28)[0] == 8  # OPTIMAL UNMAP GRANULARITY: 4 KiB / 512
    status, _, b2 = s.command(bytes([0x12, 1, 0xB2, 0, 8, 0]), 8)
    assert b2[5] & 0xE4 == 0xE4 and b2[6] & 0x07 == 2  # LBPU LBPWS LBPWS10 LBPRZ; thin provisioned
    status, _, cap = s.command(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2), 32)
    assert cap[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    s.logout()


# ---------------------------------------------------------------------------------------------- power-on
def test_a_discard_overlay_is_emptied_at_a_new_power_on_not_at_a_login(running):
    r = running({"pc1": {}, "pc2": {"mode": "persistent"}})
    for pc in ("pc1", "pc2"):
        r.power_on(pc, boot=1)
        s = r.session(pc)
        assert s.write(100, pc.encode() * 1365 + b"x") == (0, None)
        s.logout()
        assert support.wait_for(closed(r, pc), 5)
        s = r.session(pc)  # the same power-on: iPXE logged out, the OS logs in: every write is there
        assert s.read(100, 8) == pc.encode() * 1365 + b"x"
        s.logout()
        assert support.wait_for(closed(r, pc), 5)
    resets = len(r.of(bus.IMAGE_OVERLAY_RESET))
    for pc in ("pc1", "pc2"):
        r.power_on(pc, boot=2)
        s = r.session(pc)
        got = s.read(100, 8)
        s.logout()
        assert support.wait_for(closed(r, pc), 5)
        if pc == "pc1":
            assert got == r.base[100 * 512:108 * 512]  # discard: clean again, the version's data
        else:
            assert got == b"pc2" * 1365 + b"x"  # persistent: kept
    reset = r.of(bus.IMAGE_OVERLAY_RESET)[resets:]
    assert reset == [{"mac": MAC["pc1"], "pc": "pc1", "image": "win10", "version": 1, "reason": "power-on"}]


def test_a_restarted_target_does_not_take_a_reconnection_for_a_power_on(running, tmp_path):
    r = running({"pc1": {}})
    r.power_on("pc1", boot=5)
    s = r.session("pc1")
    s.write(0, b"k" * 4096)
    s.command(SYNC10)
    s.close()  # the connection drops; the process goes away
    r.stop()
    r2 = Running.__new__(Running)  # a new process over the same state: same store, same pcboot
    r2.tmp, r2.port, r2.store, r2.base, r2.events = tmp_path, support.free_port(), r.store, r.base, []
    r2.ctx = ServiceContext("iscsi_target", 0, tmp_path, lambda t, f: r2.events.append((t, f)))
    r2.ctx.pcboot = dict(r.ctx.pcboot)
    r2.svc = IscsiTargetService(r2.ctx)
    r2.loop = asyncio.new_event_loop()
    r2.thread = threading.Thread(target=r2.loop.run_forever, daemon=True)
    r2.thread.start()
    try:
        r2.call(r2.svc.start(r2.config({"pc1": {}})))
        s = r2.session("pc1")
        assert s.read(0, 8) == b"k" * 4096
        s.logout()
        assert not r2.of(bus.IMAGE_OVERLAY_RESET)
    finally:
        r2.stop()


def test_a_new_power_on_closes_its_dead_sessions_but_one_of_the_same_power_on_is_never_reset_under(running):
    r = running({"pc1": {}, "pc2": {"mode": "persistent"}})
    r.power_on("pc1", boot=1)
    old = r.session("pc1", isid=0x800000000001)
    old.write(0, b"o" * 4096)
    assert len(r.of(bus.IMAGE_OVERLAY_RESET)) == 1  # its first power-on: an empty overlay on version 1
    # the same power-on, the first session still logged in (iPXE's, then the OS's): both see every write
    other = r.session("pc1", isid=0x800000000002)
    assert other.read(0, 8) == b"o" * 4096 and old.read(0, 8) == b"o" * 4096
    other.logout()
    # a hard reset: the PC powers on again while its old session looks alive (its TCP connection is dead but
    # not yet noticed). A login of the newer power-on proves it dead: it is closed, then the overlay reset
    r.power_on("pc1", boot=2)
    new = r.session("pc1", isid=0x800000000003)
    assert new.read(0, 8) == r.base[:4096]
    assert len(r.of(bus.IMAGE_OVERLAY_RESET)) == 2
    with pytest.raises(ConnectionError):
        old.read(0, 8)
    assert any(f["tsih"] and "powered on again (boot 2)" in f["reason"] for f in r.of(bus.ISCSI_LOGOUT)), \
        r.of(bus.ISCSI_LOGOUT)
    assert r.disk("pc1").sessions == 1
    # a new power-on whose login reinstates the only session (same ISID): that session is being replaced
    new.write(8, b"n" * 512)
    r.power_on("pc1", boot=3)
    again = r.session("pc1", isid=0x800000000003)
    assert again.read(0, 9) == r.base[:9 * 512]
    assert len(r.of(bus.IMAGE_OVERLAY_RESET)) == 3
    again.logout()
    assert support.wait_for(closed(r, "pc1"), 5)
    old.close()
    new.close()
    # persistent: the dead session is closed as well, the overlay kept
    r.power_on("pc2", boot=1)
    p_old = r.session("pc2", isid=0x800000000001)
    p_old.write(0, b"p" * 512)
    r.power_on("pc2", boot=2)
    p_new = r.session("pc2", isid=0x800000000002)
    assert p_new.read(0, 1) == b"p" * 512
    with pytest.raises(ConnectionError):
        p_old.read(0, 1)
    p_new.logout()
    p_old.close()


# ---------------------------------------------------------------------------------------------- space
def test_quota_threshold_then_data_protect_while_another_pc_goes_on(running):
    images = [{"name": "win10", "quota": "256KiB", "soft_threshold": 50}]
    r = running({"pc1": {}, "pc2": {}}, images)
    full, other = r.session("pc1"), r.session("pc2")
    sense_seen, written = [], 0
    for i in range(80):  # 4 KiB granules; the quota holds 64 of them
        status, sense = full.write(i * 8, bytes([i]) * 4096)
        if status == 2 and sense[0] == 0x06:  # the unit attention comes first, the next write goes on
            sense_seen.append(sense)
            status, sense = full.write(i * 8, bytes([i]) * 4096)
        if status:
            break
        written += 1
    assert sense_seen == [(0x06, 0x38, 0x07)]  # THIN PROVISIONING SOFT THRESHOLD REACHED, once
    assert written == 64 and (status, sense) == (2, (0x07, 0x27, 0x07))  # SPACE ALLOCATION FAILED WRITE PROTECT
    # nothing of the refused write was stored; rewriting owned granules needs no space
    assert full.read(64 * 8, 8) == r.base[64 * 4096:65 * 4096]
    assert full.write(0, b"z" * 4096) == (0, None)
    for i in range(16):
        assert other.write(i * 8, b"p" * 4096) == (0, None)  # pc2's overlay has its own quota
    assert other.read(0, 8) == b"p" * 4096
    threshold, reached = r.of(bus.IMAGE_QUOTA_THRESHOLD), r.of(bus.IMAGE_QUOTA_REACHED)
    assert threshold == [{"mac": MAC["pc1"], "pc": "pc1", "image": "win10", "used": 128 << 10, "quota": 256 << 10}]
    assert reached == [{"mac": MAC["pc1"], "pc": "pc1", "image": "win10", "used": 256 << 10, "quota": 256 << 10,
                        "reason": "quota"}]
    full.logout()
    other.logout()


def test_a_new_quota_applies_to_a_logged_in_pc_at_once(running):
    images = [{"name": "win10", "quota": "64KiB", "soft_threshold": 100}]  # the threshold is the quota itself
    r = running({"pc1": {}}, images)
    s = r.session("pc1")
    attentions = []

    def write(granule, byte=b"q"):
        status, sense = s.write(granule * 8, byte * 4096)
        if status == 2 and sense[0] == 0x06:  # a unit attention comes first; the command is then retried
            attentions.append(sense)
            status, sense = s.write(granule * 8, byte * 4096)
        return status, sense

    for i in range(16):  # the quota: 16 granules of 4 KiB
        assert write(i) == (0, None)
    assert write(16) == (2, (0x07, 0x27, 0x07))  # SPACE ALLOCATION FAILED WRITE PROTECT
    assert attentions == [(0x06, 0x38, 0x07)]  # the 100% threshold, crossed by the 16th write
    # raised while the PC runs, the threshold (20% of 256 KiB) already passed: no new attention (crossed)
    r.call(r.svc.apply(r.config({"pc1": {}}, [{"name": "win10", "quota": "256KiB", "soft_threshold": 20}])))
    assert write(16) == (0, None)
    assert s.read(16 * 8, 8) == b"q" * 4096
    # raised to a threshold above what it holds, then lowered below it again: the attention comes anew
    r.call(r.svc.apply(r.config({"pc1": {}}, [{"name": "win10", "quota": "1MiB", "soft_threshold": 50}])))
    assert write(17) == (0, None) and len(attentions) == 1
    r.call(r.svc.apply(r.config({"pc1": {}}, [{"name": "win10", "quota": "1MiB", "soft_threshold": 5}])))
    assert write(18) == (0, None)
    assert attentions == [(0x06, 0x38, 0x07)] * 2
    assert [t["quota"] for t in r.of(bus.IMAGE_QUOTA_THRESHOLD)] == [64 << 10, 1 << 20]
    # lowered below what it holds: writes into new granules fail, rewrites of its own granules do not
    r.call(r.svc.apply(r.config({"pc1": {}}, images)))
    assert write(19) == (2, (0x07, 0x27, 0x07))
    assert write(0, b"r") == (0, None)
    s.logout()


def test_the_stores_free_space_reserve_refuses_writes_with_the_same_sense(running, tmp_path):
    r = running({"pc1": {}})
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    config = r.config({"pc1": {}})
    r.call(r.svc.apply(config.model_copy(update={"image_store": config.image_store.model_copy(
        update={"reserve": free + (1 << 30)})})))  # more than is free: no overlay may grow
    s = r.session("pc1")
    assert s.write(0, b"r" * 4096) == (2, (0x07, 0x27, 0x07))
    assert s.read(0, 8) == r.base[:4096]
    s.logout()
    reached = support.wait_for(lambda: r.of(bus.IMAGE_QUOTA_REACHED), 5)
    assert reached[0]["reason"] == "reserve" and reached[0]["quota"] is None


def test_a_new_mode_applies_when_the_disk_next_opens(running):
    r = running({"pc1": {"mode": "persistent"}})
    s = r.session("pc1")
    assert s.write(0, b"m" * 4096) == (0, None)
    r.call(r.svc.apply(r.config({"pc1": {"mode": "readonly"}})))
    assert s.write(8, b"m" * 4096) == (0, None)  # the open disk keeps its mode while logged in
    s.logout()
    assert support.wait_for(closed(r, "pc1"), 5)
    s = r.session("pc1")
    assert s.write(0, b"x" * 4096) == (2, (0x07, 0x27, 0x00))
    assert s.read(0, 8) == r.base[:4096]  # readonly: the version itself, not the overlay
    s.logout()
