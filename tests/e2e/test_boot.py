"""Virtual PCs with no disk boot an OS through the whole chain: iPXE DHCP -> TFTP script -> iSCSI sanboot ->
kernel and initramfs read from our target -> the OS logs in again from the iBFT, reads its token, writes a nonce.
"""

from __future__ import annotations

import json
import time

import pytest

from browser_support import chromium, in_netns, shot
from lab.scenario import BootfleetLab, ReferenceLab
from support import ROOT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]

# iPXE's DHCP takes ~16 s when it waits for ProxyDHCP offers and for an IPv6 router; Bootfleet sends option
# 175.176 (no-pxedhcp) and answers the router solicitation, so it must be done in well under that.
DHCP_BUDGET_S = 5.0

ARTIFACTS = ROOT / "var" / "test-artifacts" / "web"
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

        # the dashboard of this stack, in chromium inside the lab's namespace (its web server is on the
        # namespace's 127.0.0.1:8080): the PC that really booted, its real waterfall, an action the CLI then sees
        started = time.monotonic()
        in_netns(bl.lab.name, lambda: _dashboard_of_the_lab(bl, results[0], workdir))
        print(f"\ndashboard in chromium: {time.monotonic() - started:.1f} s")


def _milestones(timeline):
    """Each waterfall phase's end in `bootfleet client MAC`'s timeline, in time order: the DHCP ack, the last file
    before the OS's login, the firmware's login, the first READ after it, the OS's login after that. (These PCs
    log in and read their disk before they fetch the script: iPXE attaches the root-path's disk first.)"""
    def first(step, after=-1.0):
        return next(s["t"] for s in timeline if s["step"] == step and s["t"] >= after)

    fw = first("iSCSI login (firmware)")
    read = first("first READ", fw)
    os_login = first("iSCSI login (OS)", read)
    ends = {"DHCP": first("DHCP ack"),
            "TFTP/HTTP": max(s["t"] for s in timeline if s["step"] in ("TFTP file", "HTTP file") and s["t"] <= os_login),
            "iSCSI login": fw, "first READ": read, "OS login": os_login}
    return sorted(ends.items(), key=lambda kv: kv[1])  # stable: a tie keeps the usual order, as the page does


def _dashboard_of_the_lab(bl, pc, workdir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = "http://127.0.0.1:8080"  # web: the defaults, as the lab's config leaves them
    status = bl.stack.cli("status")
    assert f"web: {url}/" in status.stdout.splitlines()[0], status.stdout  # where `bootfleet status` says it is
    token = (bl.stack.state_dir / "web-token").read_text().strip()
    with chromium(workdir) as browser:
        wait = WebDriverWait(browser, 30)
        browser.get(url + "/login")
        browser.find_element(By.ID, "secret").send_keys(token)
        browser.find_element(By.ID, "login").click()
        wait.until(EC.url_to_be(url + "/"))

        # the fleet: the booted PC as the CLI lists it
        row = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'#fleet tr[data-mac="{pc.mac}"]')))
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        cli = next(c for c in bl.stack.cli_json("clients")["clients"] if c["mac"] == pc.mac)
        assert cells[:4] == [pc.name, pc.mac, cli["state"], cli["ip"]], (cells, cli)
        assert cli["state"] in ("running", "off"), cli  # it booted its OS (and powered itself off since)
        assert cells[10] != "-", cells  # its last boot
        shot(browser, ARTIFACTS, "lab-fleet")

        # its page: the real boot as a waterfall, each phase ending at its milestone in `bootfleet client MAC`
        browser.get(f"{url}/pc/{pc.mac}")
        phases = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.waterfall g.phase"))
        names = [p.get_attribute("data-phase") for p in phases]
        durations = [float(p.get_attribute("data-duration")) for p in phases]
        timeline = bl.stack.cli_json("client", pc.mac)["timeline"]
        expected = _milestones(timeline)
        why = json.dumps({"page": list(zip(names, durations)), "timeline": timeline})
        assert names == [name for name, _ in expected], why
        ends = [t for _, t in expected]
        starts = [next(s["t"] for s in timeline if s["step"] == "DHCP discover"), *ends[:-1]]
        assert durations == pytest.approx([end - start for start, end in zip(starts, ends)], abs=0.002), why
        assert all(p.find_element(By.TAG_NAME, "rect").size["width"] > 0 for p in phases)
        phase_table = browser.find_element(By.CSS_SELECTOR, "table.phases").text
        for name, d in zip(names, durations):
            assert f"{name} " in phase_table and f"{d:.3f}" in phase_table, phase_table
        assert "iscsi.login" in browser.find_element(By.CSS_SELECTOR, "table.events").text
        shot(browser, ARTIFACTS, "lab-pc")

        # an action: restart the TFTP service through its confirmation; the CLI then reports a new tftp[0]
        def tftp0():
            return next(p for p in bl.stack.cli_json("status")["processes"] if (p["service"], p["instance"]) == ("tftp", 0))

        before = tftp0()
        browser.get(url + "/services")
        browser.find_element(By.CSS_SELECTOR, '#scale tr[data-service="tftp"] button[data-command="service-restart"]').click()
        dialog = wait.until(EC.visibility_of_element_located((By.ID, "confirm")))
        assert "tftp" in dialog.text
        shot(browser, ARTIFACTS, "lab-services-confirm")
        browser.find_element(By.ID, "confirm-ok").click()
        wait.until(lambda d: "restarted" in d.find_element(By.ID, "flash").text or "error" in d.find_element(By.ID, "flash").get_attribute("class"))
        assert "error" not in browser.find_element(By.ID, "flash").get_attribute("class"), browser.find_element(By.ID, "flash").text
        after = wait_for(lambda: (p := tftp0())["pid"] != before["pid"] and p.get("health") == "ok" and p,
                         timeout=60, interval=0.3, what="a new tftp[0] in bootfleet status")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#processes tr[data-service="tftp"]')
                   and str(after["pid"]) in d.find_element(By.CSS_SELECTOR, '#processes tr[data-service="tftp"]').text)
        shot(browser, ARTIFACTS, "lab-services")


def test_boot_disk_boots_through_reference_servers(workdir, boot_disk):
    """The same disk through dnsmasq + tgtd: tells a broken image apart from a broken service."""
    with ReferenceLab(workdir, pcs=1, disk=boot_disk) as rl:
        results = rl.boot()
        assert all(r.ok for r in results), _explain(results)
