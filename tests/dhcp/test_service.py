"""The service object without sockets: start, the controller's lease-release command, apply, stop."""

import asyncio
import time

from services.dhcp import packet as pk
from services.dhcp.core import Interface
from services.dhcp.packet import ip_int
from services.dhcp.service import DhcpService
from shared.config.loader import config_from_dict
from shared.service import ServiceContext

CONFIG = {"dhcp": {"scopes": [{"name": "r", "subnet": "10.9.0.0/24", "ranges": [{"start": "10.9.0.10", "end": "10.9.0.20"}]}]}}


def test_lease_release_command(tmp_path):
    emitted = []
    ctx = ServiceContext("dhcp", 0, tmp_path, lambda t, f: emitted.append((t, f)))
    svc = DhcpService(ctx)

    async def scenario():
        await svc.start(config_from_dict(CONFIG))
        iface = Interface("x", ip_int("10.0.0.1"))
        mac = bytes.fromhex("020000000001")
        with svc.loop.lock:
            offer = pk.parse(svc.core.handle(pk.parse(pk.build_request(pk.DISCOVER, mac, giaddr=ip_int("10.9.0.1"))), iface, time.time()).data)
            svc.core.handle(pk.parse(pk.build_request(pk.REQUEST, mac, giaddr=ip_int("10.9.0.1"), options={
                54: iface.packed, 50: offer.yiaddr.to_bytes(4, "big")})), iface, time.time())
            svc.store.commit()
        await svc.command("lease-release", {"mac": "02-00-00-00-00-01"})
        await svc.command("lease-release", {"mac": "not a mac"})  # logged, not fatal
        await svc.apply(config_from_dict(CONFIG))
        counters = svc.counters()
        await svc.stop()
        return counters

    counters = asyncio.run(scenario())
    released = [f for t, f in emitted if t == "dhcp.lease.released"]
    assert released == [{"mac": "02:00:00:00:00:01", "ip": "10.9.0.10", "by": "operator"}]
    assert counters["acks"] == 1 and counters["leases"] == 1
    assert svc.loop.thread is not None and not svc.loop.thread.is_alive()


def test_dhcp_mode_changes_swap_the_core_and_the_store(tmp_path):
    """server -> proxy: the proxy core answers, the lease file is closed and left alone; proxy -> server: the
    leases are back from the file."""
    ctx = ServiceContext("dhcp", 0, tmp_path, lambda t, f: None)
    svc = DhcpService(ctx)
    proxy = {"dhcp": {"mode": "proxy"}}
    iface = Interface("x", ip_int("10.0.0.1"))
    mac = bytes.fromhex("020000000002")

    async def scenario():
        await svc.start(config_from_dict(CONFIG))
        with svc.loop.lock:
            offer = pk.parse(svc.core.handle(pk.parse(pk.build_request(pk.DISCOVER, mac, giaddr=ip_int("10.9.0.1"))), iface, time.time()).data)
            svc.core.handle(pk.parse(pk.build_request(pk.REQUEST, mac, giaddr=ip_int("10.9.0.1"), options={
                54: iface.packed, 50: offer.yiaddr.to_bytes(4, "big")})), iface, time.time())
            svc.store.commit()
        await svc.apply(config_from_dict(proxy))
        assert svc.core.mode == "proxy" and svc.loop.core is svc.core and svc.counters()["leases"] == 0
        discover = pk.parse(pk.build_request(pk.DISCOVER, mac, options={60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0"}))
        with svc.loop.lock:
            reply = svc.core.handle(discover, iface, time.time())
        assert reply is not None and pk.parse(reply.data).yiaddr == 0
        await svc.command("lease-release", {"mac": "02:00:00:00:00:02"})  # proxy mode holds none: logged
        await svc.apply(config_from_dict(CONFIG))
        assert svc.core.mode == "server" and svc.loop.store is svc.store
        leases = svc.counters()["leases"]
        await svc.stop()
        return leases

    assert asyncio.run(scenario()) == 1
