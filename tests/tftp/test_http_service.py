"""The TFTP service with HTTP on: one root, one script, both protocols; apply moves HTTP or turns it off without
cutting a reply in flight; stop closes it; its counters and events."""

import asyncio
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402
from services.tftp.service import TftpService  # noqa: E402
from shared.config.model import BootfleetConfig  # noqa: E402
from shared.service import ServiceContext  # noqa: E402
from tftp_client import fetch  # noqa: E402
from test_http import curl  # noqa: E402

MAC = "52:54:00:12:34:01"
IQN = "iqn.2026-11.org.example:disk0"


def config(root, tftp_port, http=None, transport="tftp"):
    return BootfleetConfig.model_validate({
        "boot": {"server": "10.0.0.1", "transport": transport},
        "clients": [{"mac": MAC, "target": IQN}],
        "tftp": {"root": str(root), "address": "127.0.0.1", "port": tftp_port},
        "http": http or {},
    })


def test_the_service_serves_http_and_applies_changes_without_cutting_replies(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "undionly.kpxe").write_bytes(b"L" * 5000)
    with open(root / "huge.bin", "wb") as f:
        f.truncate(12 << 20)  # more than the socket buffers hold: a reply that is still in flight
    events = []
    ctx = ServiceContext("tftp", 0, tmp_path, lambda type, fields: events.append((type, fields)))
    ctx.leases["127.0.0.1"] = MAC
    service = TftpService(ctx)
    tftp_port = support.free_port(socket.SOCK_DGRAM)
    port1, port2 = support.free_port(), support.free_port()

    async def scenario():
        await service.start(config(root, tftp_port))  # HTTP off by default
        assert service.counters().get("http_connections", 0) == 0
        assert (await asyncio.to_thread(curl, "-o", "/dev/null", "-w", "%{http_code}",
                                        f"http://127.0.0.1:{port1}/")).stdout == b"000"
        on = config(root, tftp_port, {"enabled": True, "port": port1}, transport="http")
        await service.apply(on)
        got = await asyncio.to_thread(curl, "-o", "-", f"http://127.0.0.1:{port1}/boot.ipxe")
        assert got.stdout == f"#!ipxe\nset keep-san 1\nsanboot iscsi:10.0.0.1::::{IQN}\n".encode()
        over_tftp, _ = await asyncio.to_thread(fetch, tftp_port, "boot.ipxe")
        assert over_tftp == got.stdout  # one script, both protocols
        got = await asyncio.to_thread(curl, "-o", "-", f"http://127.0.0.1:{port1}/undionly.kpxe")
        assert got.stdout == b"L" * 5000

        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", port1))
        slow.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.to_thread(slow.recv, 200)
        assert head.startswith(b"HTTP/1.1 200 OK")
        await service.apply(config(root, tftp_port, {"enabled": True, "port": port2}, transport="http"))
        got = await asyncio.to_thread(curl, "-o", "-", f"http://127.0.0.1:{port2}/undionly.kpxe")
        assert got.stdout == b"L" * 5000  # the new port
        await service.apply(config(root, tftp_port))  # HTTP off: the reply in flight goes on
        assert (await asyncio.to_thread(curl, "-o", "/dev/null", "-w", "%{http_code}",
                                        f"http://127.0.0.1:{port2}/")).stdout == b"000"

        def read_all():
            data = head
            slow.settimeout(10)
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            while chunk := slow.recv(1 << 16):
                data += chunk
            slow.close()
            return data

        data = await asyncio.to_thread(read_all)
        assert len(data.partition(b"\r\n\r\n")[2]) == 12 << 20
        for _ in range(200):
            if any(t == "http.transfer.finished" and f["file"] == "huge.bin" for t, f in events):
                break
            await asyncio.sleep(0.02)
        counters = service.counters()
        await service.stop()
        return counters

    counters = asyncio.run(scenario())
    finished = {f["file"]: f for t, f in events if t == "http.transfer.finished"}
    assert sorted(finished) == ["boot.ipxe", "huge.bin", "undionly.kpxe"]
    assert finished["boot.ipxe"]["mac"] == MAC and finished["huge.bin"]["bytes"] == 12 << 20
    assert not [f for t, f in events if t == "http.transfer.failed"]
    assert counters["http_finished"] == 4 and counters["http_bytes_sent"] >= (12 << 20) + 10000
