"""The stack under supervisord: scale, restart one by one, a killed service comes back on the current revision.

Real supervisord (deploy/supervisord.conf) and the real DHCP service, which serves no interface in this
configuration, so nothing here answers a broadcast.
"""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from support import PYTHON, ROOT, wait_for

BOOTFLEET = str(Path(PYTHON).parent / "bootfleet")
SUPERVISORD = str(Path(PYTHON).parent / "supervisord")


class Supervised:
    def __init__(self, procs, tmp_path, config):
        self.state = tmp_path / "state"
        (self.state / "log").mkdir(parents=True)
        self.config = tmp_path / "bootfleet.yaml"
        self.config.write_text(yaml.safe_dump(config))
        env = {
            "BOOTFLEET_HOME": str(ROOT),
            "BOOTFLEET_PYTHON": PYTHON,
            "BOOTFLEET_STATE_DIR": str(self.state),
            "BOOTFLEET_CONFIG": str(self.config),
        }
        self.supervisord = procs.start([SUPERVISORD, "-n", "-c", str(ROOT / "deploy" / "supervisord.conf")], env=env,
                                       log=tmp_path / "supervisord.out")

    def cli(self, *args, timeout=20):
        return subprocess.run([BOOTFLEET, "--state-dir", str(self.state), "--timeout", str(timeout), *args],
                              capture_output=True, text=True)

    def status(self):
        out = self.cli("--json", "status")
        return json.loads(out.stdout) if out.returncode == 0 else None

    def procs_of(self, service):
        s = self.status()
        if not s:
            return []
        return [p for p in s["processes"] if p["service"] == service and p["state"] == "RUNNING"]

    def settled(self, service, count, revision):
        rows = self.procs_of(service)
        ok = len(rows) == count and all(r.get("revision") == revision and r.get("health") == "ok" for r in rows)
        return rows if ok else None


@pytest.fixture
def stack(procs, tmp_path):
    return Supervised(procs, tmp_path, {
        "bus": {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0},
        "scale": {"dhcp": 1, "tftp": 0, "iscsi_target": 0},
    })


@pytest.mark.integration
def test_scale_restart_and_supervisord_restarts_a_killed_service(stack):
    rows = wait_for(lambda: stack.settled("dhcp", 1, 1), timeout=30, interval=0.3, what="dhcp[0] on revision 1")

    out = stack.cli("service", "scale", "dhcp", "3")
    assert out.returncode == 0, out.stderr
    rows = wait_for(lambda: stack.settled("dhcp", 3, 2), timeout=30, interval=0.3, what="3 dhcp processes on revision 2")
    assert sorted(r["instance"] for r in rows) == [0, 1, 2]
    before = {r["instance"]: r["pid"] for r in rows}

    out = stack.cli("service", "restart", "dhcp", timeout=60)
    assert out.returncode == 0, out.stderr
    rows = wait_for(lambda: stack.settled("dhcp", 3, 2), timeout=30, interval=0.3, what="restarted processes back")
    after = {r["instance"]: r["pid"] for r in rows}
    assert all(after[i] != before[i] for i in before), (before, after)

    assert stack.cli("config", "set", "logging.level", "debug").returncode == 0  # revision 3
    victim = after[1]
    os.kill(victim, signal.SIGKILL)
    rows = wait_for(lambda: (r := stack.settled("dhcp", 3, 3)) and all(x["pid"] != victim for x in r) and r,
                    timeout=30, interval=0.3, what="supervisord restarts the killed process on revision 3")

    out = stack.cli("service", "scale", "dhcp", "1")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: stack.settled("dhcp", 1, 4), timeout=30, interval=0.3, what="back to one process")
    assert stack.cli("service", "scale", "dhcp", "9").returncode == 1  # above the ceiling (scale.dhcp <= 8)

    # auto: one process per core the controller may use (the iSCSI target's default)
    cores = min(8, len(os.sched_getaffinity(0)))
    out = stack.cli("service", "scale", "dhcp", "auto")
    assert out.returncode == 0, out.stderr
    assert f"dhcp: {cores} process" in out.stdout, out.stdout
    wait_for(lambda: stack.settled("dhcp", cores, 5), timeout=30, interval=0.3, what=f"{cores} dhcp processes")
    assert stack.status()["scale"] == {"dhcp": cores, "tftp": 0, "iscsi_target": 0}
    got = json.loads(stack.cli("--json", "config", "get", "scale.dhcp").stdout)
    assert got["value"] == "auto"
    assert stack.cli("service", "scale", "dhcp", "many").returncode == 2  # argparse: not a count
