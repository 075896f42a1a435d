"""The owner map: HRW order, the first-PDU framer, the hand-over plan (sans-IO), the lock files and the
hand-over socket (a TCP connection handed between two Handoff objects)."""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
import threading

import support
from services.iscsi_target import owners
from services.iscsi_target import pdu as P
from services.iscsi_target.handoff import Handoff
from services.iscsi_target.owner_locks import OwnerLocks

T = "iqn.2026-11.org.test:t"


def login_pdu(pairs, flags=0x87) -> bytes:
    return P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=flags, lun=0x8000AA << 32, itt=1,
                            words=(0, 1, 0, 0, 0, 0, 0), data=P.encode_text(pairs))


# ---------------------------------------------------------------- HRW
def test_hrw_order_is_a_stable_permutation():
    for n in (1, 2, 3, 7):
        order = owners.hrw_order(T, n)
        assert sorted(order) == list(range(n))
        assert owners.hrw_order(T, n) == order


def test_hrw_spreads_targets_and_moves_only_a_dead_instances_share():
    names = [f"iqn.2026-11.org.test:pc{i}" for i in range(600)]
    first = collections.Counter(owners.hrw_order(n, 3)[0] for n in names)
    assert all(150 < first[i] < 250 for i in range(3)), first
    # Instance 1 dies: a target preferring 0 or 2 keeps its owner; one preferring 1 moves to its second choice.
    for n in names:
        order = owners.hrw_order(n, 3)
        alive = [i for i in order if i != 1]
        assert alive[0] == (order[0] if order[0] != 1 else order[1])
    # Growing the scale moves a target only to the new instance (rendezvous hashing).
    for n in names:
        before, after = owners.hrw_order(n, 3)[0], owners.hrw_order(n, 4)[0]
        assert after in (before, 3)


# ---------------------------------------------------------------- framing
def test_first_pdu_length_counts_ahs_and_padding():
    pdu = login_pdu([("InitiatorName", "iqn.2026-11.org.test:i"), ("TargetName", T)])
    assert owners.first_pdu_length(pdu[:48]) == len(pdu) and len(pdu) % 4 == 0
    bhs = bytearray(pdu[:48])
    bhs[4] = 2  # TotalAHSLength: two words
    bhs[5:8] = (5).to_bytes(3, "big")
    assert owners.first_pdu_length(bhs) == 48 + 8 + 8
    nop = bytearray(48)
    nop[0] = P.OP_NOP_OUT
    nop[5:8] = (100).to_bytes(3, "big")
    assert owners.first_pdu_length(nop) == 48  # not a login: served where it landed, never framed further


def test_login_target_normal_discovery_and_malformed():
    init = ("InitiatorName", "iqn.2026-11.org.test:i")
    assert owners.login_target(login_pdu([init, ("TargetName", "IQN.2026-11.org.test:T")])) == T
    assert owners.login_target(login_pdu([init, ("SessionType", "Discovery")])) is None
    assert owners.login_target(login_pdu([init])) is None
    assert owners.login_target(login_pdu([init, ("TargetName", T)], flags=0x47)) is None  # C bit: text goes on
    assert owners.login_target(b"\x03" + bytes(20)) is None
    nop = bytearray(login_pdu([init, ("TargetName", T)]))
    nop[0] = P.OP_NOP_OUT
    assert owners.login_target(nop) is None


# ---------------------------------------------------------------- plan
def test_plan_who_serves():
    order = owners.hrw_order(T, 3)
    assert owners.plan(T, 1, 3, holder=1, handed=False, hops=0) == [1]
    assert owners.plan(T, 1, 3, holder=2, handed=False, hops=0) == [2, 1]
    assert owners.plan(T, 1, 3, holder=2, handed=True, hops=owners.MAX_HOPS) == [1]  # no endless forwarding
    assert owners.plan(T, 1, 3, holder=None, handed=False, hops=0) == order  # the acceptor itself included
    assert owners.plan(T, 1, 3, holder=None, handed=True, hops=0) == [1]  # handed to us: claim it
    assert owners.plan(T, 5, 3, holder=None, handed=False, hops=0) == order + [5]


# ---------------------------------------------------------------- locks
def test_lock_is_exclusive_probe_does_not_take_it_and_release_frees_it(tmp_path):
    a, b = OwnerLocks(tmp_path, 0), OwnerLocks(tmp_path, 1)
    assert b.holder(T) is None
    assert b.holder(T) is None and a.acquire(T)  # probing twice took nothing
    assert not b.acquire(T) and b.holder(T) == 0 and a.holder(T) == 0 and a.owns(T) and not b.owns(T)
    a.release(T)
    assert b.holder(T) is None and b.acquire(T) and a.holder(T) == 1


def test_a_killed_holders_lock_is_free_at_once(tmp_path):
    code = ("import sys, time; from services.iscsi_target.owner_locks import OwnerLocks; "
            f"l = OwnerLocks(sys.argv[1], 2); assert l.acquire({T!r}); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=support.ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        mine = OwnerLocks(tmp_path, 0)
        assert mine.holder(T) == 2 and not mine.acquire(T)
        proc.kill()  # SIGKILL, by PID
        proc.wait(5)
        assert mine.holder(T) is None and mine.acquire(T)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- hand-over socket
def test_handoff_passes_the_socket_and_the_bytes_read(tmp_path):
    got = []
    arrived = threading.Event()

    def on_connection(sock, prefix, hops):
        got.append((sock, bytes(prefix), hops))
        arrived.set()

    receiver = Handoff(tmp_path / ("a-long-state-directory-name" * 4), 1, on_connection)  # > 108 bytes of path
    sender = Handoff(receiver.directory, 0, lambda *a: None)
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        assert not sender.send(2, accepted, b"x")  # instance 2 never ran: ENOENT
        assert sender.send(1, accepted, b"first PDU", hops=1)
        accepted.close()  # the sender's copy; the connection lives on in the receiver
        assert arrived.wait(5)
        sock, prefix, hops = got[0]
        assert prefix == b"first PDU" and hops == 1
        client.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        sock.sendall(b"pong")
        assert client.recv(4) == b"pong"
        sock.close()
        receiver.close()
        assert not sender.send(1, client, b"x")  # the receiver is gone: refused, not hung
    finally:
        sender.close()
        client.close()
        server.close()
