"""`make install` staged under a temporary root, checked by systemd's own verifier; then `make uninstall`.

systemd does not run in CI's container, so the unit is not started; `systemd-analyze verify --root` parses it
as systemd would and checks that every command it runs exists and is executable in the staged tree.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _make(target: str, dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), target], env={**os.environ, "DESTDIR": str(dest)},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_install_gives_a_unit_systemd_accepts_then_uninstall_removes_it(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd)"
    dest = tmp_path / "root"
    r = _make("install", dest)
    assert r.returncode == 0, r.stderr
    unit = dest / "etc/systemd/system/bootfleet.service"
    assert unit.is_file()
    assert (dest / "etc/bootfleet/bootfleet.yaml").is_file()
    assert (dest / "opt/bootfleet/deploy/supervisord.conf").is_file()
    assert not (dest / "opt/bootfleet/var").exists(), "state of the checkout was copied"
    # the installed environment runs: the CLI validates the installed configuration
    cli = dest / "opt/bootfleet/.venv/bin/bootfleet"
    r = subprocess.run([str(cli), "config", "test", str(dest / "etc/bootfleet/bootfleet.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    # systemd's unit files (sysinit.target etc.) for the verifier's dependency checks
    (dest / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", dest / "usr/lib/systemd/system", symlinks=True)
    r = subprocess.run([analyze, f"--root={dest}", "verify", "bootfleet.service"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr

    # a config the operator edited is kept across uninstall; the code and the unit go
    r = _make("uninstall", dest)
    assert r.returncode == 0, r.stderr
    assert not unit.exists() and not (dest / "opt/bootfleet").exists()
    assert (dest / "etc/bootfleet/bootfleet.yaml").is_file()
    assert "kept" in r.stdout
