"""ProxyDHCP end to end: the site's own DHCP server (dnsmasq, addresses only, on another host of the LAN)
hands out the addresses, Bootfleet runs beside it in `dhcp.mode: proxy` and every boot answer is its own.

- BIOS PC with the iPXE ROM: ProxyDHCP offer (script + root-path) -> TFTP script -> sanboot -> OS marker;
  beside dnsmasq, and beside ISC Kea (kea-dhcp4: a subnet and a pool only).
- UEFI PC, OVMF's own PXE: offer + port 4011 -> snponly.efi -> iPXE -> script -> sanboot -> GRUB -> OS marker.
"""

from __future__ import annotations

import json

import pytest

from lab.netns import SITE_IP
from lab.qemu import VirtualPC
from lab.scenario import BootfleetLab

pytestmark = [pytest.mark.integration, pytest.mark.netns]

# iPXE waits 2 s for a ProxyDHCP offer after the site's offer when none came (DHCP_DISC_PROXY_TIMEOUT_SEC);
# ours arrives with the site's, and carries siaddr + option 67, so iPXE skips the port-4011 round trip too
DHCP_BUDGET_S = 1.5
PROXY_STEPS = ["DHCP discover", "ProxyDHCP offer", "DHCP address (site server)", "TFTP file",
               "iSCSI login (firmware)", "first READ", "iSCSI login (OS)"]


def pc_uuid(mac: str) -> str:
    return VirtualPC("x", mac, "tap").uuid


def _explain(results, lab) -> str:
    out = []
    for r in results:
        out.append(r.summary())
        if not r.ok:
            out.extend(f"  [{line.t:6.2f}] {line.text}" for line in r.console[-40:])
    if lab.site is not None and lab.site.log.exists():
        out.append(f"--- site {lab.site.server}\n" + lab.site.log.read_text(errors="replace")[-2500:])
    if lab.stack is not None:
        out.append(lab.stack.logs(25))
    return "\n".join(out)


@pytest.mark.parametrize("site", ["dnsmasq", "kea"])
def test_bios_ipxe_pc_boots_beside_the_sites_dhcp_server(workdir, boot_disk, site):
    with BootfleetLab(workdir, pcs=1, disk=boot_disk, proxy=True, site_server=site) as bl:
        results = bl.boot()
        assert all(r.ok for r in results), _explain(results, bl)
        (r,) = results
        assert r.dhcp_s is not None and r.dhcp_s < DHCP_BUDGET_S, _explain(results, bl)

        # the address came from the site's server, the boot from ours
        site_leases = bl.site.leases()
        assert r.mac in site_leases, site_leases
        pc_ip = site_leases[r.mac]
        if site == "dnsmasq":
            assert any(f"DHCPACK(eth0) {pc_ip} {r.mac}" in line for line in bl.site.log.read_text().splitlines())
        leases = bl.stack.cli_json("leases")
        assert leases.get("leases", []) == [], leases  # proxy mode leases nothing

        clients = {c["mac"]: c for c in bl.stack.cli_json("clients")["clients"]}
        assert clients[r.mac]["ip"] == pc_ip and r.iqn in (clients[r.mac].get("target") or ""), clients
        answer = bl.stack.cli_json("client", r.mac)
        assert answer["client"]["firmware"] == "bios", answer["client"]
        assert answer["client"]["uuid"] == pc_uuid(r.mac), answer["client"]  # option 97 = QEMU's -uuid
        steps = [s["step"] for s in answer["timeline"]]
        for step in PROXY_STEPS:
            assert step in steps, f"timeline has {steps}, no {step!r}"
        assert "DHCP ack" not in steps and "DHCP offer" not in steps, steps  # we never offer or ACK an address
        times: dict[str, float] = {}
        for s in answer["timeline"]:
            times.setdefault(s["step"], s["t"])
        assert times["ProxyDHCP offer"] <= times["DHCP address (site server)"] <= times["TFTP file"], json.dumps(answer)
        assert times["TFTP file"] < times["iSCSI login (OS)"], json.dumps(answer)
        assert SITE_IP != pc_ip


def test_uefi_pc_boots_with_the_firmwares_own_pxe_beside_the_sites_dhcp_server(workdir, boot_disk):
    """OVMF with no NIC ROM: its PXE takes snponly.efi from our proxy (offer, then port 4011), iPXE then gets
    the script and sanboots; GRUB (\\EFI\\BOOT\\BOOTX64.EFI on the disk) starts the same kernel."""
    with BootfleetLab(workdir, pcs=1, disk=boot_disk, proxy=True, firmware=["uefi"], boot_timeout=240) as bl:
        results = bl.boot()
        assert all(r.ok for r in results), _explain(results, bl)
        (r,) = results
        answer = bl.stack.cli_json("client", r.mac)
        steps = [s["step"] for s in answer["timeline"]]
        assert "ProxyDHCP ack (port 4011)" in steps, steps  # the firmware confirmed with the proxy
        assert answer["client"]["firmware"] == "uefi", answer["client"]
        assert answer["client"]["arch"] == 7, answer["client"]
        assert answer["client"]["uuid"] == pc_uuid(r.mac), answer["client"]
        # shown with -s: where a UEFI boot's time goes (docs/lab.md)
        print("\n".join(f"[{line.t:6.2f}] {line.text}" for line in r.console))
        print("\n".join(f"{s['t']:8.3f} {s['step']} {s['detail']}" for s in answer["timeline"]))


def test_a_new_pc_gets_the_menu_shows_up_as_new_and_boots_once_assigned(workdir, boot_disk):
    """boot.unknown: menu. A PC nobody configured: its iPXE script is the menu (no root-path), `bootfleet clients`
    lists it as `new` with its UUID and firmware; `bootfleet client assign` adopts it and it boots its target."""
    with BootfleetLab(workdir, pcs=1, disk=boot_disk, proxy=True, unknown="menu", unassigned=("pc0",)) as bl:
        r = bl.results[0]
        pc = VirtualPC(r.name, r.mac, bl.lab.add_tap(), bl.lab.name)
        try:
            pc.start()
            pc.wait_for(f"Bootfleet: new PC {r.mac}", 90)
        finally:
            pc.stop()
        assert pc.line("Root path") is None, pc.tail()
        clients = {c["mac"]: c for c in bl.stack.cli_json("clients")["clients"]}
        new = clients[r.mac]
        assert (new["state"], new["uuid"], new["firmware"], new["name"]) == ("new", pc_uuid(r.mac), "bios", None), new
        shown = bl.stack.cli("clients")
        assert r.mac in shown.stdout and " new " in shown.stdout and pc_uuid(r.mac) in shown.stdout, shown.stdout

        done = bl.stack.cli("client", "assign", r.mac, "--target", r.iqn, "--name", "adopted")
        assert done.returncode == 0, done.stderr
        bl.stack.wait_ready(30)
        results = bl.boot()
        assert all(x.ok for x in results), _explain(results, bl)
        row = {c["mac"]: c for c in bl.stack.cli_json("clients")["clients"]}[r.mac]
        assert row["state"] != "new" and row["name"] == "adopted" and r.iqn in row["target"], row
