"""Virtual PCs with no disk boot an OS through the whole chain: iPXE DHCP -> TFTP script -> iSCSI sanboot ->
kernel and initramfs read from our target -> the OS logs in again from the iBFT, reads its token, writes a nonce.
"""

from __future__ import annotations

import json

import pytest

from lab.scenario import BootfleetLab, ReferenceLab

pytestmark = [pytest.mark.integration, pytest.mark.netns]

# iPXE's DHCP takes ~16 s when it waits for ProxyDHCP offers and for an IPv6 router; Bootfleet sends option
# 175.176 (no-pxedhcp) and answers the router solicitation, so it must be done in well under that.
DHCP_BUDGET_S = 5.0

TIMELINE_STEPS = ["DHCP discover", "DHCP ack", "TFTP file", "iSCSI login (firmware)", "first READ", "iSCSI login (OS)"]


def _explain(results, lab=None) -> str:
    out = []
    for r in results:
        out.append(r.summary())
        if not r.ok:
            out.extend(f"  [{line.t:6.2f}] {line.text}" for line in r.console[-40:])
    if lab is not None and getattr(lab, "stack", None) is not None:
        out.append(lab.stack.logs(25))
    return "\n".join(out)


def test_two_pcs_boot_two_targets_through_bootfleet(workdir, boot_disk):
    with BootfleetLab(workdir, pcs=2, disk=boot_disk) as bl:
        results = bl.boot()
        assert all(r.ok for r in results), _explain(results, bl)
        for r in results:
            assert r.dhcp_s is not None and r.dhcp_s < DHCP_BUDGET_S, _explain(results, bl)

        # each PC booted its own target: the token it read is the one written into its own disk
        assert results[0].token != results[1].token
        assert [r.token_seen for r in results] == [r.token for r in results]

        clients = {c["mac"]: c for c in bl.stack.cli_json("clients")["clients"]}
        for r in results:
            assert r.mac in clients, f"bootfleet clients lists {sorted(clients)}, not {r.mac}"
            c = clients[r.mac]
            assert c.get("ip", "").startswith("10.77.0."), c
            assert r.iqn in (c.get("target") or ""), c
            assert c.get("last_boot"), c

        for r in results:
            answer = bl.stack.cli_json("client", r.mac)
            steps = [s["step"] for s in answer["timeline"]]
            for step in TIMELINE_STEPS:
                assert step in steps, f"{r.mac}: timeline has {steps}, no {step!r}"
            times: dict[str, float] = {}
            for s in answer["timeline"]:
                times.setdefault(s["step"], s["t"])  # the first of each (each session has its own first READ)
            # iPXE's autoboot attaches the SAN disk named by root-path before it fetches the script
            assert times["DHCP discover"] <= times["DHCP ack"] <= times["TFTP file"], json.dumps(answer)
            assert times["DHCP ack"] <= times["iSCSI login (firmware)"] <= times["first READ"], json.dumps(answer)
            assert times["first READ"] < times["iSCSI login (OS)"], json.dumps(answer)
            # the OS logs in after the initramfs started: the marker, power-on relative on the console
            assert times["iSCSI login (OS)"] - times["DHCP discover"] < r.nonce_s, json.dumps(answer)
            # the second PC's OS asks for CRC32C digests (lab/image.py): its token and nonce crossed them
            os_login = [s["detail"] for s in answer["timeline"] if s["step"] == "iSCSI login (OS)"]
            wanted = "(digests: header CRC32C, data CRC32C)"
            assert (wanted in os_login[-1]) == r.iqn.endswith("pc1"), json.dumps(answer)

        # the leases, read from the DHCP service's own store, and one freed through the whole chain
        leases = {l["mac"]: l for l in bl.stack.cli_json("leases")["leases"]}
        for r in results:
            assert leases[r.mac]["state"] == "bound" and leases[r.mac]["ip"] == clients[r.mac]["ip"], leases
        released = bl.stack.cli("lease", "release", results[1].mac)
        assert released.returncode == 0, released.stderr
        assert clients[results[1].mac]["ip"] in released.stdout
        after = {l["mac"]: l for l in bl.stack.cli_json("leases", "--all")["leases"]}
        assert after[results[1].mac]["state"] == "released" and after[results[0].mac]["state"] == "bound", after
        unknown = bl.stack.cli("lease", "release", "52:54:00:99:99:99")
        assert unknown.returncode == 1 and "no DHCP process released" in unknown.stderr


def test_boot_disk_boots_through_reference_servers(workdir, boot_disk):
    """The same disk through dnsmasq + tgtd: tells a broken image apart from a broken service."""
    with ReferenceLab(workdir, pcs=1, disk=boot_disk) as rl:
        results = rl.boot()
        assert all(r.ok for r in results), _explain(results)
