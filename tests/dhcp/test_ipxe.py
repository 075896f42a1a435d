"""Real iPXE (the ipxe-qemu NIC ROM in a QEMU virtual PC) against the service: its DHCP must finish at once.

Measured here with ipxe-qemu 1.0.0+git-20190125: with option 175.176 and `ipv6_ra` iPXE's "Configuring (net0 ...)"
takes ~0.03 s; without 175.176 ~3 s (ProxyDHCP wait); without the RA ~16 s (IPv6 router wait).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from lab.netns import BRIDGE, Lab
from lab.qemu import VirtualPC

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ipxe_dhcp_and_ipv6_wait_end_at_once(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("needs root: creates a network namespace")
    config = tmp_path / "bootfleet.yaml"
    config.write_text(f"""
logging: {{level: info}}
boot: {{server: 10.77.0.1, default_target: "iqn.2026-11.org.bootfleet:demo"}}
dhcp:
  interfaces: [{{name: {BRIDGE}, ipv6_ra: true}}]
  lease_file: {tmp_path}/leases.sqlite
  scopes: [{{name: lab, subnet: 10.77.0.0/24, interface: {BRIDGE}, ranges: [{{start: 10.77.0.100, end: 10.77.0.199}}]}}]
""")
    log = tmp_path / "dhcp.log"
    with Lab(prefix="bf-dhcp") as lab:
        lab.popen([sys.executable, "-m", "services.dhcp", "--config", str(config), "--state-dir", str(tmp_path)],
                  log=log, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        deadline = time.monotonic() + 15
        while "serving " not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        pc = VirtualPC(name="pc0", mac="52:54:00:12:34:56", tap=lab.add_tap(), netns=lab.name)
        pc.start()
        try:
            line = pc.wait_for(r"Configuring \(net0.*\bok\b", 60)
            pc.wait_for(r"Root path:", 10)
            console = pc.tail(30)
        finally:
            pc.stop()
    took = line.t - line.t_start
    assert took < 1.5, f"iPXE spent {took:.2f} s in DHCP + IPv6 configuration\n{console}"
    assert "Filename: boot.ipxe" in console and "Root path: iscsi:10.77.0.1::::iqn.2026-11.org.bootfleet:demo" in console
    assert "client_class=ipxe" in log.read_text()
