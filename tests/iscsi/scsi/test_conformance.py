"""libiscsi's conformance suites against the running target (`python -m services.iscsi_target`), on
the units the transport's own run does not cover: a read-only image, 4096-byte blocks in RAM, and a
sparse image whose UNMAPs punch holes. Every suite must end with no failed test and no failed assert.

iscsi-test-cu is required (libiscsi-bin, in deploy/system-deps.sh): missing, the test fails.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
IQN = "iqn.2026-11.org.bootfleet.test:scsi-conformance"

CONFIG = """
version: 1
logging: {{level: warning}}
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  targets:
    - name: {iqn}
      luns:
        - {{id: 0, backstore: {{type: file, path: thin.img, size: 32MiB, sparse: true}}}}
        - {{id: 1, backstore: {{type: file, path: ro.img, readonly: true, create: false}}}}
        - {{id: 2, backstore: {{type: ram, size: 32MiB, block_size: 4096}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def portal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scsi-cu")
    port = free_port()
    (tmp / "ro.img").write_bytes(b"\x5a" * (4 << 20))
    config = tmp / "bootfleet.yaml"
    config.write_text(CONFIG.format(port=port, iqn=IQN))
    log = open(tmp / "target.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.iscsi_target", "--config", str(config),
                             "--state-dir", str(tmp)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (tmp / "target.log").read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "target did not listen within 15 s"
                time.sleep(0.05)
        yield f"iscsi://127.0.0.1:{port}/{IQN}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def run_suite(url: str, suite: str) -> tuple[int, int]:
    tool = shutil.which("iscsi-test-cu")
    assert tool, "iscsi-test-cu is not installed (deploy/system-deps.sh installs libiscsi-bin)"
    r = subprocess.run([tool, "--dataloss", f"--test={suite}", url], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    tests = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    asserts = re.search(r"asserts\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert tests and asserts, out[-3000:]
    failed = int(tests.group(4)) + int(asserts.group(4))
    assert failed == 0, out[-4000:]
    return int(tests.group(3)), int(asserts.group(3))


def test_read_only_unit(portal):
    passed, asserts = run_suite(f"{portal}/1", "SCSI.ReadOnly")
    assert passed == 1 and asserts > 5


@pytest.mark.parametrize("suite", ["SCSI.Read16", "SCSI.Write16", "SCSI.CompareAndWrite", "SCSI.WriteSame16",
                                   "SCSI.ModeSense6", "SCSI.Inquiry"])
def test_4096_byte_blocks(portal, suite):
    passed, _ = run_suite(f"{portal}/2", suite)
    assert passed > 0


@pytest.mark.parametrize("suite", ["SCSI.Unmap", "SCSI.GetLBAStatus", "SCSI.WriteSame10"])
def test_thin_image(portal, suite):
    passed, _ = run_suite(f"{portal}/0", suite)
    assert passed > 0
