"""`make up` / `make down` as a newcomer runs them, on loopback ports: the whole stack comes up, serves the
demo target and the iPXE loader, survives a second `make up`, and goes away with `make down`."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from support import ROOT, free_port, wait_for
import socket

BOOTFLEET = str(ROOT / ".venv" / "bin" / "bootfleet")


def make(*args, timeout=180):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_make_up_status_serves_then_down(tmp_path):
    for tool in ("iscsi-ls", "curl"):
        assert shutil.which(tool), f"{tool} is missing: run `make test` as root (deploy/system-deps.sh installs it)"
    assert Path("/usr/lib/ipxe/undionly.kpxe").exists(), "Debian's ipxe package is missing (apt-get install ipxe)"
    state = tmp_path / "state"
    iscsi_port, tftp_port = free_port(), free_port(socket.SOCK_DGRAM)
    defaults = yaml.safe_load((ROOT / "deploy" / "bootfleet.yaml").read_text())
    config = dict(defaults)
    config["iscsi"] = {**defaults["iscsi"], "portals": [{"ip": "127.0.0.1", "port": iscsi_port}]}
    config["tftp"] = {**(defaults.get("tftp") or {}), "address": "127.0.0.1", "port": tftp_port}  # root: the default, <state>/tftp
    config["bus"] = {"heartbeat_interval": 0.3}
    cfg = tmp_path / "bootfleet.yaml"
    cfg.write_text(yaml.safe_dump(config))
    args = [f"STATE_DIR={state}", f"CONFIG={cfg}"]
    try:
        up = make("up", *args)
        assert up.returncode == 0, up.stdout + up.stderr

        def status():
            out = subprocess.run([BOOTFLEET, "--state-dir", str(state), "--json", "status"], capture_output=True, text=True)
            return json.loads(out.stdout) if out.returncode == 0 else None

        def all_up():
            s = status()
            if not s:
                return None
            rows = {p["service"]: p for p in s["processes"] if p.get("state") == "RUNNING" and p.get("health") == "ok"}
            return s if set(rows) == {"dhcp", "tftp", "iscsi_target"} else None

        first = wait_for(all_up, timeout=60, interval=0.5, what="controller, dhcp, tftp and iscsi_target running on revision 1")
        assert first["controller"]["revision"] == 1
        pids = sorted(p["pid"] for p in first["processes"])

        ls = subprocess.run(["iscsi-ls", f"iscsi://127.0.0.1:{iscsi_port}"], capture_output=True, text=True, timeout=30)
        assert "iqn.2026-11.org.bootfleet:demo" in ls.stdout, ls.stdout + ls.stderr
        got = tmp_path / "undionly.kpxe"
        curl = subprocess.run(["curl", "-s", "-o", str(got), f"tftp://127.0.0.1:{tftp_port}/undionly.kpxe"], timeout=60)
        assert curl.returncode == 0
        want = Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
        assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(want).digest()

        again = make("up", *args)  # harmless: same revision, same processes
        assert again.returncode == 0, again.stdout + again.stderr
        second = wait_for(all_up, timeout=30, interval=0.5, what="still up")
        assert second["controller"]["revision"] == 1
        assert sorted(p["pid"] for p in second["processes"]) == pids

        st = make("status", f"STATE_DIR={state}")
        assert st.returncode == 0 and "iscsi_target" in st.stdout
    finally:
        down = make("down", f"STATE_DIR={state}")
    assert down.returncode == 0, down.stdout + down.stderr
    pidfile = state / "supervisord.pid"
    assert not pidfile.exists() or not Path(f"/proc/{pidfile.read_text().strip()}").exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
