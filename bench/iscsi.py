"""iSCSI target benchmark: ours against tgtd, side by side, same client, interleaved runs.

    .venv/bin/python bench/iscsi.py [--rounds 3] [--busy-poll-us 100] [--size-mib 128]

Starts tgtd (`tgtd -f -C <ctl> --iscsi portal=127.0.0.1:<port>`, a target made with tgtadm, backing store
a file) and `python -m services.iscsi_target --config FILE` with a file LUN of the same size and content,
warms both page caches, then runs `qemu-img bench` over iscsi:// against each in turn for every workload
and round, and prints the median of each with the ratio ours/tgtd. Bounded: about two minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IQN = "iqn.2026-11.org.bootfleet.bench:disk"

# name, qemu-img bench arguments, unit, operations per run
WORKLOADS = [
    ("4 KiB read QD1 (IOPS)", ["-d", "1", "-s", "4k"], "iops", 15000),
    ("64 KiB read QD1 (MB/s)", ["-d", "1", "-s", "64k"], "mbs", 6000),
    ("64 KiB seq read QD32 (MB/s)", ["-d", "32", "-s", "64k"], "mbs", 30000),
    ("64 KiB seq write QD32 (MB/s)", ["-w", "-d", "32", "-s", "64k"], "mbs", 15000),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise SystemExit(f"{tool} is missing (deploy/system-deps.sh installs it)")
    return path


def start_tgtd(tmp: Path, image: Path, port: int) -> subprocess.Popen:
    ctl = str(100 + os.getpid() % 30000)  # tgtd accepts control ports up to 32767
    log = open(tmp / "tgtd.log", "wb")
    proc = subprocess.Popen([need("tgtd"), "-f", "-C", ctl, "--iscsi", f"portal=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, proc, "tgtd")
    adm = [need("tgtadm"), "-C", ctl, "--lld", "iscsi"]
    for args in (["--mode", "target", "--op", "new", "--tid", "1", "--targetname", IQN],
                 ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "--backing-store", str(image)],
                 ["--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", "ALL"]):
        subprocess.run(adm + args, check=True, capture_output=True, timeout=10)
    return proc


def start_ours(tmp: Path, image: Path, port: int, busy_poll_us: int) -> subprocess.Popen:
    cfg = tmp / "bootfleet.yaml"
    cfg.write_text(f"""version: 1
logging: {{level: warning}}
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  busy_poll_us: {busy_poll_us}
  io_stats_interval: 0
  targets:
    - name: {IQN}
      luns: [{{id: 1, backstore: {{type: file, path: {image}, create: false}}}}]
""")
    log = open(tmp / "ours.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.iscsi_target", "--config", str(cfg), "--state-dir",
                             str(tmp)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, proc, "our target")
    return proc


def bench(port: int, args: list[str], count: int) -> float:
    """Seconds qemu-img bench took for `count` requests."""
    url = f"iscsi://127.0.0.1:{port}/{IQN}/1"
    r = subprocess.run([need("qemu-img"), "bench", "-f", "raw", "-c", str(count), *args, url],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Run completed in ([\d.]+) seconds", r.stdout)
    if r.returncode or not m:
        raise SystemExit(f"qemu-img bench failed on port {port}: {r.stdout}{r.stderr}")
    return float(m.group(1))


def figure(unit: str, args: list[str], count: int, seconds: float) -> float:
    if unit == "iops":
        return count / seconds
    size = 65536 if "64k" in args else 4096
    return count * size / seconds / 1e6


def stop(proc: subprocess.Popen, hard: bool = False) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)  # tgtd ignores SIGTERM
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy-poll-us", type=int, default=100,
                        help="our iscsi.busy_poll_us for the run (the config default is 0: no spinning)")
    parser.add_argument("--size-mib", type=int, default=128)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-iscsi-"))
    procs = []
    try:
        theirs_img, ours_img = tmp / "tgtd.img", tmp / "ours.img"
        chunk = os.urandom(1 << 20)
        with open(theirs_img, "wb") as f:
            for _ in range(args.size_mib):
                f.write(chunk)
        shutil.copyfile(theirs_img, ours_img)
        tport, oport = free_port(), free_port()
        procs.append(start_tgtd(tmp, theirs_img, tport))
        procs.append(start_ours(tmp, ours_img, oport, args.busy_poll_us))
        for port in (tport, oport):  # warm both page caches and both targets
            bench(port, ["-d", "32", "-s", "64k"], args.size_mib * 16)
        results: dict[str, dict[str, list[float]]] = {w[0]: {"ours": [], "tgtd": []} for w in WORKLOADS}
        started = time.monotonic()
        for round_no in range(args.rounds):
            for name, wargs, unit, count in WORKLOADS:
                order = [("tgtd", tport), ("ours", oport)] if round_no % 2 == 0 else [("ours", oport), ("tgtd", tport)]
                for who, port in order:
                    results[name][who].append(figure(unit, wargs, count, bench(port, wargs, count)))
            if time.monotonic() - started > 140:
                break  # stay within the time bound on a slow machine
        print(f"iSCSI target vs tgtd ({subprocess.run(['tgtd', '-V'], capture_output=True, text=True).stdout.strip()}), "
              f"qemu-img bench over loopback, {len(results[WORKLOADS[0][0]]['ours'])} interleaved rounds, median; "
              f"ours with busy_poll_us={args.busy_poll_us}")
        print(f"{'workload':32} {'ours':>10} {'tgtd':>10} {'ratio':>7}")
        for name, *_ in WORKLOADS:
            ours = statistics.median(results[name]["ours"])
            theirs = statistics.median(results[name]["tgtd"])
            print(f"{name:32} {ours:10.0f} {theirs:10.0f} {ours / theirs:6.2f}x")
    finally:
        for i, proc in enumerate(procs):
            stop(proc, hard=i == 0)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
