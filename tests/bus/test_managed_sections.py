"""A managed service is handed only the revisions that change the configuration sections it reads."""

import asyncio

from shared import events
from shared.config.loader import config_from_dict
from shared.managed import ManagedRuntime, touches
from shared.service import BaseService

DHCP_SECTIONS = ("dhcp", "boot", "clients", "iscsi", "scale")


def recorder(sections):
    class Recorder(BaseService):
        name = "dhcp"
        calls: list[str] = []

        async def start(self, config):
            self.calls.append("start")

        async def apply(self, config):
            self.calls.append(f"apply {config.tftp.max_blksize} {config.dhcp.offer_hold}")

        async def stop(self):
            pass

    Recorder.sections = sections
    return Recorder


def run_revisions(service_cls, tmp_path, monkeypatch):
    monkeypatch.delenv("BOOTFLEET_BUS", raising=False)
    base = config_from_dict({}).model_dump(mode="json")
    tftp_only = {**base, "tftp": {**base["tftp"], "max_blksize": 1468}}
    dhcp_too = {**tftp_only, "dhcp": {**base["dhcp"], "offer_hold": 10.0}}
    runtime = ManagedRuntime(service_cls, 0, tmp_path)
    applied = []
    runtime.ctx._emitter = lambda type, fields: applied.append((type, fields.get("revision")))

    async def main():
        runtime.loop = asyncio.get_running_loop()
        for revision, data in enumerate((base, tftp_only, dhcp_too), start=1):
            assert await runtime.apply(revision, data)

    asyncio.run(main())
    assert runtime.revision == 3
    # every revision is reported applied, whether or not the service was handed it
    assert [r for t, r in applied if t == events.SERVICE_APPLIED] == [1, 2, 3]
    return service_cls.calls


def test_a_tftp_only_change_does_not_call_the_dhcp_services_apply(tmp_path, monkeypatch):
    calls = run_revisions(recorder(DHCP_SECTIONS), tmp_path, monkeypatch)
    assert calls == ["start", "apply 1468 10.0"]


def test_a_service_without_sections_gets_every_revision(tmp_path, monkeypatch):
    calls = run_revisions(recorder(None), tmp_path, monkeypatch)
    assert calls == ["start", "apply 1468 30.0", "apply 1468 10.0"]


def test_touches():
    old = {"dhcp": {"a": 1}, "tftp": {"b": 1}}
    assert not touches(("dhcp",), old, {**old, "tftp": {"b": 2}})
    assert touches(("dhcp",), old, {**old, "dhcp": {"a": 2}})
    assert touches(("clients",), old, {**old, "clients": []})  # a section appearing counts
    assert touches(None, old, old)


def test_the_services_subscribe_to_what_they_read():
    from services.dhcp.service import DhcpService
    from services.iscsi_target.service import IscsiTargetService
    from services.tftp.service import TftpService

    assert set(DhcpService.sections) == set(DHCP_SECTIONS)
    assert "tftp" not in DhcpService.sections and "dhcp" not in TftpService.sections
    # the iSCSI target reads its own section and, for the PCs on images, the clients, images and boot names
    assert set(IscsiTargetService.sections) == {"iscsi", "clients", "images", "image_store", "boot"}
