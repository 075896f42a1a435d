"""iPXE over HTTP in a lab boot: with `boot.transport: http` and `http.enabled: true` DHCP hands iPXE the
script's http:// URL as its boot file; iPXE chains it from the TFTP service's HTTP listener, sanboots, and the
OS reaches its marker. No TFTP fetch of the script.

UEFI HTTP boot: OVMF's own HTTP boot (no NIC ROM, its PXE off) takes snponly.efi's URL from our DHCP answer and
fetches it over HTTP; from there the chain is the same. No TFTP at all."""

from __future__ import annotations

import json

import pytest

from lab.netns import SERVER_IP
from lab.scenario import UEFI_LOADER, BootfleetLab

pytestmark = [pytest.mark.integration, pytest.mark.netns]

HTTP_CONFIG = {"http": {"enabled": True}, "boot": {"transport": "http"}}


def _explain(results, lab) -> str:
    out = []
    for r in results:
        out.append(r.summary())
        if not r.ok:
            out.extend(f"  [{line.t:6.2f}] {line.text}" for line in r.console[-40:])
    if lab.stack is not None:
        out.append(lab.stack.logs(25))
    return "\n".join(out)


def _events(lab, prefix: str) -> list[dict]:
    """`bootfleet --json events --type PREFIX`: one JSON event a line."""
    done = lab.stack.cli("--json", "events", "--type", prefix, "--limit", "1000")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_bios_ipxe_pc_chains_its_script_over_http_and_boots(workdir, boot_disk):
    with BootfleetLab(workdir, pcs=1, disk=boot_disk, config_extra=HTTP_CONFIG) as bl:
        results = bl.boot()
        assert all(r.ok for r in results), _explain(results, bl)
        (r,) = results

        # iPXE's console names the URL it chained
        url = f"http://{SERVER_IP}:8069/boot.ipxe"
        assert any(url in line.text for line in r.console), "\n".join(line.text for line in r.console[-40:])

        http = _events(bl, "http.transfer")
        scripts = [e for e in http if e["type"] == "http.transfer.finished"
                   and e["fields"].get("file", "").startswith("boot.ipxe")]
        assert scripts, json.dumps(http)
        assert scripts[0]["fields"]["mac"] == r.mac and int(scripts[0]["fields"]["status"]) == 200, json.dumps(http)
        assert not [e for e in http if e["type"] == "http.transfer.failed"], json.dumps(http)

        fetched = [e["fields"].get("file", "") for e in _events(bl, "tftp.transfer")]
        assert not [f for f in fetched if f.startswith("boot.ipxe")], fetched  # the script never went over TFTP

        answer = bl.stack.cli_json("client", r.mac)
        steps = [(s["step"], s["detail"]) for s in answer["timeline"]]
        names = [s for s, _ in steps]
        assert ("HTTP file" in names and "TFTP file" not in names and "iSCSI login (OS)" in names), steps
        times = {}
        for s in answer["timeline"]:
            times.setdefault(s["step"], s["t"])
        assert times["DHCP ack"] <= times["HTTP file"] < times["iSCSI login (OS)"], json.dumps(answer)



def test_uefi_pc_boots_with_the_firmwares_own_http_boot(workdir, boot_disk):
    """OVMF with no NIC ROM and its PXE options turned off (fw_cfg, lab/qemu.OVMF_NO_PXE): its boot manager's
    "UEFI HTTPv4" entry sends DHCP with option 60 HTTPClient and option 93 = 16, takes the URL of snponly.efi from
    our answer (server mode), fetches it from our HTTP listener (HEAD, then GET); iPXE chains the script over
    HTTP, sanboots, and GRUB starts the OS. Nothing goes over TFTP."""
    with BootfleetLab(workdir, pcs=1, disk=boot_disk, firmware=["uefi-http"], config_extra=HTTP_CONFIG,
                      boot_timeout=120) as bl:
        results = bl.boot()
        assert all(r.ok for r in results), _explain(results, bl)
        (r,) = results
        console = "\n".join(line.text for line in r.console if "Downloading..." not in line.text)
        url = f"http://{SERVER_IP}:8069/{UEFI_LOADER.name}"
        assert "Start HTTP Boot over IPv4" in console and f"URI: {url}" in console, console[-3000:]
        assert 'starting Boot0001 "UEFI HTTPv4' in console and "Start PXE" not in console, console[-3000:]

        discovers = [e["fields"] for e in _events(bl, "dhcp.discover")]
        first = discovers[0] if discovers else {}
        assert (first.get("arch"), first.get("firmware"), first.get("client_class")) == (16, "uefi-http", "http-efi"), \
            discovers

        http = _events(bl, "http.transfer")
        loader = [e["fields"] for e in http if e["type"] == "http.transfer.finished"
                  and e["fields"]["file"] == UEFI_LOADER.name and e["fields"]["method"] == "GET"]
        assert loader and loader[0]["status"] == 200, json.dumps(http)
        assert loader[0]["bytes"] == UEFI_LOADER.stat().st_size and loader[0]["mac"] == r.mac, json.dumps(http)
        assert [e for e in http if e["fields"]["file"].startswith("boot.ipxe")], json.dumps(http)
        assert not [e for e in http if e["type"] == "http.transfer.failed"], json.dumps(http)
        assert not _events(bl, "tftp.transfer"), "nothing goes over TFTP"

        answer = bl.stack.cli_json("client", r.mac)
        times: dict[str, float] = {}
        for s in answer["timeline"]:
            times.setdefault(s["step"], s["t"])
        assert "TFTP file" not in times, json.dumps(answer)
        assert times["DHCP ack"] <= times["HTTP file"] < times["iSCSI login (OS)"], json.dumps(answer)
        # shown with -s: where the boot's time goes
        print("\n".join(f"[{line.t:6.2f}] {line.text}" for line in r.console if "Downloading..." not in line.text))
        print("\n".join(f"{s['t']:8.3f} {s['step']} {s['detail']}" for s in answer["timeline"]))
