"""Three target processes (`scale.iscsi_target: 3`, --instance 0,1,2) sharing the port and the state
directory, as supervisord runs them: one owner per target (owners.py), libiscsi's conformance suites with
two initiators against it, an owner killed with kill -9 under a write+flush load, and a mirror whose
dropped leg stays dropped when its owner is killed.

iscsi-test-cu and qemu-io are required (deploy/system-deps.sh): missing, a test fails.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import support
from services.iscsi_target.owner_locks import OwnerLocks

pytestmark = pytest.mark.integration

PREFIX = "iqn.2026-11.org.bootfleet.test:scaled"
TARGETS = [f"{PREFIX}{i}" for i in range(6)]
MIRROR = f"{PREFIX}m"  # a RAID-1 LUN of two file legs, m0.img and m1.img

CONFIG = """version: 1
logging: {{level: debug}}
scale: {{iscsi_target: 3}}
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  nop_interval: 2
  nop_timeout: 2
  targets:
{targets}
"""



class Cluster:
    def __init__(self, tmp: Path, procs):
        self.tmp, self.procs, self.port = tmp, procs, support.free_port()
        lines = []
        for i, name in enumerate(TARGETS):
            backstore = "{type: ram, size: 16MiB}" if i % 2 else f"{{type: file, path: t{i}.img, size: 64MiB}}"
            lines.append(f"    - {{name: {name}, luns: [{{id: 0, backstore: {backstore}}}]}}")
        lines.append(f"    - {{name: {MIRROR}, luns: [{{id: 0, backstore: {{type: mirror, legs: "
                     "[{type: file, path: m0.img, size: 16MiB}, {type: file, path: m1.img, size: 16MiB}]}}]}")
        self.config = tmp / "bootfleet.yaml"
        self.config.write_text(CONFIG.format(port=self.port, targets="\n".join(lines)))
        self.running: dict[int, subprocess.Popen] = {}
        self.locks = OwnerLocks(tmp / "iscsi" / "owners", 99)  # only asks; never takes a lock

    def log(self, i: int) -> Path:
        return self.tmp / f"iscsi-{i}.log"

    def start(self, i: int) -> None:
        mark = self.log(i).read_text().count("listening on") if self.log(i).exists() else 0
        self.running[i] = self.procs.start([sys.executable, "-m", "services.iscsi_target", "--config",
                                            str(self.config), "--state-dir", str(self.tmp), "--instance", str(i)],
                                           log=self.log(i))
        support.wait_for(lambda: self.log(i).exists() and self.log(i).read_text().count("listening on") > mark,
                         timeout=20, what=f"instance {i} listening")

    def kill9(self, i: int) -> None:
        proc = self.running.pop(i)
        proc.send_signal(signal.SIGKILL)  # by PID
        proc.wait(5)

    def owner(self, target: str) -> int | None:
        return self.locks.holder(target)

    def url(self, target: str, lun: int = 0) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{target}/{lun}"

    def logs(self) -> str:
        return "".join(self.log(i).read_text() for i in range(3) if self.log(i).exists())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    procs = support.Procs()
    c = Cluster(tmp_path_factory.mktemp("scaled"), procs)
    try:
        for i in range(3):
            c.start(i)
        yield c
    finally:
        procs.stop_all()


def run(args, timeout=60):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_each_target_has_one_owner_and_every_login_reaches_it(cluster):
    owners = {t: cluster.owner(t) for t in TARGETS}
    assert all(o in (0, 1, 2) for o in owners.values()), owners
    assert len(set(owners.values())) > 1, f"6 targets all preferred one instance: {owners}"
    for target in TARGETS:
        for _ in range(4):
            r = run([support.tool("iscsi-inq"), cluster.url(target)])
            assert r.returncode == 0, r.stdout + r.stderr
    support.wait_for(lambda: cluster.logs().count("iscsi.login ip=") >= 24, what="24 logins logged")
    for i in range(3):
        text = cluster.log(i).read_text()
        served = set(re.findall(rf"iscsi\.login ip=\S+ initiator=\S+ target=({re.escape(PREFIX)}\d)", text))
        assert served <= {t for t, o in owners.items() if o == i}, (i, served, owners)
    assert "handed to instance" in cluster.logs()  # the kernel spread 24 connections over 3 listeners
    assert "Traceback" not in cluster.logs()


def test_iscsi_test_cu_with_two_initiators_against_three_processes(cluster):
    """ALL (so PersistentReserve*, Reserve6*, CompareAndWrite*, MultipathIO, iSCSI.*) with two URLs: the
    second initiator's sessions land on whichever process accepts them and must meet the first's
    reservations."""
    target = TARGETS[0]  # a file LUN, used by no other test (the suite leaves reservations behind)
    url = cluster.url(target)
    r = run([support.tool("iscsi-test-cu"), "--dataloss", "--test=ALL", url, url], timeout=600)
    out = r.stdout + r.stderr
    (cluster.tmp / "iscsi-test-cu.out").write_text(out)
    tests = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    asserts = re.search(r"asserts\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert tests and asserts, out[-3000:]
    print(f"\niscsi-test-cu against scale 3: tests run {tests.group(2)}, passed {tests.group(3)}, "
          f"failed {tests.group(4)}; asserts failed {asserts.group(4)}")
    failures = re.findall(r"Test: (\S+) \.\.\.[^\n]*\n(?:(?!Test: ).*\n)*?.*FAILED", out)
    assert int(tests.group(4)) == 0 and int(asserts.group(4)) == 0, (failures[:30], out[-4000:])
    for suite in ("PrinReadKeys", "ProutRegister", "ProutReserve", "ProutPreempt", "ProutClear", "Reserve6",
                  "CompareAndWrite", "MultipathIO", "iSCSIcmdsn", "iSCSITMF"):
        assert f"Suite: {suite}" in out, f"{suite} did not run"


def test_owner_killed_under_load_is_replaced_and_loses_no_acknowledged_write(cluster):
    """qemu-io (libiscsi, which reconnects and reissues) writes and flushes in a loop; the target's owner is
    killed with kill -9 once the load runs. A new owner must serve the reconnection within seconds, and
    every write qemu-io saw acknowledged (the last flush after it included) must read back."""
    target = TARGETS[4]  # a file LUN
    qio = support.tool("qemu-io")
    owner = cluster.owner(target)
    assert owner is not None
    rounds = 400
    cmds = []
    for n in range(rounds):
        cmds += ["-c", f"write -P {n % 250 + 1} {n * 65536} 64k", "-c", "flush"]
    out, err = cluster.tmp / "qemu-io.out", cluster.tmp / "qemu-io.err"
    # stderr apart: qemu-io's stdout to a file goes out in 4 KiB blocks, and libiscsi's reconnection
    # messages on stderr would land inside a line of it, between two blocks
    with open(out, "w") as f, open(err, "w") as e:
        load = subprocess.Popen([qio, "-f", "raw", *cmds, cluster.url(target)], stdout=f, stderr=e)
    try:
        support.wait_for(lambda: out.read_text().count("wrote 65536/65536") >= 20, timeout=30,
                         what="the write+flush load running")
        logins_before = {i: cluster.log(i).read_text().count(f"target={target}") for i in range(3)}
        killed_at = time.monotonic()
        cluster.kill9(owner)

        def served_elsewhere():
            for i in range(3):
                if i != owner and cluster.log(i).read_text().count(f"target={target}") > logins_before[i]:
                    return i
            return None

        support.wait_for(lambda: served_elsewhere() is not None, timeout=15, interval=0.05,
                         what="the reconnection served by another process")
        new_owner = served_elsewhere()
        took = time.monotonic() - killed_at
        assert load.wait(120) == 0, out.read_text()[-2000:] + err.read_text()[-2000:]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
        if owner not in cluster.running:
            cluster.start(owner)  # back for the other tests (it does not take the target back)
    text = out.read_text()
    assert text.count("wrote 65536/65536") == rounds and "failed" not in text + err.read_text(), \
        f"{text.count('wrote 65536/65536')} writes seen\n{text[-1500:]}\nstderr: {err.read_text()[-1500:]}"
    assert cluster.owner(target) == new_owner
    print(f"\nowner {owner} killed; instance {new_owner} served the reconnection {took:.2f} s later")
    for start in range(0, rounds, 50):
        checks = []
        for n in range(start, min(rounds, start + 50)):
            checks += ["-c", f"read -P {n % 250 + 1} {n * 65536} 64k"]
        r = run([qio, "-f", "raw", *checks, cluster.url(target)])
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr, r.stdout[-2000:]
    assert cluster.owner(target) == new_owner


def test_discovery_anywhere_and_reinstatement_finds_the_first_session(cluster):
    """SendTargets is answered by whichever process accepts; a second login with the same ISID reaches the
    owner like the first, so it reinstates it (the first connection is closed) wherever the kernel put it."""
    from services.iscsi_target import pdu as P

    so = socket
    for _ in range(6):
        r = run([support.tool("iscsi-ls"), f"iscsi://127.0.0.1:{cluster.port}"])
        assert r.returncode == 0 and all(t in r.stdout for t in TARGETS), r.stdout + r.stderr
    target = TARGETS[2]

    def login() -> tuple[so.socket, int]:
        s = so.create_connection(("127.0.0.1", cluster.port), timeout=10)
        data = P.encode_text([("InitiatorName", "iqn.2026-11.org.test:reinstater"), ("TargetName", target)])
        s.sendall(P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, lun=0x800000ABCDEF << 16, itt=1,
                                   words=(0, 1, 0, 0, 0, 0, 0), data=data))
        head = s.recv(48, so.MSG_WAITALL)
        s.recv(P.padded(P.parse_header(head).dsl), so.MSG_WAITALL)
        return s, P.parse_header(head).login_status

    first, status = login()
    assert status == 0
    for _ in range(5):  # 5 more logins with the same ISID, landing on any of the 3 processes
        second, status = login()
        assert status == 0
        first.settimeout(10)
        assert first.recv(100) == b""  # closed by the owner: reinstated
        first.close()
        first = second
    first.close()
    owner = cluster.owner(target)
    support.wait_for(lambda: cluster.log(owner).read_text().count("reinstated=True") >= 5,
                     what="five reinstatements in the owner's log")


class RawSession:
    """A bare initiator session (one connection) for the few commands a test sends by hand."""

    def __init__(self, port: int, target: str, isid: int, initiator: str = "iqn.2026-11.org.test:pr"):
        from services.iscsi_target import pdu as P

        self.P = P
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        data = P.encode_text([("InitiatorName", initiator), ("TargetName", target), ("ImmediateData", "Yes"),
                              ("InitialR2T", "No")])
        self.s.sendall(P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, lun=isid << 16, itt=1,
                                        words=(0, 1, 0, 0, 0, 0, 0), data=data))
        rsp, _ = self.read()
        assert rsp.login_status == 0, hex(rsp.login_status)
        self.cmdsn, self.itt, self.statsn = 1, 10, rsp.w[1]  # w[1]: StatSN

    def read(self):
        head = self.s.recv(48, socket.MSG_WAITALL)
        pdu = self.P.parse_header(head)
        data = self.s.recv(self.P.padded(pdu.dsl), socket.MSG_WAITALL)[: pdu.dsl] if pdu.dsl else b""
        return pdu, data

    def command(self, cdb: bytes, out: bytes = b"", read: int = 0):
        """Run one command until it is not a unit attention; (status, data in)."""
        P = self.P
        for _ in range(5):
            self.itt += 1
            flags = 0x80 | (0x20 if out else 0) | (0x40 if read else 0) | 1  # F, W/R, SIMPLE
            words = (read or len(out), self.cmdsn, self.statsn + 1, *struct.unpack(">IIII", cdb.ljust(16, b"\0")))
            self.s.sendall(P.encode_request(P.OP_SCSI_CMD, flags=flags, lun=0, itt=self.itt, words=words, data=out))
            self.cmdsn += 1
            data = b""
            while True:
                pdu, chunk = self.read()
                data += chunk
                if pdu.opcode == P.OP_SCSI_RSP or (pdu.opcode == P.OP_DATA_IN and pdu.flags & 0x01):
                    break
            self.statsn = pdu.w[1]
            status = pdu.b3  # the SCSI status, in a SCSI Response and in a Data-In with S
            if status == 0x02 and len(chunk) > 4 and chunk[4] & 0x0F == 6:  # UNIT ATTENTION: once more
                continue
            return status, data
        raise AssertionError("unit attentions without end")

    def close(self):
        self.s.close()


def test_aptpl_reservation_survives_its_owners_kill9(cluster):
    """REGISTER with APTPL and RESERVE at the owner; the owner is killed; the next owner opens the LU from
    disk and reports the same key and reservation, and enforces it against another initiator."""
    target = TARGETS[3]  # a RAM LUN: the data is gone with the process, the APTPL reservation is not
    owner = cluster.owner(target)
    a = RawSession(cluster.port, target, 0x800000000A01)
    register = struct.pack(">QQ4xB3x", 0, 0x1234, 0x01)  # SA key 0x1234, APTPL
    assert a.command(bytes([0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0]), register)[0] == 0
    assert a.command(bytes([0x5F, 1, 0x01, 0, 0, 0, 0, 0, 24, 0]), struct.pack(">QQ8x", 0x1234, 0))[0] == 0
    a.close()
    cluster.kill9(owner)
    try:
        b = RawSession(cluster.port, target, 0x800000000B02, initiator="iqn.2026-11.org.test:other")
        status, data = b.command(bytes([0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0]), read=64)  # READ RESERVATION
        assert status == 0 and struct.unpack_from(">Q", data, 8)[0] == 0x1234 and data[21] & 0x0F == 1
        assert cluster.owner(target) not in (None, owner)
        write = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])  # WRITE(10) one block: Write Exclusive refuses it
        assert b.command(write, bytes(512))[0] == 0x18  # RESERVATION CONFLICT
        b.close()
        a = RawSession(cluster.port, target, 0x800000000A01)  # the holder, back: its nexus still holds it
        assert a.command(write, bytes(512))[0] == 0
        assert a.command(bytes([0x5F, 3, 0, 0, 0, 0, 0, 0, 24, 0]), struct.pack(">QQ8x", 0x1234, 0))[0] == 0  # CLEAR
        a.close()
    finally:
        cluster.start(owner)


def test_a_hand_over_to_a_non_owner_is_forwarded_to_the_owner(cluster):
    """The race the forwarding covers: a connection handed to an instance that does not own the target (it
    was chosen before someone else took the lock) goes on to the lock's holder, which answers the login."""
    from services.iscsi_target import pdu as P
    from services.iscsi_target.handoff import Handoff

    target = TARGETS[5]
    owner = cluster.owner(target)
    other = next(i for i in range(3) if i != owner)
    sender = Handoff(cluster.tmp / "iscsi", 7, lambda *a: None)  # a fourth "instance": this test
    server = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(server.getsockname(), timeout=10)
        accepted, _ = server.accept()
        data = P.encode_text([("InitiatorName", "iqn.2026-11.org.test:forwarded"), ("TargetName", target)])
        login = P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, lun=0x800000000F0F << 16, itt=1,
                                 words=(0, 1, 0, 0, 0, 0, 0), data=data)
        forwarded_before = cluster.log(other).read_text().count(f"for {target} handed to instance {owner}")
        assert sender.send(other, accepted, login)
        accepted.close()
        head = client.recv(48, socket.MSG_WAITALL)
        assert P.parse_header(head).opcode == P.OP_LOGIN_RSP and P.parse_header(head).login_status == 0
        client.close()
        support.wait_for(lambda: cluster.log(other).read_text().count(f"for {target} handed to instance {owner}")
                         == forwarded_before + 1, what="the forward in the non-owner's log")
        support.wait_for(lambda: "initiator=iqn.2026-11.org.test:forwarded" in cluster.log(owner).read_text(),
                         what="the login in the owner's log")
    finally:
        sender.close()
        server.close()


def test_a_mirror_leg_its_owner_dropped_stays_dropped_under_the_next_owner(cluster):
    """Only a mirror's owner opens it; a leg the owner drops is recorded in the mirror's state file (fsync'd
    before the write that found it failed is acknowledged), so after a kill -9 of that owner the next one
    serves the good leg alone, never the stale one."""
    qio = support.tool("qemu-io")
    url = cluster.url(MIRROR)
    blocks = 32  # 2 MiB of 64 KiB blocks

    def io(*cmds):
        r = run([qio, "-f", "raw", *cmds, url])
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "failed" not in out and "Pattern verification" not in out, out[-2000:]

    io(*[c for n in range(blocks) for c in ("-c", f"write -P 1 {n * 65536} 64k")], "-c", "flush")
    owner = cluster.owner(MIRROR)
    assert owner is not None
    zeros = cluster.tmp / "m1.replacement"  # leg 1's file replaced behind the target's back, its pages cached
    zeros.write_bytes(bytes(16 << 20))
    zeros.read_bytes()
    (cluster.tmp / "m1.img").unlink()
    zeros.rename(cluster.tmp / "m1.img")
    io(*[c for n in range(blocks) for c in ("-c", f"write -P 2 {n * 65536} 64k")], "-c", "flush")
    support.wait_for(lambda: "iscsi.mirror.leg_dropped" in cluster.log(owner).read_text(), timeout=10,
                     what="the owner dropping the replaced leg at the flush")
    cluster.kill9(owner)
    try:
        # reads out of order (none continues the one before), so a stale leg taken for in sync would answer
        # about half of them with zeros
        io(*[c for n in reversed(range(blocks)) for c in ("-c", f"read -P 2 {n * 65536} 64k")])
        new_owner = cluster.owner(MIRROR)
        assert new_owner not in (None, owner), (owner, new_owner)
        assert "iscsi.mirror.leg_dropped" not in cluster.log(new_owner).read_text()  # it never served leg 1
    finally:
        cluster.start(owner)  # back for the other tests; it does not take the target back
