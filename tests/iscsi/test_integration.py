"""The running target (`python -m services.iscsi_target --config FILE`) driven by real initiators:
libiscsi's iscsi-ls, iscsi-inq and iscsi-test-cu, and qemu-io over iscsi://.

Every tool is required: a missing one fails the test (it is in deploy/system-deps.sh).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from services.iscsi_target import pdu as P
from tests.iscsi.target_process import start_target, stop_process
from support import tool

pytestmark = pytest.mark.integration

ANON = "iqn.2026-11.org.bootfleet.test:anon"
CHAP = "iqn.2026-11.org.bootfleet.test:chap"
MUTUAL = "iqn.2026-11.org.bootfleet.test:mutual"
ACL = "iqn.2026-11.org.bootfleet.test:acl"
USER, SECRET = "alice", "alicesecret12"
TUSER, TSECRET = "bootfleet", "targetsecret9"



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """
version: 1
logging: {{level: info}}
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  io_stats_interval: 1
  nop_interval: 5
  targets:
    - name: {anon}
      luns:
        - {{id: 0, backstore: {{type: file, path: anon0.img, size: 64MiB}}}}
        - {{id: 1, backstore: {{type: ram, size: 16MiB}}}}
    - name: {chap}
      auth:
        mode: chap
        users: [{{username: {user}, secret: {secret}}}]
      luns: [{{id: 0, backstore: {{type: ram, size: 4MiB}}}}]
    - name: {mutual}
      auth:
        mode: chap
        users: [{{username: {user}, secret: {secret}}}]
        mutual: {{username: {tuser}, secret: {tsecret}}}
      luns: [{{id: 0, backstore: {{type: ram, size: 4MiB}}}}]
    - name: {acl}
      acls: [iqn.2026-11.org.bootfleet.test:allowed]
      luns: [{{id: 0, backstore: {{type: ram, size: 4MiB}}}}]
"""


class Target:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = free_port()
        self.config = tmp / "bootfleet.yaml"
        self.config.write_text(CONFIG.format(port=self.port, anon=ANON, chap=CHAP, mutual=MUTUAL, acl=ACL, user=USER,
                                             secret=SECRET, tuser=TUSER, tsecret=TSECRET))
        self.log = tmp / "target.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.logf = open(self.log, "ab")
        self.proc = start_target(self.config, self.tmp, self.logf, self.port)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        stop_process(self.proc, 12)
        self.logf.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def url(self, iqn=ANON, lun=0, user=None, secret=None) -> str:
        cred = f"{user}%{secret}@" if user else ""
        return f"iscsi://{cred}127.0.0.1:{self.port}/{iqn}/{lun}"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    t = Target(tmp_path_factory.mktemp("iscsi"))
    t.start()
    try:
        yield t
    finally:
        t.stop()


def wait_log(target, pattern: str, timeout: float = 5.0) -> bool:
    """Events reach the log from another thread: give them a moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, target.log.read_text()):
            return True
        time.sleep(0.1)
    return False


def run(args, timeout=60, env=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_discovery_with_iscsi_ls(target):
    r = run([tool("iscsi-ls"), f"iscsi://127.0.0.1:{target.port}"])
    assert r.returncode == 0, r.stderr
    for iqn in (ANON, CHAP, MUTUAL):
        assert f"Target:{iqn} Portal:127.0.0.1:{target.port},1" in r.stdout
    assert ACL not in r.stdout  # SendTargets lists only what this initiator may log in to


def test_inquiry_and_second_lun(target):
    for lun in (0, 1):
        r = run([tool("iscsi-inq"), target.url(lun=lun)])
        assert r.returncode == 0 and "DIRECT_ACCESS" in r.stdout, r.stderr


def test_chap_right_wrong_missing(target):
    inq = tool("iscsi-inq")
    assert run([inq, target.url(CHAP, user=USER, secret=SECRET)]).returncode == 0
    assert run([inq, target.url(CHAP, user=USER, secret="wrongsecret99")]).returncode != 0
    assert run([inq, target.url(CHAP)]).returncode != 0
    assert run([inq, target.url(CHAP, user="mallory", secret=SECRET)]).returncode != 0
    for reason in ("wrong CHAP secret for user alice", "unknown CHAP user mallory", "no CHAP credentials"):
        assert wait_log(target, reason), reason


def test_mutual_chap(target):
    inq = tool("iscsi-inq")
    good = {"LIBISCSI_CHAP_TARGET_USERNAME": TUSER, "LIBISCSI_CHAP_TARGET_PASSWORD": TSECRET}
    r = run([inq, target.url(MUTUAL, user=USER, secret=SECRET)], env=good)
    assert r.returncode == 0, r.stderr
    bad = {"LIBISCSI_CHAP_TARGET_USERNAME": TUSER, "LIBISCSI_CHAP_TARGET_PASSWORD": "notthetarget1"}
    assert run([inq, target.url(MUTUAL, user=USER, secret=SECRET)], env=bad).returncode != 0
    # a target without a mutual secret refuses an initiator that demands one
    assert run([inq, target.url(CHAP, user=USER, secret=SECRET)], env=good).returncode != 0


def test_initiator_acl(target):
    inq = tool("iscsi-inq")
    assert run([inq, target.url(ACL)]).returncode != 0
    assert run([inq, "-i", "iqn.2026-11.org.bootfleet.test:allowed", target.url(ACL)]).returncode == 0


def test_qemu_io_patterns(target):
    qio = tool("qemu-io")
    url = target.url(lun=1)
    r = run([qio, "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 1M 64k", "-c", "write -P 0x11 3M 4k",
             "-c", "read -P 0x5a 0 1M", "-c", "read -P 0xa5 1M 64k", "-c", "read -P 0x11 3M 4k",
             "-c", "read -P 0 2M 64k", url])
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_qemu_io_with_header_digests(target):
    # libiscsi computes and checks CRC32C header digests (it has no data digests): a wrong digest on either side
    # would drop the connection and fail the patterns
    qio = tool("qemu-io")
    for digest in ("crc32c", "crc32c-none"):
        r = run([qio, "--image-opts", "-c", "write -P 0x3c 4M 256k", "-c", "read -P 0x3c 4M 256k",
                 "-c", "read -P 0 5M 64k", f"driver=iscsi,transport=tcp,portal=127.0.0.1:{target.port},"
                 f"target={ANON},lun=1,header-digest={digest}"])
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert wait_log(target, r"iscsi\.login .*header_digest=CRC32C data_digest=None")


def malformed_corpus() -> list[bytes]:
    login_ok = P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, lun=(0x80AB << 32) << 16, itt=1,
                                words=(0, 1, 0, 0, 0, 0, 0),
                                data=P.encode_text([("InitiatorName", "iqn.2026-11.org.x:fuzz"), ("TargetName", ANON)]))
    corpus = [
        b"",  # connect and close
        b"\x00" * 10,  # a truncated header
        b"\xff" * 48,  # a reserved opcode with a 16 MiB data segment length
        P.encode_request(0x1D, flags=0x80, itt=1),  # unknown opcode before login
        P.encode_request(P.OP_SCSI_CMD, flags=0x80, itt=1),  # SCSI before login
        P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, itt=1, data=b"no equals sign\0"),
        P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0xC7, itt=1),  # T and C together
        P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x8B, itt=1),  # CSG 2
        P.encode_request(P.OP_LOGIN_REQ, immediate=True, flags=0x87, b3=9, itt=1),  # version 9
        login_ok[:60],  # cut inside the data segment
        bytes(login_ok[:4]) + b"\xff\xff\xff\xff" + login_ok[8:],  # AHS/data lengths lie
        login_ok + P.encode_request(0x1D, flags=0x80, itt=2),  # unknown opcode in full feature phase
        login_ok + P.encode_request(P.OP_DATA_OUT, flags=0x80, itt=77, words=(5, 0, 0, 0, 0, 0, 0), data=b"x" * 100),
        login_ok + P.encode_request(P.OP_SCSI_CMD, flags=0xA0, itt=3, words=(1 << 30, 2, 0, 0x2A000000, 0, 1, 0)),
        login_ok + P.encode_request(P.OP_TMF_REQ, flags=0x80 | 0x55, itt=4, words=(0, 2, 0, 0, 0, 0, 0)),
        login_ok + P.encode_request(P.OP_TEXT_REQ, flags=0x80, itt=5, words=(0xFFFFFFFF, 2, 0, 0, 0, 0, 0),
                                    data=b"SendTargets\0=\0\0\0"),
        login_ok + P.encode_request(P.OP_LOGOUT_REQ, flags=0x80 | 0x33, itt=6, words=(0, 2, 0, 0, 0, 0, 0)),
        login_ok + os.urandom(4096),
    ]
    return corpus


def test_malformed_pdus_never_kill_the_target(target):
    for i, blob in enumerate(malformed_corpus()):
        with socket.create_connection(("127.0.0.1", target.port), timeout=2) as s:
            try:
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(1)
                while s.recv(65536):
                    pass
            except OSError:
                pass  # the target may close first: that is a fine answer
        assert target.alive(), f"corpus item {i} killed the target"
    r = run([tool("iscsi-inq"), target.url()])
    assert r.returncode == 0, "a normal login must still work after the corpus"
    assert "Traceback" not in target.log.read_text()


def test_kill9_after_synchronize_cache_loses_nothing(tmp_path):
    t = Target(tmp_path)
    t.start()
    try:
        qio = tool("qemu-io")
        r = run([qio, "-f", "raw", "-c", "write -P 0x3c 0 2M", "-c", "write -P 0xc3 5M 64k", "-c", "flush", t.url()])
        assert r.returncode == 0, r.stderr
        t.kill9()  # right after SYNCHRONIZE CACHE completed
        t.start()
        r = run([qio, "-f", "raw", "-c", "read -P 0x3c 0 2M", "-c", "read -P 0xc3 5M 64k", t.url()])
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        t.stop()


def test_events_in_the_log(target):
    run([tool("iscsi-inq"), target.url()])
    run([tool("iscsi-inq"), target.url(CHAP, user=USER, secret="wrongsecret99")])  # this test alone also sees one
    assert wait_log(target, r"iscsi\.login ip=127\.0\.0\.1 initiator=\S+ target=" + re.escape(ANON))
    assert wait_log(target, r"iscsi\.logout .*reason=logout")
    assert wait_log(target, r"iscsi\.login\.failed .*reason=wrong CHAP secret")
    assert wait_log(target, r"iscsi\.io_stats .*reads=\d+ writes=\d+ .*latency_us_avg=")


def test_iscsi_test_cu_conformance(target):
    """libiscsi's conformance suite against two LUN-0 URLs (the multipath tests need a second path)."""
    url = target.url()
    r = run([tool("iscsi-test-cu"), "--dataloss", "--test=ALL", url, url], timeout=300)
    out = r.stdout + r.stderr
    summary = re.search(r"Run Summary:.*?(?:Elapsed time.*?\n|\Z)", out, re.S)
    text = summary.group(0) if summary else out[-3000:]
    print("\niscsi-test-cu summary:\n" + text)
    # Per test: passed outright, passed with a "[SKIPPED] ... not implemented" note, or failed.
    verdicts = {"passed": 0, "skipped": 0, "failed": 0}
    for chunk in re.split(r"\n\s*Test: ", out)[1:]:
        m = re.match(r"(\S+) \.\.\.(.*?)(?<!\[)(passed|FAILED)(?!\])", chunk, re.S)
        if not m:
            continue
        if m.group(3) == "FAILED":
            verdicts["failed"] += 1
        elif "[SKIPPED]" in m.group(2):
            verdicts["skipped"] += 1
        else:
            verdicts["passed"] += 1
    print(f"iscsi-test-cu: {verdicts['passed']} passed, {verdicts['failed']} failed, "
          f"{verdicts['skipped']} passed as skipped (not implemented / not applicable)")
    tests = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text)
    asserts = re.search(r"asserts\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text)
    assert tests, out[-3000:]
    failed = int(tests.group(4))
    if failed:
        names = re.findall(r"Test: (\S+) \.\.\.\s*FAILED|^\s*\d+\. (.+?):\d+\s+- ", out, re.M)
        print("failures:", names[:50])
    assert failed == 0, text
    assert asserts and int(asserts.group(4)) == 0
