"""A revision a service cannot apply rides in its heartbeats as a sentence until one applies; the controller's
status shows it as health `failed: <reason>`; the bus checks the field's shape."""

import asyncio
import errno
import socket

import pytest

from services.controller.fleet import ServiceTable
from shared import events
from shared.bus import message as m
from shared.config.loader import config_from_dict
from shared.failures import ListenError, bind, reason
from shared.managed import ManagedRuntime
from shared.service import BaseService


def failing(*errors):
    """A service whose start/apply raise `errors` in turn (None: succeed)."""

    class Flaky(BaseService):
        name = "tftp"
        sections = None
        queue = list(errors)

        async def start(self, config):
            self._next()

        async def apply(self, config):
            self._next()

        def _next(self):
            exc = self.queue.pop(0)
            if exc is not None:
                raise exc

        async def stop(self):
            pass

    return Flaky


def test_the_last_failure_rides_in_the_heartbeat_until_a_revision_applies(tmp_path, monkeypatch):
    monkeypatch.delenv("BOOTFLEET_BUS", raising=False)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", 0))
    port = squatter.getsockname()[1]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(ListenError) as refused:
        bind(probe, "127.0.0.1", port, "TFTP")
    probe.close()
    squatter.close()
    service = failing(refused.value, PermissionError(errno.EACCES, "Permission denied", "images/demo.img"), None, RuntimeError("boom"))
    runtime = ManagedRuntime(service, 0, tmp_path)
    sent = []
    runtime.ctx._emitter = lambda type, fields: sent.append((type, dict(fields)))
    data = config_from_dict({}).model_dump(mode="json")
    beats = []

    async def main():
        runtime.loop = asyncio.get_running_loop()
        for revision in (1, 2, 3, 4):
            await runtime.apply(revision, {**data, "boot": {**data["boot"], "default_lun": revision}})
            beats.append(runtime._beat_info()["failed"])

    asyncio.run(main())
    listen = f"cannot listen on 127.0.0.1:{port}: address in use (another TFTP server running?)"
    assert beats == [
        {"revision": 1, "reason": listen},
        {"revision": 2, "reason": "images/demo.img: permission denied"},
        None,  # revision 3 applied: cleared
        {"revision": 4, "reason": "RuntimeError: boom"},  # not a known failure: its type stays, to say it is a bug
    ]
    assert runtime.revision == 3
    assert [f["reason"] for t, f in sent if t == events.SERVICE_APPLY_FAILED] == [b["reason"] for b in beats if b]


def test_status_health_says_failed_with_the_reason():
    table = ServiceTable()
    beat = {"service": "tftp", "instance": 0, "pid": 7, "revision": -1, "emitted": 1, "dropped": 0,
            "failed": {"revision": 1, "reason": "cannot listen on 0.0.0.0:69: address in use (another TFTP server running?)"}}
    row = table.beat(beat, now=100.0)
    assert row.health(100.5, 3.0, 1) == "failed: cannot listen on 0.0.0.0:69: address in use (another TFTP server running?)"
    assert row.health(104.0, 3.0, 1) == "silent"
    row = table.beat({**beat, "revision": 1, "failed": None}, now=105.0)
    assert row.health(105.1, 3.0, 1) == "ok" and row.health(105.1, 3.0, 2) == "stale"


def test_the_bus_checks_the_failed_field():
    beat = dict(service="tftp", instance=0, pid=7, revision=1, emitted=0, dropped=0)
    assert m.unpack(m.pack(m.BEAT, **beat))["t"] == m.BEAT  # an older sender without the field
    assert m.unpack(m.pack(m.BEAT, **beat, failed=None)).get("failed") is None
    assert m.unpack(m.pack(m.BEAT, **beat, failed={"revision": 2, "reason": "x"}))["failed"]["reason"] == "x"
    for bad in ("x", {"revision": "2", "reason": "x"}, {"revision": 2}):
        with pytest.raises(m.BadMessage):
            m.unpack(m.pack(m.BEAT, **beat, failed=bad))


def test_reasons_are_sentences():
    from services.iscsi_target.scsi.backstore import BackstoreError

    assert reason(BackstoreError("images/demo.img: image does not exist and no size is given to create it")) == (
        "images/demo.img: image does not exist and no size is given to create it")
    assert reason(FileNotFoundError(errno.ENOENT, "No such file or directory", "images/demo.img")) == "images/demo.img: no such file or directory"
    assert reason(ListenError(errno.EACCES, "cannot listen on 0.0.0.0:69: permission refused")) == "cannot listen on 0.0.0.0:69: permission refused"
    from shared.failures import listen_reason

    assert listen_reason("0.0.0.0", 69, PermissionError(errno.EACCES, "Permission denied"), "TFTP") == (
        "cannot listen on 0.0.0.0:69: permission refused (port 69 is below 1024: run as root or grant CAP_NET_BIND_SERVICE)")
    assert listen_reason("10.9.9.9", 3260, OSError(errno.EADDRNOTAVAIL, "x"), "iSCSI") == (
        "cannot listen on 10.9.9.9:3260: no interface of this host has the address 10.9.9.9")
    assert listen_reason("0.0.0.0", 67, OSError(errno.ENODEV, "No such device"), "DHCP", device="eth9") == (
        "cannot listen on 0.0.0.0:67 on eth9: no network interface named eth9")
