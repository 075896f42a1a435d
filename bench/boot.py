"""Boot bench: power-on to the OS's marker, one virtual PC, through dnsmasq + tgtd and through Bootfleet.

Run: .venv/bin/python bench/boot.py [--runs 3]  (root: it builds a network namespace; about 1 minute per run)

Both boots use the same lab (namespace, bridge, tap), the same PC (QEMU TCG, virtio NIC with the iPXE ROM of
ipxe-qemu) and the same disk image, one after the other so they do not share the CPU. The reference is stock
dnsmasq (DHCP + TFTP, root-path by option 17) and tgtd (the disk as LUN 1). Times are from starting QEMU to the
line the guest prints: `marker` when its initramfs starts, `nonce` when it has logged in again with open-iscsi
from the iBFT and written to the disk. `dhcp` is the time iPXE spent in "Configuring (net0 ...)". The ratio is
ours / theirs (lower is better; the goal is <= 1/3).
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

from lab import image  # noqa: E402
from lab.scenario import BootfleetLab, ReferenceLab, missing_tools  # noqa: E402


def one(kind: str, disk: Path) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"bf-bench-{kind}-", dir="/tmp"))
    cls = BootfleetLab if kind == "bootfleet" else ReferenceLab
    try:
        with cls(workdir, pcs=1, disk=disk, boot_timeout=120) as run:
            result = run.boot()[0]
        if not result.ok:
            raise RuntimeError(f"{kind}: {result.summary()}\n" + "\n".join(
                f"  [{line.t:6.2f}] {line.text}" for line in result.console[-25:]))
        return {"marker": result.marker_s, "nonce": result.nonce_s, "dhcp": result.dhcp_s}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="boots of each (alternating); medians are printed")
    args = ap.parse_args()
    missing = missing_tools(reference=True)
    if missing:
        print("bench/boot.py needs: " + "; ".join(missing), file=sys.stderr)
        return 1
    disk = image.build()
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"dnsmasq+tgtd": [], "bootfleet": []}
    started = time.monotonic()
    for _ in range(args.runs):
        runs["dnsmasq+tgtd"].append(one("reference", disk))
        runs["bootfleet"].append(one("bootfleet", disk))
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("marker", "nonce", "dhcp")} for k, v in runs.items()}
    print(f"boot of one virtual PC (QEMU TCG), power-on to ..., median of {args.runs} run(s), "
          f"{time.monotonic() - started:.0f} s in all; host load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs (TCG is CPU-bound, iPXE's waits are not: a busy host raises the ratio)")
    if args.runs > 1:
        for name, rs in runs.items():
            print(f"  {name:<14} markers: " + ", ".join(f"{r['marker']:.2f}" for r in rs))
    print(f"{'server':<14} {'marker s':>9} {'nonce s':>9} {'iPXE DHCP s':>12}")
    for name, m in med.items():
        print(f"{name:<14} {m['marker']:>9.2f} {m['nonce']:>9.2f} {m['dhcp']:>12.2f}")
    ours, theirs = med["bootfleet"], med["dnsmasq+tgtd"]
    print(f"ratio bootfleet/reference: marker {ours['marker'] / theirs['marker']:.2f}, "
          f"nonce {ours['nonce'] / theirs['nonce']:.2f} (goal <= 0.33)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
