"""`pcboot/<mac>` keys of the controller's store reach a managed service as `ctx.pcboot` (issue 13): the
iSCSI target reads a PC's power-on (image, version, boot, mode) from there at its login."""

import asyncio

from shared.bus import message as m
from shared.managed import ManagedRuntime
from shared.service import BaseService


class Idle(BaseService):
    name = "iscsi_target"


def test_snapshot_then_updates_and_deletes(tmp_path, monkeypatch):
    monkeypatch.delenv("BOOTFLEET_BUS", raising=False)
    runtime = ManagedRuntime(Idle, 0, tmp_path)
    one = {"image": "win10", "version": 2, "boot": 7, "mode": "discard"}

    async def main():
        runtime.loop = asyncio.get_running_loop()
        runtime._on_snapshot({m.PCBOOT_PREFIX + "52:54:00:00:00:01": one, "lease/10.0.0.5": {"mac": "x"},
                              m.PCBOOT_PREFIX + "52:54:00:00:00:09": None})
        await asyncio.sleep(0)
        assert runtime.ctx.pcboot == {"52:54:00:00:00:01": one}
        runtime._on_update(m.PCBOOT_PREFIX + "52:54:00:00:00:02", {**one, "boot": 1})
        runtime._on_update(m.PCBOOT_PREFIX + "52:54:00:00:00:01", {**one, "boot": 8})
        await asyncio.sleep(0)
        assert runtime.ctx.pcboot["52:54:00:00:00:01"]["boot"] == 8
        assert runtime.ctx.pcboot["52:54:00:00:00:02"]["boot"] == 1
        runtime._on_update(m.PCBOOT_PREFIX + "52:54:00:00:00:02", None)
        await asyncio.sleep(0)
        assert set(runtime.ctx.pcboot) == {"52:54:00:00:00:01"}

    asyncio.run(main())
