"""The service: targets and LUNs from the config, a new revision applied live, ports shared by processes."""

import asyncio
import socket
import sys
import time

import pytest

import support
from services.iscsi_target import events as ev
from services.iscsi_target import owners
from services.iscsi_target import pdu as P
from services.iscsi_target.login import NOT_FOUND
from services.iscsi_target.service import IscsiTargetService
from shared.config.model import BootfleetConfig
from shared.service import ServiceContext

A = "iqn.2026-11.org.test:a"
B = "iqn.2026-11.org.test:b"
INITIATOR = "iqn.2026-11.org.test:i"


def config(port, targets):
    return BootfleetConfig(iscsi={"portals": [{"ip": "127.0.0.1", "port": port}], "targets": targets,
                                  "io_stats_interval": 0})


def target(name, *lun_ids, size="1MiB"):
    return {"name": name, "luns": [{"id": i, "backstore": {"type": "ram", "size": size}} for i in lun_ids]}


def login(port, name) -> tuple[socket.socket, P.Pdu]:
    """One anonymous login straight to full feature phase; the socket and the final Login Response."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = P.encode_text([("InitiatorName", INITIATOR), ("TargetName", name)])
    s.sendall(P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, lun=0x8000AA << 32, itt=1,
                               words=(0, 1, 0, 0, 0, 0, 0), data=data))
    return s, receive_pdu(s)


def receive_pdu(s) -> P.Pdu:
    head = recv_exact(s, P.BHS_LEN)
    pdu = P.parse_header(head)
    pdu.data = recv_exact(s, P.padded(pdu.dsl))[: pdu.dsl]
    return pdu


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
    return IscsiTargetService(ctx), events, support.free_port()


def test_apply_adds_and_removes_targets_and_luns(tmp_path):
    svc, events, port = new_service(tmp_path)

    async def scenario():
        await svc.start(config(port, [target(A, 0)]))
        sock, rsp = await asyncio.to_thread(login, port, A)
        assert rsp.opcode == P.OP_LOGIN_RSP and rsp.login_status == 0
        await svc.apply(config(port, [target(B, 0, 1)]))
        assert set(svc.registry.targets) == {B} and set(svc.registry.targets[B].scsi.luns) == {0, 1}
        # the removed target's session is asked to log out (Async Message, event 1), then closed
        msg = await asyncio.to_thread(receive_pdu, sock)
        assert msg.opcode == P.OP_ASYNC and msg.async_event == 1
        started = time.monotonic()
        closed = await asyncio.to_thread(lambda: sock.recv(100) == b"")
        assert closed and time.monotonic() - started < 6
        sock.close()
        scsi_b = svc.registry.targets[B].scsi
        await svc.apply(config(port, [target(B, 1, 2)]))
        assert svc.registry.targets[B].scsi is scsi_b and set(scsi_b.luns) == {1, 2}
        sock2, rsp = await asyncio.to_thread(login, port, A)
        assert rsp.login_status == NOT_FOUND  # removed: target not found
        sock2.close()
        await svc.stop()

    asyncio.run(scenario())
    # the target closed it after the grace period, not the initiator
    reasons = [f["reason"] for t, f in events if t == "iscsi.logout" and f["target"] == A]
    assert reasons == ["target removed: logout deadline passed"]


@pytest.mark.integration
def test_two_processes_share_the_port_and_one_owns_the_target(tmp_path, procs):
    port = support.free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""version: 1
logging: {{level: debug}}
scale: {{iscsi_target: 2}}
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  targets: [{{name: {A}, luns: [{{id: 0, backstore: {{type: ram, size: 1MiB}}}}]}}]
""")
    logs = [tmp_path / f"iscsi-{i}.log" for i in range(2)]
    running = [procs.start([sys.executable, "-m", "services.iscsi_target", "--config", str(cfg), "--state-dir",
                            str(tmp_path), "--instance", str(i)], log=logs[i]) for i in range(2)]

    def listening(log):
        return log.exists() and f"listening on 127.0.0.1:{port}" in log.read_text()

    support.wait_for(lambda: all(listening(log) for log in logs), timeout=20, what="both processes listening")

    def handed(log):
        return "handed to instance" in log.read_text()

    def one_login():
        assert all(p.poll() is None for p in running), [log.read_text()[-500:] for log in logs]
        s, rsp = login(port, A)
        assert rsp.login_status == 0
        s.close()
        return any(handed(log) for log in logs)

    # The kernel spreads connections over the two listeners by a hash of the addresses: log in until the
    # non-owner has accepted one and handed it over (2 ** -40 odds that 40 logins all land on the owner).
    support.wait_for(one_login, timeout=30, interval=0.0, what="a login accepted by the non-owner")
    def served():
        return ["iscsi.login ip=127.0.0.1" in log.read_text() for log in logs]

    support.wait_for(lambda: any(served()), what="the logins in the owner's log")
    assert served().count(True) == 1, served()  # every login was answered by the owner alone


def test_session_reinstatement_closes_the_old_connection(tmp_path):
    svc, events, port = new_service(tmp_path)

    async def scenario():
        await svc.start(config(port, [target(A, 0)]))
        first, rsp = await asyncio.to_thread(login, port, A)
        tsih1 = rsp.tsih
        second, rsp = await asyncio.to_thread(login, port, A)  # same initiator name and ISID
        assert rsp.login_status == 0 and rsp.tsih != tsih1
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


def test_events_get_the_pcs_mac_and_local_ones_stay_here(tmp_path):
    svc, events, _ = new_service(tmp_path)
    svc.ctx.leases["10.0.0.5"] = "52:54:00:00:00:05"  # what DHCP lease events taught the service
    svc.on_event(ev.Logout(ip="10.0.0.5", initiator=INITIATOR, target=A, tsih=1, reason="logout"))
    svc.on_event(ev.Logout(ip="10.0.0.6", initiator=INITIATOR, target=A, tsih=2, reason="logout"))
    svc.on_event(ev.Error(where="nexus_lost", error="boom"))
    assert events == [
        ("iscsi.logout", {"ip": "10.0.0.5", "initiator": INITIATOR, "target": A, "tsih": 1, "reason": "logout",
                          "mac": "52:54:00:00:00:05"}),
        ("iscsi.logout", {"ip": "10.0.0.6", "initiator": INITIATOR, "target": A, "tsih": 2, "reason": "logout"}),
    ]


def test_aptpl_reservations_survive_a_restart_of_the_service(tmp_path):
    from services.iscsi_target.scsi import Nexus

    cfg = config(support.free_port(), [{"name": A, "luns": [{"id": 0, "backstore": {
        "type": "file", "path": "a.img", "size": "1MiB"}}]}])
    nexus = Nexus(f"{INITIATOR},i,0x800000000001", f"{A},t,0x0001", 1)
    pr_out = bytes([0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0])
    reserve = bytes([0x5F, 1, 0x01, 0, 0, 0, 0, 0, 24, 0])  # RESERVE, Write Exclusive
    read_reservation = bytes([0x5E, 1, 0, 0, 0, 0, 0, 0x10, 0, 0])

    async def run(body):
        svc, _, _ = new_service(tmp_path)
        await svc.start(cfg)
        try:
            scsi = svc.registry.targets[A].scsi
            while scsi.execute(nexus, 0, bytes(6), None).status:  # the power-on unit attention
                pass
            return body(scsi)
        finally:
            await svc.stop()

    def take(scsi):
        params = (0).to_bytes(8, "big") + (0xABC).to_bytes(8, "big") + bytes([0, 0, 0, 0, 0x01, 0, 0, 0])
        assert scsi.execute(nexus, 0, pr_out, params).status == 0  # REGISTER, APTPL
        assert scsi.execute(nexus, 0, reserve, (0xABC).to_bytes(8, "big") + bytes(16)).status == 0

    def look(scsi):
        d = b"".join(bytes(part) for part in scsi.execute(nexus, 0, read_reservation, None).data)
        return int.from_bytes(d[8:16], "big"), d[21] & 0x0F

    asyncio.run(run(take))
    assert list((tmp_path / "iscsi" / "pr").glob("*-0.json"))
    assert asyncio.run(run(look)) == (0xABC, 1)


def test_a_target_whose_luns_cannot_open_when_claimed_is_refused_0300(tmp_path):
    from services.iscsi_target.login import TARGET_ERROR

    image = tmp_path / "gone.img"
    image.write_bytes(bytes(1 << 20))
    svc, events, port = new_service(tmp_path)
    svc.ctx.instance, svc.ctx.instances = 1, 2  # instance 0 never runs: its hand-overs are refused
    cfg = config(port, [{"name": n, "luns": [{"id": 0, "backstore": {"type": "file", "path": str(image),
                                                                     "create": False}}]}
                        for n in (A, B)])
    # the target this instance does not prefer is opened only when claimed: remove its image before that
    name = next(n for n in (A, B) if owners.hrw_order(n, 2)[0] != 1)

    async def scenario():
        await svc.start(cfg)
        try:
            assert not svc.registry.targets[name].owned and svc.registry.targets[name].scsi.luns == {}
            image.unlink()
            sock, rsp = await asyncio.to_thread(login, port, name)
            sock.close()
            return rsp.login_status
        finally:
            await svc.stop()

    assert asyncio.run(scenario()) == TARGET_ERROR
    assert any(t == "iscsi.login.failed" and "could not be opened" in f["reason"] for t, f in events)


def test_io_stats_carry_each_interval_buckets_latency_sum_and_opcodes(tmp_path):
    from services.iscsi_target.session import Session
    from shared.iscsi_latency import BUCKETS

    svc, events, _ = new_service(tmp_path)
    s = Session(initiator=INITIATOR, isid=1, target=A, session_type="Normal", ip="10.0.0.9", tsih=3)
    st = s.lun_stats(0)
    st.reads, st.read_bytes = 2, 8192
    st.done(0x28, 40_000)
    st.done(0x88, 60_000)
    svc._emit_session_stats(s)
    st.others += 1
    st.done(0xC1, 3_000_000)  # no name: its hex
    svc._emit_session_stats(s)
    svc._emit_session_stats(s)  # nothing since: no event
    st.writes, st.write_bytes = 1, 512
    st.done(0x2A, 2_000_000_000)
    svc._emit_session_stats(s, final=True)  # the session's end: its last interval
    stats = [f for t, f in events if t == "iscsi.io_stats"]
    assert [(f["reads"], f["writes"], f["others"]) for f in stats] == [(2, 0, 0), (0, 0, 1), (0, 1, 0)]
    first, second, last = stats
    assert first["ops"] == {"READ_10": 1, "READ_16": 1} and second["ops"] == {"0xC1": 1} and last["ops"] == {"WRITE_10": 1}
    assert first["latency_buckets"] == [1, 1] + [0] * (BUCKETS - 2)
    assert second["latency_buckets"][6] == 1 and sum(second["latency_buckets"]) == 1  # 3 ms: <= 5 ms
    assert last["latency_buckets"][-1] == 1  # 2 s: above 1 s
    assert (first["latency_sum_ns"], first["latency_us_avg"]) == (100_000, 50.0)
    assert second["latency_sum_ns"] == 3_000_000 and last["latency_sum_ns"] == 2_000_000_000
