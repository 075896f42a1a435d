"""libiscsi's conformance suites against the running target (`python -m services.iscsi_target`), on
the units the transport's own run does not cover: a read-only image, 4096-byte blocks in RAM, and a
sparse image whose UNMAPs punch holes. Every suite must end with no failed test and no failed assert.

iscsi-test-cu is required (libiscsi-bin, in deploy/system-deps.sh): missing, the test fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from support import free_port
from tests.iscsi.target_process import run_cu_suite, target_process

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


@pytest.fixture(scope="module")
def portal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scsi-cu")
    port = free_port()
    (tmp / "ro.img").write_bytes(b"\x5a" * (4 << 20))
    config = tmp / "bootfleet.yaml"
    config.write_text(CONFIG.format(port=port, iqn=IQN))
    with target_process([sys.executable, "-m", "services.iscsi_target", "--config", str(config),
                         "--state-dir", str(tmp)], port, tmp / "target.log", timeout=15, cwd=ROOT):
        yield f"iscsi://127.0.0.1:{port}/{IQN}"


def run_suite(url: str, suite: str) -> tuple[int, int]:
    return run_cu_suite(url, suite, timeout=120)


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
