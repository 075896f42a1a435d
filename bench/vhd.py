"""VHD dynamic LUN against a raw file LUN of ours, same target process, same client, interleaved rounds.

    .venv/bin/python bench/vhd.py [--rounds 5] [--size-mib 128]

One `python -m services.iscsi_target` serves four LUNs: a raw image and a dynamic VHD with the same content
(`qemu-img convert -O vpc -o subformat=dynamic`), and an empty sparse raw file and an empty dynamic VHD of
128 GiB. `qemu-img bench` over iscsi:// measures, on each pair:
  64 KiB QD1 reads over the full images (the boot pattern; goal: VHD >= 0.9x raw),
  4 KiB QD32 writes into new blocks, sequential (a new 2 MiB VHD block every 512 writes) and one per
  2 MiB (every write allocates a VHD block; goal >= 0.5x), without and with a flush every 256 writes
  (a flush commits the VHD's metadata: three fdatasyncs).
Each write round uses a region of the empty disks no earlier round touched. Prints the medians and the
ratios VHD/raw, and the target process's CPU time per request on each LUN (utime + stime from /proc over
each qemu-img run: what the VHD costs the target, disturbed far less than throughput by the machine's
load). Bounded: about a minute and a half.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from support.procs import stop  # bench/support/ (this file's folder is first on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IQN = "iqn.2026-11.org.bootfleet.bench:vhd"
EMPTY = 128 << 30
STRIDE = 2 << 20

# name, LUN pair (raw, vhd), qemu-img bench arguments, bytes per request, requests, bytes of disk a round uses
WORKLOADS = [
    ("64 KiB read QD1 (MB/s)", (0, 1), ["-d", "1", "-s", "64k"], 65536, 2048, 0),
    ("4 KiB write QD32 seq, new (MB/s)", (2, 3), ["-w", "-d", "32", "-s", "4k"], 4096, 32768, 32768 * 4096),
    ("4 KiB write QD32 /2MiB, new (MB/s)", (2, 3), ["-w", "-d", "32", "-s", "4k", "-S", str(STRIDE)], 4096, 4096,
     4096 * STRIDE),
    ("  same, flush every 256 (MB/s)", (2, 3), ["-w", "-d", "32", "-s", "4k", "-S", str(STRIDE),
                                                "--flush-interval", "256"], 4096, 4096, 4096 * STRIDE),
]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise SystemExit(f"{tool} is missing (deploy/system-deps.sh installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, port: int) -> subprocess.Popen:
    cfg = tmp / "bootfleet.yaml"
    cfg.write_text(f"""version: 1
logging: {{level: warning}}
scale: {{iscsi_target: 1}}  # the process started here: its LUNs are one target's, one owner at any scale
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  io_stats_interval: 0
  targets:
    - name: {IQN}
      luns:
        - {{id: 0, backstore: {{type: file, path: full.img, create: false}}}}
        - {{id: 1, backstore: {{type: vhd, path: full.vhd}}}}
        - {{id: 2, backstore: {{type: file, path: empty.img, size: {EMPTY}, sparse: true}}}}
        - {{id: 3, backstore: {{type: vhd, path: empty.vhd}}}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "services.iscsi_target", "--config", str(cfg), "--state-dir",
                             str(tmp)], cwd=ROOT, stdout=open(tmp / "target.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the target exited: {(tmp / 'target.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the target did not listen")


def bench(port: int, lun: int, args: list[str], count: int, offset: int) -> float:
    url = f"iscsi://127.0.0.1:{port}/{IQN}/{lun}"
    r = subprocess.run([need("qemu-img"), "bench", "-f", "raw", "-c", str(count), "-o", str(offset), *args, url],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Run completed in ([\d.]+) seconds", r.stdout)
    if r.returncode or not m:
        raise SystemExit(f"qemu-img bench failed on LUN {lun}: {r.stdout}{r.stderr}")
    return float(m.group(1))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (its threads', the ended ones too), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    from services.iscsi_target.scsi.vhd_backstore import create_dynamic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=128)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-vhd-"))
    proc = None
    try:
        full = tmp / "full.img"
        chunk = os.urandom(1 << 20)
        with open(full, "wb") as f:
            for _ in range(args.size_mib):
                f.write(chunk)
        subprocess.run([need("qemu-img"), "convert", "-f", "raw", "-O", "vpc", "-o",
                        "subformat=dynamic,force_size=on", str(full), str(tmp / "full.vhd")], check=True)
        create_dynamic(tmp / "empty.vhd", EMPTY)
        port = free_port()
        proc = start(tmp, port)
        for lun in (0, 1):  # warm the page cache and the target
            bench(port, lun, ["-d", "32", "-s", "64k"], args.size_mib * 16, 0)
        results = {w[0]: {"raw": [], "vhd": []} for w in WORKLOADS}
        cpu = {w[0]: {"raw": [0.0, 0], "vhd": [0.0, 0]} for w in WORKLOADS}  # target CPU seconds, requests
        used = 0
        for round_no in range(args.rounds):
            for name, (raw_lun, vhd_lun), wargs, size, count, span in WORKLOADS:
                offset = used if span else 0
                if not span:
                    count = args.size_mib * 16 * 4  # the image 4 times (it wraps at the end)
                if span:
                    used += span
                    if used > EMPTY:
                        raise SystemExit("the empty disks are too small for this many rounds")
                order = [("raw", raw_lun), ("vhd", vhd_lun)]
                if round_no % 2:
                    order.reverse()
                for who, lun in order:
                    before = cpu_seconds(proc.pid)
                    seconds = bench(port, lun, wargs, count, offset)
                    cpu[name][who][0] += cpu_seconds(proc.pid) - before
                    cpu[name][who][1] += count
                    results[name][who].append(count * size / seconds / 1e6)
        print(f"VHD dynamic LUN vs raw file LUN (ours), qemu-img bench over loopback, {args.rounds} interleaved "
              f"rounds, load average {os.getloadavg()[0]:.1f}; median and best round of each (on a shared, "
              f"loaded machine single rounds vary by 2x or "
              f"more: the best rounds are the least disturbed)")
        print(f"{'workload':38} {'raw':>8} {'vhd':>8} {'ratio':>7}   {'best raw':>8} {'best vhd':>8} {'ratio':>7}   "
              "target CPU us/request raw, vhd")
        for name, *_ in WORKLOADS:
            raw = statistics.median(results[name]["raw"])
            vhd = statistics.median(results[name]["vhd"])
            braw, bvhd = max(results[name]["raw"]), max(results[name]["vhd"])
            craw, cvhd = (cpu[name][who][0] / cpu[name][who][1] * 1e6 for who in ("raw", "vhd"))
            print(f"{name:38} {raw:8.1f} {vhd:8.1f} {vhd / raw:6.2f}x   {braw:8.1f} {bvhd:8.1f} {bvhd / braw:6.2f}x   "
                  f"{craw:6.1f} {cvhd:6.1f} ({cvhd / craw:4.2f}x)")
    finally:
        stop(proc, wait=15)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
