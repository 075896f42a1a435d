"""libiscsi's conformance suites against overlay LUNs (a PC's disk: a version plus its copy-on-write layer)
and a bare version (read-only), served by the real transport over loopback. Every suite must end with no
failed test and no failed assert. iscsi-test-cu is required (libiscsi-bin): missing, the test fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from support import free_port
from tests.iscsi.target_process import run_cu_suite, target_process

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
IQN = "iqn.2026-11.org.bootfleet.test:overlay-conformance"


@pytest.fixture(scope="module")
def portal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlay-cu")
    port = free_port()
    with target_process([sys.executable, str(HERE / "overlay_portal.py"), str(port), str(tmp)], port,
                        tmp / "target.log", timeout=20, what="the overlay target to listen"):
        yield f"iscsi://127.0.0.1:{port}/{IQN}"


def run_suite(url: str, suite: str) -> tuple[int, int]:
    return run_cu_suite(url, suite, timeout=300)


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
