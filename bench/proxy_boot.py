"""ProxyDHCP boot bench: power-on to the OS's marker, one virtual PC, with Bootfleet as the network's DHCP server
against Bootfleet in `dhcp.mode: proxy` beside the site's own DHCP server (dnsmasq, addresses only).

Run: .venv/bin/python bench/proxy_boot.py [--runs 2] [--uefi-runs 1] [--http-runs 1] [--ping]  (root: netns)

Same lab, same disk, same PC, one boot at a time, alternating. A BIOS PC with the iPXE ROM (the lab's usual
PC), a UEFI PC with OVMF's own PXE (no NIC ROM), and one with OVMF's own HTTP boot (`uefi-http`: its PXE off,
`http.enabled`, `boot.transport: http`: snponly.efi and the script over HTTP). `dhcp` is iPXE's
"Configuring (net0 ...)" to its "ok": with a server that sends no option 175.176 iPXE waits 2 s for ProxyDHCP
offers unless one came (src/net/udp/dhcp.c, DHCP_DISC_PROXY_TIMEOUT_SEC); ours comes with the site's offer, so
the proxy boot must not be slower there. The site's dnsmasq runs with --no-ping (lab/reference.SiteDhcp: its
ping check holds the first offer ~3 s); `--ping` adds a run with a stock dnsmasq to show that cost, which is the
site server's, not ours.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab import image, qemu  # noqa: E402
from lab.scenario import BootfleetLab, missing_tools  # noqa: E402


def one(proxy: bool, firmware: str, disk: Path, ping: bool = False) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bf-bench-proxy-", dir="/tmp"))
    try:
        extra = {"http": {"enabled": True}, "boot": {"transport": "http"}} if firmware == "uefi-http" else None
        with BootfleetLab(workdir, pcs=1, disk=disk, proxy=proxy, site_ping=ping, firmware=[firmware],
                          boot_timeout=240, config_extra=extra) as run:
            result = run.boot()[0]
        if not result.ok:
            raise RuntimeError(f"{'proxy' if proxy else 'server'} {firmware}: {result.summary()}\n" + "\n".join(
                f"  [{line.t:6.2f}] {line.text}" for line in result.console[-25:]))
        return {"marker": result.marker_s, "nonce": result.nonce_s, "dhcp": result.dhcp_s or 0.0}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="BIOS boots of each mode (alternating); medians printed")
    ap.add_argument("--uefi-runs", type=int, default=1, help="UEFI boots of each mode (0: none)")
    ap.add_argument("--http-runs", type=int, default=1, help="UEFI HTTP boots of each mode (0: none)")
    ap.add_argument("--ping", action="store_true", help="also a BIOS proxy boot beside a dnsmasq that pings first")
    args = ap.parse_args()
    missing = missing_tools(reference=True) + (qemu.check_uefi_tools() if args.uefi_runs or args.http_runs else [])
    if missing:
        print("bench/proxy_boot.py needs: " + "; ".join(missing), file=sys.stderr)
        return 1
    disk = image.build()
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    cases: dict[str, list[dict]] = {}
    plan = [("bios", args.runs), ("uefi", args.uefi_runs), ("uefi-http", args.http_runs)]
    for firmware, runs in plan:
        for _ in range(runs):
            cases.setdefault(f"{firmware} server", []).append(one(False, firmware, disk))
            cases.setdefault(f"{firmware} proxy", []).append(one(True, firmware, disk))
    if args.ping:
        cases["bios proxy, site pings"] = [one(True, "bios", disk, ping=True)]
    print(f"boot of one virtual PC (QEMU TCG), power-on to ..., median of the runs, {time.monotonic() - started:.0f} s "
          f"in all; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'case':<24} {'runs':>4} {'marker s':>9} {'nonce s':>9} {'iPXE DHCP s':>12}   markers")
    med = {}
    for name, rs in cases.items():
        m = med[name] = {f: statistics.median(r[f] for r in rs) for f in ("marker", "nonce", "dhcp")}
        print(f"{name:<24} {len(rs):>4} {m['marker']:>9.2f} {m['nonce']:>9.2f} {m['dhcp']:>12.2f}   "
              + ", ".join(f"{r['marker']:.2f}" for r in rs))
    for firmware, runs in plan:
        if runs:
            s, p = med[f"{firmware} server"], med[f"{firmware} proxy"]
            print(f"{firmware}: proxy beside dnsmasq / Bootfleet as the server: marker {p['marker'] / s['marker']:.2f}, "
                  f"iPXE DHCP {p['dhcp']:.2f} s against {s['dhcp']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
