"""libiscsi's conformance suites against overlay LUNs (a PC's disk: a version plus its copy-on-write layer)
and a bare version (read-only), served by the real transport over loopback. Every suite must end with no
failed test and no failed assert. iscsi-test-cu is required (libiscsi-bin): missing, the test fails.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import free_port, wait_for

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
IQN = "iqn.2026-11.org.bootfleet.test:overlay-conformance"


@pytest.fixture(scope="module")
def portal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlay-cu")
    port = free_port()
    log = open(tmp / "target.log", "wb")
    proc = subprocess.Popen([sys.executable, str(HERE / "overlay_portal.py"), str(port), str(tmp)],
                            stdout=log, stderr=subprocess.STDOUT)

    def listening():
        assert proc.poll() is None, (tmp / "target.log").read_text()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        wait_for(listening, timeout=20, what="the overlay target to listen")
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
    r = subprocess.run([tool, "--dataloss", f"--test={suite}", url], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    tests = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    asserts = re.search(r"asserts\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert tests and asserts, out[-3000:]
    failed = int(tests.group(4)) + int(asserts.group(4))
    assert failed == 0, out[-4000:]
    return int(tests.group(3)), int(asserts.group(3))


SUITES = ["SCSI.Read10", "SCSI.Read16", "SCSI.Write10", "SCSI.Write16", "SCSI.WriteSame10", "SCSI.WriteSame16",
          "SCSI.Unmap", "SCSI.GetLBAStatus", "SCSI.CompareAndWrite", "SCSI.OrWrite", "SCSI.Verify16",
          "SCSI.WriteVerify16", "SCSI.ReadCapacity16", "SCSI.Mandatory", "SCSI.Read6", "SCSI.Write12", "SCSI.Inquiry"]


@pytest.mark.parametrize("suite", SUITES)
def test_overlay_512(portal, suite):
    passed, _ = run_suite(f"{portal}/0", suite)
    assert passed > 0


@pytest.mark.parametrize("suite", ["SCSI.Read16", "SCSI.Write16", "SCSI.WriteSame16", "SCSI.Unmap",
                                   "SCSI.CompareAndWrite"])
def test_overlay_4096_byte_blocks(portal, suite):
    passed, _ = run_suite(f"{portal}/1", suite)
    assert passed > 0


def test_version_alone_is_read_only(portal):
    passed, asserts = run_suite(f"{portal}/2", "SCSI.ReadOnly")
    assert passed == 1 and asserts > 5
