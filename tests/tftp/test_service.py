"""service.py: start, apply a new revision (new root, new port) without dropping a transfer in flight, stop."""

import asyncio
import socket

import pytest
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402
from services.tftp import packets as pk  # noqa: E402
from services.tftp.service import TftpService  # noqa: E402
from shared.config.model import BootfleetConfig  # noqa: E402
from shared.service import ServiceContext  # noqa: E402
from tftp_client import TftpError, fetch, request  # noqa: E402


def config(root, port, **tftp):
    return BootfleetConfig.model_validate({"tftp": {"root": str(root), "address": "127.0.0.1", "port": port, **tftp}})


@pytest.mark.parametrize("threads", [1, 2])
def test_apply_keeps_transfers_in_flight(tmp_path, threads):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a.bin").write_bytes(b"A" * 3000)
    (two / "b.bin").write_bytes(b"B" * 10)
    events = []
    ctx = ServiceContext("tftp", 0, tmp_path, lambda type, fields: events.append((type, fields)))
    ctx.leases["127.0.0.1"] = "52:54:00:aa:bb:cc"
    service = TftpService(ctx)
    port1, port2 = support.free_port(socket.SOCK_DGRAM), support.free_port(socket.SOCK_DGRAM)

    async def scenario():
        await service.start(config(one, port1, threads=threads))
        s, data, tid = await asyncio.to_thread(request, port1, "a.bin")  # a transfer in flight
        await service.apply(config(two, port2, busy_poll_us=0, threads=threads))
        got = [data[4:]]
        with s:
            while len(data) == 516:
                s.sendto(pk.build_ack(pk.HEADER.unpack_from(data)[1]), tid)
                data, _ = await asyncio.to_thread(s.recvfrom, 600)
                got.append(data[4:])
            s.sendto(pk.build_ack(pk.HEADER.unpack_from(data)[1]), tid)
        assert b"".join(got) == b"A" * 3000
        assert (await asyncio.to_thread(fetch, port2, "b.bin"))[0] == b"B" * 10  # the new root, the new port
        try:
            await asyncio.to_thread(fetch, port2, "a.bin")
            raise AssertionError("a.bin is not under the new root")
        except TftpError as exc:
            assert exc.code == 1
        # the server handles the last ACK after the client has moved on
        await asyncio.to_thread(support.wait_for, lambda: service.counters()["finished"] == 2, 10,
                                what="both transfers to finish")
        counters = service.counters()
        await service.stop()
        return counters

    counters = asyncio.run(scenario())
    assert counters["finished"] == 2 and counters["refused"] == 1 and counters["active"] == 0
    # with two threads b.bin may finish before the thread serving a.bin reads its last ACK
    finished = {f["file"]: f for t, f in events if t == "tftp.transfer.finished"}
    assert sorted(finished) == ["a.bin", "b.bin"]
    assert finished["a.bin"]["bytes"] == 3000 and finished["a.bin"]["mac"] == "52:54:00:aa:bb:cc"
    assert [f["reason"] for t, f in events if t == "tftp.transfer.failed"] == ["'a.bin' not found"]
