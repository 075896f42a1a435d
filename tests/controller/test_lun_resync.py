"""`bootfleet lun resync TARGET LUN` through a real controller and a real iSCSI target process (issue 14): a
mirror LUN loses a leg under qemu-io's writes (its file removed; the next flush drops it), the drop reaches the
bus as iscsi.mirror.leg_dropped, the CLI's progress lines come from the service's operation.progress events,
and afterwards both legs hold the same bytes, the writes made while degraded included."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from support import PYTHON, free_port, tool, wait_for

BOOTFLEET = str(Path(PYTHON).parent / "bootfleet")
TARGET = "iqn.2026-12.org.test:mirror"
MiB = 1 << 20



def cli(state, *args, timeout=60):
    return subprocess.run([BOOTFLEET, "--state-dir", str(state), *args], capture_output=True, text=True, timeout=timeout)


def events(state, kind):
    out = cli(state, "--json", "events", "--type", kind, "--limit", "100")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]  # one JSON object a line


@pytest.mark.integration
def test_lun_resync_rebuilds_a_dropped_leg_with_progress(procs, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    port = free_port()
    legs = [state / "legs" / "a.img", state / "legs" / "b.img"]
    config = tmp_path / "bootfleet.yaml"
    config.write_text(yaml.safe_dump({
        "bus": {"heartbeat_interval": 0.2},
        "iscsi": {"portals": [{"ip": "127.0.0.1", "port": port}], "io_stats_interval": 0,
                  "targets": [{"name": TARGET, "luns": [{"id": 1, "backstore": {
                      "type": "mirror", "legs": [{"type": "file", "path": str(p), "size": "48MiB"} for p in legs]}}]}]}}))
    procs.start([PYTHON, "-m", "services.controller", "--config", str(config), "--state-dir", str(state)],
                log=tmp_path / "controller.log")
    wait_for(lambda: cli(state, "status").returncode == 0, timeout=30, what="controller answering")
    procs.start([PYTHON, "-m", "services.iscsi_target", "--state-dir", str(state), "--instance", "0"],
                log=tmp_path / "iscsi.log")
    wait_for(lambda: events(state, "service.applied"), timeout=30, what="the iSCSI target applied revision 1")

    url = f"iscsi://127.0.0.1:{port}/{TARGET}/1"
    io = lambda *cmds: subprocess.run([tool("qemu-io"), "-f", "raw", *sum((["-c", c] for c in cmds), []), url],
                                      capture_output=True, text=True, timeout=60)
    first = io("write -P 0x5a 0 8M", "flush")
    assert first.returncode == 0 and "error" not in first.stdout.lower(), first.stdout + first.stderr
    legs[1].unlink()  # leg b is gone; the next flush finds it out
    degraded = io("write -P 0xa5 16M 4M", "flush", "write -P 0x3c 40M 1M", "flush")
    assert degraded.returncode == 0 and "error" not in degraded.stdout.lower(), degraded.stdout + degraded.stderr
    dropped = wait_for(lambda: events(state, "iscsi.mirror.leg_dropped"), timeout=20, what="the leg-dropped event")
    f = dropped[-1]["fields"]
    assert (f["target"], f["lun"], f["leg"], f["name"]) == (TARGET, 1, 1, str(legs[1])), f
    assert "removed" in f["reason"], f

    out = cli(state, "lun", "resync", TARGET, "1", "--within", "60", timeout=90)
    assert out.returncode == 0, out.stderr
    assert "in sync again (48 MiB copied" in out.stdout, out.stdout
    lines = out.stderr.splitlines()  # through a pipe: a line per 10 %, then the end
    title = f"resync {TARGET} LUN 1"
    assert lines[0].startswith(f"{title}: 10% ("), lines
    assert lines[-1].startswith(f"{title}: 100% (48.0 MiB): {TARGET} LUN 1: leg 1"), lines
    assert len(lines) >= 5, lines
    print("\n" + out.stderr + out.stdout)
    assert legs[1].read_bytes() == legs[0].read_bytes()
    data = legs[1].read_bytes()
    assert data[:8 * MiB] == b"\x5a" * (8 * MiB) and data[16 * MiB:20 * MiB] == b"\xa5" * (4 * MiB)
    assert data[40 * MiB:41 * MiB] == b"\x3c" * MiB
    resynced = events(state, "iscsi.mirror.resynced")
    assert resynced and resynced[-1]["fields"]["bytes"] == 48 * MiB and resynced[-1]["fields"]["leg"] == 1
    progress = [e["fields"] for e in events(state, "operation.progress") if e["fields"]["name"] == "lun-resync"]
    assert progress[0]["done"] == 0 and progress[-1]["done"] == progress[-1]["total"] == 48 * MiB

    # a second resync has nothing to do; a LUN that is not a mirror is refused by the controller at once
    again = cli(state, "lun", "resync", TARGET, "1")
    assert again.returncode == 0 and "both legs are in sync" in again.stdout, again.stdout + again.stderr
    wrong = cli(state, "lun", "resync", TARGET, "0")
    assert wrong.returncode == 1 and f"{TARGET} has no LUN 0" in wrong.stderr, wrong.stderr
