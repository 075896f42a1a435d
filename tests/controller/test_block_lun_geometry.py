"""A `type: block` LUN served through the controller (a published revision, the managed path) takes its
logical block size from the device, as a standalone target does (issue 14). The controller publishes the
normalized configuration, every default filled in; a block size filled in as 512 would reach the service
as if given, and a device of 4096-byte sectors would be refused. Tested on a loop device of 4096-byte
sectors (made here, detached by its name), read back with libiscsi's iscsi-readcapacity16.
Needs root, util-linux's losetup and libiscsi-bin (deploy/system-deps.sh)."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from support import PYTHON, free_port, tool, wait_for

BOOTFLEET = str(Path(PYTHON).parent / "bootfleet")
TARGET = "iqn.2026-12.org.test:block4k"
MiB = 1 << 20



def cli(state, *args, timeout=60):
    return subprocess.run([BOOTFLEET, "--state-dir", str(state), *args], capture_output=True, text=True,
                          timeout=timeout)


def events(state, kind):
    out = cli(state, "--json", "events", "--type", kind, "--limit", "100")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.integration
def test_a_block_lun_from_a_published_revision_has_the_devices_4096_byte_blocks(procs, tmp_path):
    image = tmp_path / "disk4k.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    made = subprocess.run([tool("losetup"), "--sector-size", "4096", "-f", "--show", str(image)],
                          capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    dev = made.stdout.strip()
    try:
        state = tmp_path / "state"
        state.mkdir()
        port = free_port()
        config = tmp_path / "bootfleet.yaml"
        config.write_text(yaml.safe_dump({
            "bus": {"heartbeat_interval": 0.2},
            "iscsi": {"portals": [{"ip": "127.0.0.1", "port": port}], "io_stats_interval": 0,
                      "targets": [{"name": TARGET,
                                   "luns": [{"id": 0, "backstore": {"type": "block", "path": dev}}]}]}}))
        procs.start([PYTHON, "-m", "services.controller", "--config", str(config), "--state-dir", str(state)],
                    log=tmp_path / "controller.log")
        wait_for(lambda: cli(state, "status").returncode == 0, timeout=30, what="controller answering")
        procs.start([PYTHON, "-m", "services.iscsi_target", "--state-dir", str(state), "--instance", "0"],
                    log=tmp_path / "iscsi.log")
        wait_for(lambda: events(state, "service.applied") or events(state, "service.apply_failed"), timeout=30,
                 what="the iSCSI target to apply revision 1")
        assert not events(state, "service.apply_failed"), (tmp_path / "iscsi.log").read_text()[-2000:]
        cap = subprocess.run([tool("iscsi-readcapacity16"), f"iscsi://127.0.0.1:{port}/{TARGET}/0"],
                             capture_output=True, text=True, timeout=30)
        assert cap.returncode == 0, cap.stdout + cap.stderr + (tmp_path / "iscsi.log").read_text()[-2000:]
        assert "LOGICAL BLOCK LENGTH IN BYTES:4096\n" in cap.stdout, cap.stdout
        assert f"Total size:{16 * MiB}\n" in cap.stdout, cap.stdout
        assert "LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:0\n" in cap.stdout, cap.stdout
        published = json.loads((state / "controller" / "running.json").read_text())["config"]
        assert published["iscsi"]["targets"][0]["luns"][0]["backstore"]["block_size"] is None  # "the device's"
    finally:
        procs.stop_all()
        subprocess.run([tool("losetup"), "-d", dev], timeout=30)
