"""services/iscsi_target/media.py: mirrors opened from their config (which legs start out of sync, the state
file across restarts, a resync onto a recreated file), block and cdrom LUNs built by the service's glue."""

from services.iscsi_target import media
from services.iscsi_target.scsi.mirror import FAILED, IN_SYNC
from shared.config.iscsi import Backstore

MiB = 1 << 20


def mirror_spec(a="legs/a.img", b="legs/b.img"):
    return Backstore(type="mirror", legs=[{"type": "file", "path": a, "size": "4MiB"},
                                          {"type": "file", "path": b, "size": "4MiB"}])


def test_two_new_legs_are_in_sync_and_a_leg_missing_at_start_is_not(tmp_path):
    m = media.open_backstore(mirror_spec(), tmp_path)
    assert m.state == [IN_SYNC, IN_SYNC] and m.size == 4 * MiB
    m.write(MiB, b"k" * 512)
    m.sync()
    m.close()
    (tmp_path / "legs" / "b.img").unlink()  # gone while the service was down
    m = media.open_backstore(mirror_spec(), tmp_path)
    assert m.state == [IN_SYNC, FAILED]  # recreated empty: never served as if it held the data
    assert bytes(m.read(MiB, 512)) == b"k" * 512 and bytes(m.read(MiB, 512)) == b"k" * 512
    m.close()
    m = media.open_backstore(mirror_spec(), tmp_path)  # the state file remembers it across restarts
    assert m.state == [IN_SYNC, FAILED]
    progress = []
    media.resync(m, 1, tmp_path, progress=lambda done, total: progress.append(done))
    assert m.state == [IN_SYNC, IN_SYNC] and progress[-1] == 4 * MiB
    m.close()
    assert (tmp_path / "legs" / "b.img").read_bytes()[MiB:MiB + 512] == b"k" * 512
    assert media.open_backstore(mirror_spec(), tmp_path).state == [IN_SYNC, IN_SYNC]


def test_a_leg_removed_while_serving_is_recreated_by_the_resync(tmp_path):
    failed = []
    events = media.MirrorEvents()
    events.leg_failed = lambda mirror, i, name, reason: failed.append((i, reason))
    media.mirror_events, saved = events, media.mirror_events
    try:
        m = media.open_backstore(mirror_spec(), tmp_path)
        m.write(0, b"z" * 4096)
        (tmp_path / "legs" / "a.img").unlink()
        m.sync()
        assert m.state == [FAILED, IN_SYNC] and failed == [(0, "the file was removed (errno 0)")]
        media.resync(m, 0, tmp_path)
        assert m.state == [IN_SYNC, IN_SYNC]
        assert (tmp_path / "legs" / "a.img").read_bytes()[:4096] == b"z" * 4096
        m.close()
    finally:
        media.mirror_events = saved


def test_change_medium_only_for_a_cdrom(tmp_path):
    assert media.change_medium(None, Backstore(type="cdrom", path="a.iso"), Backstore(type="cdrom", path="b.iso"),
                               tmp_path) is False


def test_the_service_resyncs_a_mirror_lun_on_command(tmp_path):
    import asyncio

    from services.iscsi_target.service import IscsiTargetService
    from shared.config.model import BootfleetConfig
    from shared.service import ServiceContext

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = "iqn.2026-11.org.test:m"
    config = BootfleetConfig(iscsi={"portals": [{"ip": "127.0.0.1", "port": port}], "io_stats_interval": 0,
                                    "targets": [{"name": target, "luns": [{"id": 3, "backstore": mirror_spec().model_dump()}]}]})
    sent = []
    svc = IscsiTargetService(ServiceContext("iscsi_target", 0, tmp_path, lambda t, f: sent.append((t, f))))

    async def scenario():
        await svc.start(config)
        try:
            m = svc.registry.targets[target].scsi.luns[3].store
            m.write(0, b"s" * 4096)
            (tmp_path / "legs" / "b.img").unlink()
            m.sync()
            assert m.state == [IN_SYNC, FAILED]
            dropped = [f for t, f in sent if t == "iscsi.mirror.leg_dropped"]
            assert dropped == [{"target": target, "lun": 3, "leg": 1, "name": str(tmp_path / "legs" / "b.img"),
                                "reason": "the file was removed (errno 0)", "mirror": m.ident}]
            await svc.command("lun-resync", {"target": target, "lun": 3, "op": "0123456789ab"})
            assert m.state == [IN_SYNC, IN_SYNC]
            progress = [f["done"] for t, f in sent if t == "operation.progress"]
            assert progress[0] == 0 and progress[-1] == 4 * MiB and progress == sorted(progress)
            done = [f for t, f in sent if t == "operation.finished"]
            assert len(done) == 1 and done[0]["ok"] and done[0]["op"] == "0123456789ab", done
            assert [f["leg"] for t, f in sent if t == "iscsi.mirror.resynced"] == [1]
            await svc.command("lun-resync", {"target": target, "lun": 2, "op": "x"})
            assert sent[-1] == ("operation.finished", {"op": "x", "name": "lun-resync", "ok": False,
                                                       "text": f"{target} has no LUN 2"})
            assert (tmp_path / "legs" / "b.img").read_bytes()[:4096] == b"s" * 4096
        finally:
            await svc.stop()

    asyncio.run(scenario())
