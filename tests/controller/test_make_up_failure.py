"""`make up` as a new user runs it with another TFTP server already on the port: it waits until every process
has applied the revision or failed, then exits non-zero with one line naming tftp[0], the address and why;
`bootfleet status` shows `failed: <reason>` for it. Then `make down`."""

import json
import socket
import subprocess

import pytest
import yaml

from support import ROOT, free_port

BOOTFLEET = str(ROOT / ".venv" / "bin" / "bootfleet")


def make(*args, timeout=180):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_make_up_names_a_service_that_cannot_listen(tmp_path):
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # "tftpd-hpa", without SO_REUSEPORT
    squatter.bind(("127.0.0.1", 0))
    tftp_port = squatter.getsockname()[1]
    state = tmp_path / "state"
    defaults = yaml.safe_load((ROOT / "deploy" / "bootfleet.yaml").read_text())
    config = dict(defaults)
    config["iscsi"] = {**defaults["iscsi"], "portals": [{"ip": "127.0.0.1", "port": free_port()}]}
    config["tftp"] = {**(defaults.get("tftp") or {}), "address": "127.0.0.1", "port": tftp_port}
    config["bus"] = {"heartbeat_interval": 0.3}
    cfg = tmp_path / "bootfleet.yaml"
    cfg.write_text(yaml.safe_dump(config))
    try:
        up = make("up", f"STATE_DIR={state}", f"CONFIG={cfg}")
        assert up.returncode != 0, up.stdout + up.stderr
        lines = [line for line in up.stderr.splitlines() if line.startswith("tftp[0]: ")]
        assert lines == [f"tftp[0]: cannot listen on 127.0.0.1:{tftp_port}: address in use (another TFTP server running?)"], up.stderr
        assert not any(line.startswith(("dhcp[", "iscsi_target[")) for line in up.stderr.splitlines()), up.stderr
        out = subprocess.run([BOOTFLEET, "status", "--json", "--state-dir", str(state)], capture_output=True, text=True)
        rows = {p["service"]: p for p in json.loads(out.stdout)["processes"]}
        assert rows["tftp"]["health"] == f"failed: cannot listen on 127.0.0.1:{tftp_port}: address in use (another TFTP server running?)"
        assert rows["tftp"]["failed"]["revision"] == 1
        assert rows["iscsi_target"]["health"] == "ok" and rows["dhcp"]["health"] == "ok"
        table = subprocess.run([BOOTFLEET, "--state-dir", str(state), "status"], capture_output=True, text=True)
        assert f"failed: cannot listen on 127.0.0.1:{tftp_port}" in table.stdout
        # the port freed and the revision fixed (another port): make up says nothing wrong and exits 0
        squatter.close()
        config["tftp"]["port"] = free_port(socket.SOCK_DGRAM)
        cfg.write_text(yaml.safe_dump(config))
        again = make("up", f"STATE_DIR={state}", f"CONFIG={cfg}")
        assert again.returncode == 0, again.stdout + again.stderr
        rows = {p["service"]: p for p in json.loads(subprocess.run(
            [BOOTFLEET, "--state-dir", str(state), "--json", "status"], capture_output=True, text=True).stdout)["processes"]}
        assert rows["tftp"]["health"] == "ok" and rows["tftp"]["failed"] is None
    finally:
        squatter.close()
        down = make("down", f"STATE_DIR={state}")
    assert down.returncode == 0, down.stdout + down.stderr
