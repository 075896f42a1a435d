"""`bootfleet image ...` and `bootfleet client assign/reset` against a running controller (no services): a new
image in two commands, progress through a pipe, --json on each, the PC's row in `bootfleet clients`."""

import json
import os
import subprocess

import pytest
import yaml

from support import PYTHON, ROOT, wait_for

BOOTFLEET = str(ROOT / ".venv" / "bin" / "bootfleet")
MAC = "52:54:00:00:00:31"

pytestmark = pytest.mark.integration


def bf(state, *args, check=True):
    done = subprocess.run([BOOTFLEET, "--state-dir", str(state), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1"})
    if check:
        assert done.returncode == 0, f"bootfleet {' '.join(args)}: {done.stderr}{done.stdout}"
    return done


@pytest.fixture
def running(procs, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "bootfleet.yaml"
    config.write_text(yaml.safe_dump({"bus": {"heartbeat_interval": 0.2}}))
    procs.start([PYTHON, "-m", "services.controller", "--config", str(config), "--state-dir", str(state)],
                log=state / "controller.log")
    wait_for(lambda: bf(state, "status", check=False).returncode == 0, timeout=30, what="controller answering")
    return state


def test_a_new_pc_boots_a_new_image_in_two_commands(running, tmp_path):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(8 << 20))
    vhd = tmp_path / "disk.vhdx"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", str(raw), str(vhd)], check=True)

    done = bf(running, "image", "import", "win10", str(vhd))
    assert "image win10: version 1 imported" in done.stdout, done.stdout
    assert "import win10: " in done.stderr and "%" in done.stderr, done.stderr  # progress lines on stderr
    done = bf(running, "client", "assign", MAC, "win10", "--mode", "persistent", "--name", "pc31")
    assert "image win10" in done.stdout

    info = json.loads(bf(running, "--json", "image", "info", "win10").stdout)["image"]
    assert info["current"] == 1 and info["versions"][0]["source"].startswith("import disk.vhdx")
    assert info["pcs"] == [{"mac": MAC, "pc": "pc31", "mode": "persistent", "target": "iqn.2026-12.org.bootfleet:win10.pc31",
                            "version": 1, "boot": 1, "sessions": 0, "overlay": 0, "overlay_version": None}]
    client = json.loads(bf(running, "--json", "client", MAC).stdout)["client"]
    assert client["target"] == "iqn.2026-12.org.bootfleet:win10.pc31" and client["mode"] == "persistent"
    table = bf(running, "clients").stdout
    assert "image" in table.splitlines()[0] and "win10" in table and "persistent" in table

    out = tmp_path / "out.qcow2"
    done = bf(running, "--json", "image", "export", "win10", "1", str(out), "--format", "qcow2")
    assert json.loads(done.stdout)["finished"]["ok"]
    subprocess.run(["qemu-img", "compare", "-F", "raw", str(out), str(raw)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "check", str(out)], check=True, capture_output=True)
    verified = json.loads(bf(running, "--json", "image", "verify", "win10").stdout)
    assert verified["finished"]["ok"], verified

    assert "version 1" in bf(running, "image", "create", "blank", "--size", "40G").stdout
    listed = json.loads(bf(running, "--json", "image", "list").stdout)["images"]
    assert [(i["name"], i["size"]) for i in listed] == [("blank", 40 << 30), ("win10", 64 << 20)]
    assert "win10" in bf(running, "image", "list").stdout
    assert "nothing to prune" in bf(running, "image", "prune", "win10").stdout
    refused = bf(running, "image", "publish", "win10", check=False)
    assert refused.returncode == 1 and "no super client" in refused.stderr
    reset = json.loads(bf(running, "--json", "client", "reset", MAC).stdout)
    assert reset["had_overlay"] is False and reset["version"] == 1
    events = bf(running, "--json", "events", "--type", "image").stdout
    assert "image.overlay.reset" in events and '"operator"' in events
