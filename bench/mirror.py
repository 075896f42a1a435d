"""RAID-1 LUN against a single LUN of the same target, same client, interleaved runs.

    .venv/bin/python bench/mirror.py [--rounds 5] [--size-mib 128] [--busy-poll-us 0]
                                     [--device-mbs 125] [--device-iops 3000] [--only PART ...]

Three parts. `qemu-img bench` over iscsi:// runs each workload against each LUN in turn (order alternating
by round) and the report gives medians and the ratio mirror/single. The issue's bar: reads >= 1.0x,
writes >= 0.7x. Bounded: about three minutes.

in-process: the SCSI layer alone (no transport): microseconds per `execute` of a 64 KiB READ(10) and
WRITE(10) on a file LU and on a mirror LU, in short interleaved windows: the mirror's own cost without
the network's noise.

page-cache: one `python -m services.iscsi_target` serves LUN 0 (a file) and LUN 1 (a mirror of two
files), all of the same size and content on the same file system, warm. Both legs sit in the same page
cache, so a mirror cannot read faster than a file here; what the figures show is the mirror's own cost
(the leg choice, the range lock, the second pwrite).

devices: the same on three devices alike, what a mirror is for: loop devices on files in memory, each
capped by the kernel's block throttle at --device-mbs and --device-iops (reads and writes alike, a cloud
volume's baseline by default), LUN 0 on one, the mirror's legs on the other two, all opened O_DIRECT so
that every request reaches its device. Needs root and a block throttle (cgroup v1 blkio or v2 io). The
cap is a budget, not a service time: a leg's budget refills while the other leg serves.

Beside each throughput, the target process's CPU time per request (utime + stime from /proc, its
threads' total, over each qemu-img run): what the mirror costs the target, which the machine's load
disturbs far less than the throughput (on 2 shared cores a round's ratio swings 0.5x-2x).
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
IQN = "iqn.2026-11.org.bootfleet.bench:mirror"

# name, qemu-img bench arguments, unit, operations per run
WORKLOADS = [
    ("64 KiB read QD1 (MB/s)", ["-d", "1", "-s", "64k"], "mbs", 4000),
    ("4 KiB read QD1 (IOPS)", ["-d", "1", "-s", "4k"], "iops", 6000),
    ("64 KiB seq read QD32 (MB/s)", ["-d", "32", "-s", "64k"], "mbs", 12000),
    ("64 KiB seq write QD32 (MB/s)", ["-w", "-d", "32", "-s", "64k"], "mbs", 6000),
    ("4 KiB write QD32 (IOPS)", ["-w", "-d", "32", "-s", "4k"], "iops", 12000),
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


FILE_LUNS = """\
        - {id: 0, backstore: {type: file, path: single.img, create: false}}
        - id: 1
          backstore:
            type: mirror
            legs: [{type: file, path: leg0.img, create: false}, {type: file, path: leg1.img, create: false}]
"""


def start(tmp: Path, port: int, busy_poll_us: int, luns: str = FILE_LUNS, cgroup: Path | None = None
          ) -> subprocess.Popen:
    """The target serving LUN 0 (single) and LUN 1 (mirror); in the blkio cgroup `cgroup` from its start."""
    cfg = tmp / "bootfleet.yaml"
    cfg.write_text(f"""version: 1
logging: {{level: warning}}
scale: {{iscsi_target: 1}}  # the process started here: its LUNs are one target's, one owner at any scale
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  busy_poll_us: {busy_poll_us}
  io_stats_interval: 0
  targets:
    - name: {IQN}
      luns:
{luns}""")
    log = open(tmp / "target.log", "wb")
    argv = [sys.executable, "-m", "services.iscsi_target", "--config", str(cfg), "--state-dir", str(tmp)]
    if cgroup is not None:  # joins the cgroup, then becomes the target: every thread of it is throttled
        argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the target exited: {(tmp / 'target.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the target did not listen")
            time.sleep(0.05)


def bench(port: int, lun: int, args: list[str], count: int) -> float:
    url = f"iscsi://127.0.0.1:{port}/{IQN}/{lun}"
    r = subprocess.run([need("qemu-img"), "bench", "-f", "raw", "-c", str(count), *args, url],
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


def figure(unit: str, args: list[str], count: int, seconds: float) -> float:
    if unit == "iops":
        return count / seconds
    return count * (65536 if "64k" in args else 4096) / seconds / 1e6


def in_process(tmp: Path, rounds: int) -> None:
    """us per execute() of 64 KiB READ(10)/WRITE(10): file LU vs mirror LU, interleaved 0.3 s windows."""
    import struct

    sys.path.insert(0, str(ROOT))
    from services.iscsi_target.scsi import FileBackstore, LogicalUnit, Nexus, ScsiTarget
    from services.iscsi_target.scsi.mirror import MirrorBackstore
    from services.iscsi_target.scsi.pread_file import PreadFileBackstore

    size, blocks = 64 << 20, 128
    span = size // 512 - blocks
    cdbs = {op: [memoryview(bytes([op, 0]) + struct.pack(">IxHx", (i * 977 * blocks) % span, blocks) + bytes(6))
                 for i in range(512)] for op in (0x28, 0x2A)}
    payload = memoryview(os.urandom(blocks * 512))
    luns = {"file": FileBackstore(tmp / "ip-single.img", size),
            "mirror": MirrorBackstore([PreadFileBackstore(tmp / f"ip-leg{i}.img", size) for i in (0, 1)])}
    nexus = Nexus("iqn.2026-11.org.bootfleet.bench:init,i,0x000000000001", f"{IQN},t,0x0001", 1)
    targets = {}
    for name, store in luns.items():
        targets[name] = ScsiTarget(IQN, {0: LogicalUnit(store, 0)})
        targets[name].execute(nexus, 0, memoryview(bytes(16)), None)  # the power-on unit attention
        for cdb in cdbs[0x2A]:  # every block written once: in the page cache
            targets[name].execute(nexus, 0, cdb, payload)
    results = {(name, op): [] for name in luns for op in cdbs}
    for r in range(rounds):
        for op in (0x28, 0x2A):
            for name in (("file", "mirror") if r % 2 == 0 else ("mirror", "file")):
                execute, data = targets[name].execute, payload if op == 0x2A else None
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < 0.3:
                    for cdb in cdbs[op]:
                        execute(nexus, 0, cdb, data)
                    n += len(cdbs[op])
                results[(name, op)].append((time.perf_counter() - start) / n * 1e6)
    print(f"SCSI layer in this process, us per execute, median of {rounds} interleaved 0.3 s windows:")
    for op, label in ((0x28, "READ(10) 64 KiB"), (0x2A, "WRITE(10) 64 KiB")):
        f, m = statistics.median(results[("file", op)]), statistics.median(results[("mirror", op)])
        print(f"  {label:18} file {f:7.2f}  mirror {m:7.2f}  (+{m - f:.2f} us)")
    for store in luns.values():
        store.close()


def measure(proc: subprocess.Popen, port: int, rounds: int, scale: float = 1.0, limit: float = 120):
    """Each workload on LUN 0 and LUN 1 in turn, order alternating by round: figures, CPU seconds, requests."""
    results = {w[0]: {0: [], 1: []} for w in WORKLOADS}
    cpu = {w[0]: {0: 0.0, 1: 0.0} for w in WORKLOADS}  # target CPU seconds per workload and LUN
    ops = {w[0]: {0: 0, 1: 0} for w in WORKLOADS}
    started = time.monotonic()
    done = 0
    for round_no in range(rounds):
        for name, wargs, unit, count in WORKLOADS:
            count = max(100, int(count * scale))
            for lun in ((0, 1) if round_no % 2 == 0 else (1, 0)):
                before = cpu_seconds(proc.pid)
                results[name][lun].append(figure(unit, wargs, count, bench(port, lun, wargs, count)))
                cpu[name][lun] += cpu_seconds(proc.pid) - before
                ops[name][lun] += count
        done += 1
        if time.monotonic() - started > limit:
            break
    return done, results, cpu, ops


def report(title: str, measured) -> None:
    rounds, results, cpu, ops = measured
    print(f"{title}; {rounds} interleaved rounds, median; load average {os.getloadavg()[0]:.1f} "
          "(a shared machine: compare within one run)")
    print(f"{'workload':32} {'mirror':>10} {'single':>10} {'ratio':>7} {'per-round median':>17} "
          f"{'target CPU us/request mirror/single':>36}   rounds (mirror/single, each round's pair back to back)")
    for name, *_ in WORKLOADS:
        m, f = statistics.median(results[name][1]), statistics.median(results[name][0])
        ratios = [a / b for a, b in zip(results[name][1], results[name][0])]
        each = " ".join(f"{r:.2f}" for r in ratios)
        cm, cf = (cpu[name][lun] / ops[name][lun] * 1e6 for lun in (1, 0))
        print(f"{name:32} {m:10.0f} {f:10.0f} {m / f:6.2f}x {statistics.median(ratios):16.2f}x "
              f"{cm:17.1f} {cf:6.1f} ({cm / cf:4.2f}x)   {each}")


def make_images(directory: Path, size_mib: int) -> list[Path]:
    """single.img, leg0.img and leg1.img of the same size and content."""
    chunk = os.urandom(1 << 20)
    with open(directory / "single.img", "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)
    for leg in ("leg0.img", "leg1.img"):
        shutil.copyfile(directory / "single.img", directory / leg)
    return [directory / name for name in ("single.img", "leg0.img", "leg1.img")]


def page_cache(tmp: Path, args) -> None:
    """Two file legs and the single file on one file system, warm: the mirror's own cost."""
    make_images(tmp, args.size_mib)
    port = free_port()
    proc = start(tmp, port, args.busy_poll_us)
    try:
        for lun in (0, 1):  # warm the page cache and the target
            bench(port, lun, ["-d", "32", "-s", "64k"], args.size_mib * 16)
        report(f"mirror LUN (two file legs) vs file LUN, one page cache, one target, qemu-img bench over "
               f"loopback; busy_poll_us={args.busy_poll_us}", measure(proc, port, args.rounds))
    finally:
        stop(proc)


def devices(tmp: Path, args) -> None:
    """Three devices alike (the single LUN's and the two legs), each a loop device on a file in memory
    capped by the kernel's block throttle (cgroup v1 blkio) at --device-mbs and --device-iops for reads and
    for writes, as a cloud volume's provisioned throughput or a SAN share caps a disk; LUNs opened O_DIRECT
    (`direct: true`, both sides alike), so every request reaches its device. The cap is a budget, not a
    service time: a leg's budget refills while the other leg serves."""
    v1, v2 = Path("/sys/fs/cgroup/blkio"), Path("/sys/fs/cgroup")
    if (v1 / "blkio.throttle.read_bps_device").exists():
        cgroup = v1 / f"bootfleet-bench-mirror-{os.getpid()}"
    elif "io" in (v2 / "cgroup.controllers").read_text().split() if (v2 / "cgroup.controllers").exists() else False:
        cgroup = v2 / f"bootfleet-bench-mirror-{os.getpid()}"
        (v2 / "cgroup.subtree_control").write_text("+io\n")
    else:
        raise SystemExit("two devices: no block throttle here (cgroup v1 blkio or cgroup v2 io)")
    if os.geteuid() != 0:
        raise SystemExit("two devices: loop devices and cgroups need root")
    need("losetup")
    shm = Path(tempfile.mkdtemp(prefix="bench-mirror-dev-", dir="/dev/shm"))
    loops: list[str] = []
    proc = None
    try:
        for image in make_images(shm, args.size_mib):
            loops.append(subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                                        capture_output=True, text=True).stdout.strip())
        cgroup.mkdir()
        for dev in loops:
            rdev = os.stat(dev).st_rdev
            number = f"{os.major(rdev)}:{os.minor(rdev)}"
            bps, iops = args.device_mbs << 20, args.device_iops
            if cgroup.parent == v1:
                for knob, value in (("read_bps", bps), ("write_bps", bps), ("read_iops", iops), ("write_iops", iops)):
                    (cgroup / f"blkio.throttle.{knob}_device").write_text(f"{number} {value}\n")
            else:
                (cgroup / "io.max").write_text(f"{number} rbps={bps} wbps={bps} riops={iops} wiops={iops}\n")
        single, leg0, leg1 = loops
        luns = f"""\
        - {{id: 0, backstore: {{type: block, path: {single}, direct: true}}}}
        - id: 1
          backstore:
            type: mirror
            legs: [{{type: block, path: {leg0}, direct: true}}, {{type: block, path: {leg1}, direct: true}}]
"""
        port = free_port()
        proc = start(tmp, port, args.busy_poll_us, luns, cgroup)
        report(f"mirror LUN vs single LUN on devices alike (loop devices capped at {args.device_mbs} MiB/s and "
               f"{args.device_iops} IOPS each, O_DIRECT); busy_poll_us={args.busy_poll_us}",
               measure(proc, port, args.rounds, scale=0.25))
    finally:
        stop(proc)
        for dev in loops:
            subprocess.run(["losetup", "--detach", dev], check=False)
        if cgroup.exists():
            cgroup.rmdir()
        shutil.rmtree(shm, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--busy-poll-us", type=int, default=0, help="iscsi.busy_poll_us for the run")
    parser.add_argument("--device-mbs", type=int, default=125, help="each device's cap, MiB/s (reads, writes)")
    parser.add_argument("--device-iops", type=int, default=3000, help="each device's cap, IOPS (reads, writes)")
    parser.add_argument("--only", choices=("in-process", "page-cache", "devices"), action="append",
                        help="run only these parts (repeatable)")
    args = parser.parse_args()
    parts = args.only or ["in-process", "page-cache", "devices"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-mirror-"))
    try:
        if "in-process" in parts:
            in_process(tmp, args.rounds)
        if "page-cache" in parts:
            page_cache(tmp, args)
        if "devices" in parts:
            devices(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
