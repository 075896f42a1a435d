"""io_loop.py on the wire: the TFTP service as a process (`python -m services.tftp --config FILE`), driven by
real clients (tftp-hpa, atftp, curl) and by a raw client for exact packets. The admission rules alone, without
sockets, are in test_core.py."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402
from services.tftp import packets as pk  # noqa: E402
from tftp_client import TftpError, fetch, request, wait_ready  # noqa: E402

pytestmark = pytest.mark.integration

MAC1, MAC2 = "52:54:00:12:34:01", "52:54:00:12:34:02"
IQN1, IQN2 = "iqn.2026-11.org.bootfleet:pc1", "iqn.2026-11.org.bootfleet:pc2"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "uploads").mkdir()
    (root / "small.bin").write_bytes(os.urandom(1000))
    (root / "exact.bin").write_bytes(os.urandom(2048))  # a multiple of 512: ends with an empty block
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "text.txt").write_bytes(b"one\ntwo\r\nthree\n" * 100)
    (root / "empty").write_bytes(b"")
    (tmp_path / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "secret", root / "out-link")
    os.symlink("small.bin", root / "in-link")
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
    return root


@pytest.fixture
def start(tmp_path, root, procs):
    def start(name: str = "tftp", port: int | None = None, **tftp) -> SimpleNamespace:
        port = port or support.free_port(socket.SOCK_DGRAM)
        config = {
            "version": 1,
            "logging": {"level": "info"},
            "boot": {"server": "127.0.0.1", "default_target": "iqn.2026-11.org.bootfleet:default"},
            "clients": [
                {"mac": MAC1, "target": IQN1},
                {"mac": MAC2, "target": IQN2, "ip": "127.0.0.1"},
            ],
            "tftp": {"root": str(root), "address": "127.0.0.1", "port": port, "retries": 3, **tftp},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = tmp_path / f"{name}.log"
        proc = procs.start([support.PYTHON, "-m", "services.tftp", "--config", str(path),
                            "--state-dir", str(tmp_path / "state")], log=log)
        wait_ready(port)
        support.wait_for(lambda: "serving" in log.read_text(), timeout=15, what=f"{name} to serve")
        return SimpleNamespace(port=port, log=log, proc=proc, root=root)

    return start


def run(args, timeout=30, **kw):
    return subprocess.run(args, capture_output=True, timeout=timeout, **kw)


def test_real_clients_download_checksummed(start, root, tmp_path):
    server = start()
    for name in ("small.bin", "exact.bin", "big.bin", "empty", "in-link"):
        want = sha((root / name).read_bytes())
        out = tmp_path / f"hpa-{name}"
        r = run(["tftp", "-m", "binary", "127.0.0.1", str(server.port), "-c", "get", name, str(out)])
        assert r.returncode == 0 and sha(out.read_bytes()) == want, (name, r.stderr)
        for blksize in ("512", "1468", "8192") if name != "empty" else ():  # curl 7.88 rejects an OACK tsize 0
            r = run(["curl", "-s", "--tftp-blksize", blksize, f"tftp://127.0.0.1:{server.port}/{name}"])
            assert r.returncode == 0 and sha(r.stdout) == want, (name, blksize)
        out = tmp_path / f"atftp-{name}"
        r = run(["atftp", "--option", "windowsize 16", "--option", "blksize 1468", "-g", "-r", name,
                 "-l", str(out), "127.0.0.1", str(server.port)])
        assert r.returncode == 0 and sha(out.read_bytes()) == want, (name, r.stderr)
    # a window that ends with the empty block (2048 = 4 x 512): the last GSO segment is a bare header
    out = tmp_path / "atftp-exact-512"
    r = run(["atftp", "--option", "windowsize 4", "--option", "blksize 512", "-g", "-r", "exact.bin",
             "-l", str(out), "127.0.0.1", str(server.port)])
    assert r.returncode == 0 and out.read_bytes() == (root / "exact.bin").read_bytes(), r.stderr
    # netascii: tftp-hpa converts CR LF back to the local LF, and bare CR (sent as CR NUL) back to CR
    out = tmp_path / "text-ascii"
    r = run(["tftp", "-m", "ascii", "127.0.0.1", str(server.port), "-c", "get", "text.txt", str(out)])
    assert r.returncode == 0 and out.read_bytes() == (root / "text.txt").read_bytes()
    log = server.log.read_text()
    assert "tftp.transfer.started" in log and "tftp.transfer.finished" in log
    assert "file=big.bin" in log and "bytes=3145728" in log and "windowsize=16" in log and "blksize=1468" in log


@pytest.mark.parametrize("gso", [True, False])
def test_option_negotiation_over_the_wire(start, root, gso):
    server = start(max_windowsize=8, max_blksize=4096, gso=gso)
    size = (root / "big.bin").stat().st_size
    s, data, tid = request(server.port, "big.bin", {"BLKSIZE": 1000, "TSize": 0, "windowSIZE": 4, "timeout": 2,
                                                   "multicast": ""})
    with s:
        assert pk.opcode_of(data) == pk.OACK
        assert pk.parse_oack(data) == {"blksize": "1000", "tsize": str(size), "windowsize": "4", "timeout": "2"}
        s.sendto(pk.build_ack(0), tid)
        blocks = [pk.HEADER.unpack_from(s.recvfrom(2000)[0])[1] for _ in range(4)]
        assert blocks == [1, 2, 3, 4]  # a window of 4 before any ACK
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recvfrom(2000)  # and no fifth
        s.sendto(pk.build_ack(2), tid)  # part of the window: the next one starts at 3
        assert pk.HEADER.unpack_from(s.recvfrom(2000)[0])[1] == 3
    s, data, tid = request(server.port, "big.bin", {"blksize": 1000, "windowsize": 8})
    with s:  # a whole window, in order, with the right sizes (one GSO send when gso is on)
        s.sendto(pk.build_ack(0), tid)
        got = [s.recvfrom(2000)[0] for _ in range(8)]
        assert [pk.HEADER.unpack_from(d)[1] for d in got] == list(range(1, 9))
        assert b"".join(d[4:] for d in got) == (root / "big.bin").read_bytes()[:8000]
    # capped values
    content, oack = fetch(server.port, "small.bin", {"blksize": 65464, "windowsize": 1})
    assert oack == {"blksize": "4096", "windowsize": "1"} and content == (root / "small.bin").read_bytes()
    # no option: no OACK, DATA 1 at once
    s, data, _ = request(server.port, "small.bin")
    s.close()
    assert pk.opcode_of(data) == pk.DATA
    # out of the RFC's range: error 8
    with pytest.raises(TftpError) as exc:
        fetch(server.port, "small.bin", {"blksize": 4})
    assert exc.value.code == 8 and "blksize" in exc.value.message


@pytest.mark.parametrize(
    "name, code",
    [
        ("../secret", 2), ("sub/../../secret", 2), ("/etc/passwd", 2), ("out-link", 2), ("sub", 2), ("null", 2),
        ("missing.bin", 1),
    ],
)
def test_refused_reads(start, name, code):
    server = start()
    with pytest.raises(TftpError) as exc:
        fetch(server.port, name)
    assert exc.value.code == code
    support.wait_for(lambda: f"'{name}'" in server.log.read_text(), timeout=5, what="a log line naming the file")


def test_uploads(start, root, tmp_path):
    readonly = start("ro")
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(70_000))
    s, data, _ = request(readonly.port, "uploads/x.bin", opcode=pk.WRQ)
    s.close()
    assert pk.parse_error(data)[0] == 2 and "read-only" in pk.parse_error(data)[1]
    writable = start("rw", upload_dir="uploads", upload_max_size=100_000)
    r = run(["tftp", "-m", "binary", "127.0.0.1", str(writable.port), "-c", "put", str(local), "uploads/x.bin"])
    assert r.returncode == 0, r.stderr
    support.wait_for(lambda: (root / "uploads" / "x.bin").exists(), timeout=5, what="the upload")
    assert sha((root / "uploads" / "x.bin").read_bytes()) == sha(local.read_bytes())
    for name, code in (("uploads/x.bin", 6), ("small.bin", 2), ("uploads/../small.bin", 2), ("../x", 2)):
        s, data, _ = request(writable.port, name, opcode=pk.WRQ)
        s.close()
        assert pk.parse_error(data)[0] == code, name
    s, data, _ = request(writable.port, "uploads/huge", {"tsize": 200_000}, opcode=pk.WRQ)
    s.close()
    assert pk.parse_error(data)[0] == 3
    assert not [p for p in (root / "uploads").iterdir() if p.name.startswith(".")]  # no temporary left


def test_wrong_tid_gets_error_5_and_changes_nothing(start, root):
    server = start()
    s, data, tid = request(server.port, "small.bin", {"blksize": 512})
    with s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
        assert pk.opcode_of(data) == pk.OACK
        intruder.settimeout(3)
        intruder.sendto(pk.build_ack(0), tid)
        reply, addr = intruder.recvfrom(600)
        assert addr == tid and pk.parse_error(reply)[0] == 5
        s.sendto(pk.build_ack(0), tid)  # the real client goes on as if nothing happened
        chunks = []
        while True:
            data, _ = s.recvfrom(600)
            chunks.append(data[4:])
            s.sendto(pk.build_ack(pk.HEADER.unpack_from(data)[1]), tid)
            if len(data) < 516:
                break
    assert b"".join(chunks) == (root / "small.bin").read_bytes()


def test_duplicate_acks_and_retransmission_on_the_negotiated_timeout(start):
    server = start()
    s, data, tid = request(server.port, "big.bin", {"timeout": 1})
    with s:
        s.sendto(pk.build_ack(0), tid)
        assert pk.HEADER.unpack_from(s.recvfrom(600)[0]) == (pk.DATA, 1)
        s.sendto(pk.build_ack(1), tid)
        s.sendto(pk.build_ack(1), tid)  # the Sorcerer's Apprentice: a duplicate ACK
        s.sendto(pk.build_ack(1), tid)
        assert pk.HEADER.unpack_from(s.recvfrom(600)[0]) == (pk.DATA, 2)
        started = time.monotonic()
        data, _ = s.recvfrom(600)  # no ACK of 2: the same DATA after the timeout, not before
        waited = time.monotonic() - started
        assert pk.HEADER.unpack_from(data) == (pk.DATA, 2) and 0.8 < waited < 2.0
        # a client that is silent (its port still open): the server tries `retries` times, then fails
        support.wait_for(lambda: "tftp.transfer.failed" in server.log.read_text() and "retransmissions" in
                         server.log.read_text(), timeout=10, what="the failed event")


def test_a_client_that_is_gone_ends_its_transfer_at_once(start):
    # the transfer's socket is connected: the ICMP port-unreachable for our next DATA ends it, no retries
    server = start()
    s, data, tid = request(server.port, "big.bin", {"timeout": 1})
    s.close()  # before it ACKs the OACK: the first retransmission meets a closed port
    support.wait_for(lambda: "port is unreachable" in server.log.read_text(), timeout=5, what="the failed event")
    assert "retransmissions" not in server.log.read_text()


MALFORMED = [
    b"", b"\0", b"\0\x01", b"\0\x01\0", b"\0\x01\0\0", b"\0\x01file", b"\0\x01file\0", b"\0\x01file\0octet",
    b"\0\x01file\0foo\0", b"\0\x01file\0octet\0blksize\0", b"\0\x01file\0octet\0blksize\0abc\0",
    b"\0\x01file\0octet\0blksize\0-5\0", b"\0\x01file\0octet\0windowsize\0999999999999\0",
    b"\0\x01" + b"A" * 1000 + b"\0octet\0", b"\0\x01\xff\xfe\0octet\0", b"\0\x02\0octet\0",
    b"\0\x03\0\x01hello", b"\0\x04\0\x01", b"\0\x05\0\x01oops\0", b"\0\x06blksize\x00512\0", b"\xff\xff",
    b"\0\x00", b"\0\x07whatever", os.urandom(1400), b"\0\x01" + b"\0" * 50, b"\0\x01small.bin\0octet\0" + b"x" * 10,
    b"\0\x01small.bin\0octet\0tsize\0" + b"9" * 400 + b"\0",
]


def test_malformed_corpus_then_a_normal_download(start, root):
    server = start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for packet in MALFORMED:
            s.sendto(packet, ("127.0.0.1", server.port))
    # and inside a transfer: garbage from the client's own TID fails that transfer only
    for packet in MALFORMED + [b"\0\x04", b"\0\x04\0"]:
        s, data, tid = request(server.port, "small.bin", {"blksize": 512})
        with s:
            s.sendto(packet, tid)
    # a malformed request is answered with error 4, never larger than itself
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        for packet in (b"\0\x01file\0octet", b"\0\x01file\0binary\0", b"\0\x02xy\0"):
            s.sendto(packet, ("127.0.0.1", server.port))
            reply, _ = s.recvfrom(600)
            assert pk.parse_error(reply)[0] == 4 and len(reply) <= len(packet), (packet, reply)
    content, _ = fetch(server.port, "big.bin", {"blksize": 1468})  # served after all of it: still up
    assert content == (root / "big.bin").read_bytes() and server.proc.poll() is None
    assert "Traceback" not in server.log.read_text()


def test_200_simultaneous_transfers(start, root):
    server = start()
    want = (root / "exact.bin").read_bytes()
    n = 200
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(10)
        s.sendto(pk.build_request(pk.RRQ, "exact.bin", "octet", {"blksize": 512}), ("127.0.0.1", server.port))
        socks.append(s)
    try:
        # every transfer is open at once: each has answered its OACK before any client acknowledges it
        tids = []
        for s in socks:
            data, tid = s.recvfrom(600)
            assert pk.opcode_of(data) == pk.OACK
            tids.append(tid)
        assert len(set(tids)) == n
        results = [None] * n

        def client(i):
            s, tid, chunks = socks[i], tids[i], []
            s.sendto(pk.build_ack(0), tid)
            while True:
                data, _ = s.recvfrom(600)
                block = pk.HEADER.unpack_from(data)[1]
                if block == len(chunks) + 1:
                    chunks.append(data[4:])
                s.sendto(pk.build_ack(block), tid)
                if len(data) < 516:
                    break
            results[i] = b"".join(chunks)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(r == want for r in results)
    finally:
        for s in socks:
            s.close()


def test_per_client_scripts(start):
    server = start()
    by_name = {}
    for name in (f"boot.ipxe-{MAC1}", "boot.ipxe?mac=52-54-00-12-34-02", "pxelinux.cfg/01-52-54-00-12-34-01",
                 "boot.ipxe"):
        by_name[name] = fetch(server.port, name)[0].decode()
    assert by_name[f"boot.ipxe-{MAC1}"] == f"#!ipxe\nset keep-san 1\nsanboot iscsi:127.0.0.1::::{IQN1}\n"
    assert by_name["boot.ipxe?mac=52-54-00-12-34-02"] == f"#!ipxe\nset keep-san 1\nsanboot iscsi:127.0.0.1::::{IQN2}\n"
    assert by_name["pxelinux.cfg/01-52-54-00-12-34-01"] == by_name[f"boot.ipxe-{MAC1}"]
    assert by_name["boot.ipxe"] == by_name["boot.ipxe?mac=52-54-00-12-34-02"]  # 127.0.0.1 is clients[1].ip
    assert f"mac={MAC1}" in server.log.read_text()


def test_several_processes_share_the_port(start, root):
    first = start("one")
    second = start("two", port=first.port)
    want = (root / "small.bin").read_bytes()
    for _ in range(24):
        assert fetch(first.port, "small.bin")[0] == want
    assert first.proc.poll() is None and second.proc.poll() is None
    assert "tftp.transfer.finished" in first.log.read_text()
    assert "tftp.transfer.finished" in second.log.read_text()
