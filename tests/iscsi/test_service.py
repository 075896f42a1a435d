"""The service: targets and LUNs from the config, a new revision applied live, ports shared by processes."""

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.iscsi_target import pdu as P
from services.iscsi_target.service import IscsiTargetService
from shared.config.model import BootfleetConfig
from shared.service import ServiceContext

A = "iqn.2026-11.org.test:a"
B = "iqn.2026-11.org.test:b"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(port, targets):
    return BootfleetConfig(iscsi={"portals": [{"ip": "127.0.0.1", "port": port}], "targets": targets,
                                  "io_stats_interval": 0})


def target(name, *lun_ids, size="1MiB"):
    return {"name": name, "luns": [{"id": i, "backstore": {"type": "ram", "size": size}} for i in lun_ids]}


def login(port, name):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = P.encode_text([("InitiatorName", "iqn.2026-11.org.test:i"), ("TargetName", name)])
    s.sendall(P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, lun=(0x8000AA << 16) << 16, itt=1,
                               words=(0, 1, 0, 0, 0, 0, 0), data=data))
    head = recv_exact(s, 48)
    recv_exact(s, P.padded(int.from_bytes(head[5:8], "big")))
    return s, head


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def new_service(tmp_path) -> tuple[IscsiTargetService, list, int]:
    """A service in this process, the events it emits, and a free port for its portal."""
    events: list = []
    ctx = ServiceContext("iscsi_target", 0, tmp_path, lambda t, f: events.append((t, f)))
    return IscsiTargetService(ctx), events, free_port()


def test_apply_adds_and_removes_targets_and_luns(tmp_path):
    svc, events, port = new_service(tmp_path)

    async def scenario():
        await svc.start(config(port, [target(A, 0)]))
        sock, head = await asyncio.to_thread(login, port, A)
        assert head[0] == P.OP_LOGIN_RSP and head[36] == 0
        await svc.apply(config(port, [target(B, 0, 1)]))
        assert set(svc.registry.targets) == {B} and set(svc.registry.targets[B].scsi.luns) == {0, 1}
        # the removed target's session is asked to log out (Async Message, event 1), then closed
        msg = await asyncio.to_thread(recv_exact, sock, 48)
        assert msg[0] == P.OP_ASYNC and msg[36] == 1
        started = time.monotonic()
        closed = await asyncio.to_thread(lambda: sock.recv(100) == b"")
        assert closed and time.monotonic() - started < 6
        sock.close()
        scsi_b = svc.registry.targets[B].scsi
        await svc.apply(config(port, [target(B, 1, 2)]))
        assert svc.registry.targets[B].scsi is scsi_b and set(scsi_b.luns) == {1, 2}
        sock2, head = await asyncio.to_thread(login, port, A)
        assert head[36] == 0x02 and head[37] == 0x03  # removed: target not found
        sock2.close()
        await svc.stop()

    asyncio.run(scenario())
    reasons = [f.get("reason") for t, f in events if t == "iscsi.logout"]
    assert any("target removed" in r or "closed" in r for r in reasons), reasons


@pytest.mark.integration
def test_two_processes_share_the_port(tmp_path):
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""version: 1
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  targets: [{{name: {A}, luns: [{{id: 0, backstore: {{type: ram, size: 1MiB}}}}]}}]
""")
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-m", "services.iscsi_target", "--config", str(cfg), "--state-dir",
                               str(tmp_path), "--instance", str(i)], cwd=root, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for i in range(2)]
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)  # the second process binds too
        assert all(p.poll() is None for p in procs), [p.stderr.read().decode()[-500:] for p in procs if p.poll()]
        for _ in range(6):
            s, head = login(port, A)
            assert head[36] == 0
            s.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(12)


def test_session_reinstatement_closes_the_old_connection(tmp_path):
    svc, events, port = new_service(tmp_path)

    async def scenario():
        await svc.start(config(port, [target(A, 0)]))
        first, head = await asyncio.to_thread(login, port, A)
        tsih1 = int.from_bytes(head[14:16], "big")
        second, head = await asyncio.to_thread(login, port, A)  # same initiator name and ISID
        assert head[36] == 0 and int.from_bytes(head[14:16], "big") != tsih1
        closed = await asyncio.to_thread(lambda: first.recv(100) == b"")
        assert closed
        assert len(svc.server.sessions) == 1
        first.close()
        second.close()
        await svc.stop()

    asyncio.run(scenario())
    logins = [f for t, f in events if t == "iscsi.login"]
    assert [f["reinstated"] for f in logins] == [False, True]
    assert any("reinstated" in f.get("reason", "") for t, f in events if t == "iscsi.logout")
