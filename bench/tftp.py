"""TFTP throughput: Bootfleet's server and tftpd-hpa side by side on loopback, one run, interleaved.

    .venv/bin/python bench/tftp.py [--rounds 3] [--parallel 50] [--parallel-rounds 3] [--size-mib 32] [--floor]

Cases (a 32 MiB file of random bytes, clients write to /dev/null):
1. one client, curl --tftp-blksize 1468: ours and tftpd-hpa, median of the rounds.
2. windowsize (RFC 7440): atftp --option "windowsize 16" against ours with windowsize 1 (curl cannot ask it;
   tftpd-hpa 5.2 does not implement it), both at blksize 1468, to /dev/null.
3. `--parallel` curl clients at once (blksize 1468): aggregate MB/s = bytes of all / wall time, and failures;
   ours as one process and as two processes sharing a port (tftpd-hpa forks one per client). Each of
   `--parallel-rounds` rounds runs every server once, in a rotated order; a ratio is taken within a round (the
   machine's speed drifts over minutes) and the median of the rounds' ratios is printed.
   With --floor, the rounds add bench/yardsticks/tftp_floor.py, the least a CPython loop does per packet, as
   one and as two processes, so its ratio to tftpd-hpa bounds what any Python loop reaches here; the same in
   tftpd-hpa's shape (a process forked per transfer); and the loop in C (bench/yardsticks/tftp_floor.c, built
   with cc), what a single event loop reaches at all.
4. the same 50 clients with the cores split (when there are at least two): the servers on the last core, the
   clients on the others, as when the clients are other machines. Sharing the cores, a process per client
   (tftpd-hpa) has an edge no network gives it: woken by a curl's ACK on that curl's core, it preempts the
   curl and answers before the curl sleeps, so the curl never pays a sleep and a wake-up per packet; against
   any event loop (ours, the floors, C) each curl sleeps about once a packet. The report prints, per server,
   curl's CPU per packet and how often it slept (voluntary context switches per packet, from the rusage of
   the reaped curls), and the busy time per packet of all cores or, split, of the server core.
Prints MB/s (10^6 bytes/s) for each and the ratios ours/theirs. Bounded: every client has a timeout.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from support.cores import pinned, split_cores  # bench/support/ (this file's folder is first on sys.path)

ROOT = Path(__file__).resolve().parent.parent
CLIENT_TIMEOUT = 30  # s per single download
PARALLEL_TIMEOUT = 80  # s per client of a parallel run (50 x 32 MiB at 25 MB/s takes 67 s)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/stat's unit
FLOOR = ROOT / "bench" / "yardsticks" / "tftp_floor.py"
C_FLOOR = FLOOR.with_suffix(".c")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if not path:
        sys.exit(f"bench/tftp.py: {tool} is missing (apt-get install tftpd-hpa atftp curl)")
    return path


def wait_udp(port: int, name: str, deadline: float = 10.0) -> None:
    # a TFTP request for a missing file gets an ERROR once the server is up
    end = time.monotonic() + deadline
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < end:
            s.sendto(b"\0\x01no-such-file\0octet\0", ("127.0.0.1", port))
            try:
                s.recvfrom(600)
                return
            except OSError:
                time.sleep(0.1)
    sys.exit(f"bench/tftp.py: {name} did not answer on port {port}")


def curl(port: int, name: str, size: int, timeout: int = CLIENT_TIMEOUT) -> subprocess.Popen:
    return subprocess.Popen(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "--max-time", str(timeout),
         "--tftp-blksize", "1468", f"tftp://127.0.0.1:{port}/{name}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )


def ok(proc: subprocess.Popen, size: int, codes: list | None = None) -> bool:
    out, _ = proc.communicate(timeout=PARALLEL_TIMEOUT + 5)
    good = proc.returncode == 0 and out.strip() == str(size).encode()
    if not good and codes is not None:
        codes.append(proc.returncode)  # 28: curl's --max-time ran out; 0: the size was wrong
    return good


def one_curl(port: int, name: str, size: int) -> float:
    start = time.perf_counter()
    proc = curl(port, name, size)
    good = ok(proc, size)
    elapsed = time.perf_counter() - start
    if not good:
        raise RuntimeError(f"curl download from port {port} failed")
    return size / elapsed / 1e6


def one_atftp(port: int, name: str, size: int, windowsize: int) -> float:
    # to /dev/null, as curl: atftp writing a file costs more than the transfer (tests checksum atftp downloads)
    args = ["atftp", "--option", "blksize 1468", "--option", f"windowsize {windowsize}",
            "-g", "-r", name, "-l", "/dev/null", "127.0.0.1", str(port)]
    start = time.perf_counter()
    proc = subprocess.run(args, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=CLIENT_TIMEOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"atftp windowsize {windowsize} from port {port} failed: {proc.stderr[-200:]!r}")
    return size / elapsed / 1e6


@dataclass
class Run:
    """One parallel run: what the clients got and what it cost them."""

    mbs: float  # aggregate MB/s of the downloads that succeeded
    failed: list[int]  # the exit code of each curl that failed
    curl_us: float  # curl's CPU (user + system) per DATA packet, µs
    sleeps: float  # curl's voluntary context switches per DATA packet: how often it waited for one
    busy: float  # how busy the watched cores were, 0..1
    cores_us: float  # the watched cores' busy time per DATA packet, µs
    stolen: float  # the share of the watched cores' time the hypervisor took, 0..1


def cpu_times(cpus: set[int]) -> tuple[int, int, int]:
    """-> (busy, stolen, total) jiffies of these cores, from /proc/stat; stolen: the hypervisor ran something
    else on them (a source of this VM's noise)."""
    busy = stolen = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4] - ticks[7]
                stolen += ticks[7]
    return busy, stolen, total


def parallel(port: int, name: str, size: int, clients: int, client_cpus: set[int] | None = None,
             watch: set[int] | None = None) -> Run:
    """`clients` curls at once; `watch`: the cores whose busy share to report (all of them by default)."""
    watch = watch if watch is not None else set(os.sched_getaffinity(0))
    before, cores = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_times(watch)
    start = time.perf_counter()
    with pinned(client_cpus):
        procs = [curl(port, name, size, PARALLEL_TIMEOUT) for _ in range(clients)]
    codes: list[int] = []
    for p in procs:
        ok(p, size, codes)  # reaps each curl: its rusage joins RUSAGE_CHILDREN (the servers are not reaped)
    elapsed = time.perf_counter() - start
    after, cores_after = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_times(watch)
    packets = clients * (size // 1468 + 1)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    busy, stolen, total = (a - b for a, b in zip(cores_after, cores))
    total = total or 1
    return Run((clients - len(codes)) * size / elapsed / 1e6, codes, cpu / packets * 1e6,
               (after.ru_nvcsw - before.ru_nvcsw) / packets, busy / total, busy / CLOCK_TICKS / packets * 1e6,
               stolen / total)


def parallel_rounds(servers: dict[str, int], name: str, size: int, clients: int, rounds: int,
                    client_cpus: set[int] | None = None, watch: set[int] | None = None) -> dict[str, list[Run]]:
    """-> server -> a Run per round; the order rotates so no server always runs after another."""
    results: dict[str, list[Run]] = {label: [] for label in servers}
    labels = list(servers)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            results[label].append(parallel(servers[label], name, size, clients, client_cpus, watch))
    return results


def report(par: dict[str, list[Run]], busy_label: str) -> None:
    hpa = par["tftpd-hpa"]
    for label, runs in par.items():
        codes = [c for run in runs for c in run.failed]
        line = f"  {label:30} {statistics.median(r.mbs for r in runs):7.1f} MB/s, {len(codes)} failed"
        if label != "tftpd-hpa":
            ratios = [r.mbs / h.mbs for r, h in zip(runs, hpa)]
            line += f"   ratio {statistics.median(ratios):.2f} {[round(x, 2) for x in ratios]}"
        print(line + (f"; curl exit codes {sorted(set(codes))} (28: its --max-time ran out)" if codes else ""))
        print(f"  {'':30} per DATA packet: curl {statistics.median(r.curl_us for r in runs):4.1f} µs CPU, "
              f"{statistics.median(r.sleeps for r in runs):.2f} sleeps; {busy_label} "
              f"{statistics.median(r.cores_us for r in runs):4.1f} µs ({statistics.median(r.busy for r in runs):.0%} busy, "
              f"{max(r.stolen for r in runs):.0%} stolen by the host at most)")


def build_c_floor(scratch: Path) -> Path | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    binary = scratch / "tftp_floor_c"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(C_FLOOR)], check=True)
    return binary


class Launcher:
    """Starts the servers under test, each pinned to `cpus` or not, and stops all it started (by PID)."""

    def __init__(self, scratch: Path, root: Path, in_tftpd: str, c_floor: Path | None):
        self.scratch, self.root, self.in_tftpd, self.c_floor = scratch, root, in_tftpd, c_floor
        self.procs: list[subprocess.Popen] = []
        self.groups: list[subprocess.Popen] = []  # the floors: each leads a process group of its forks

    def hpa(self, cpus: set[int] | None) -> int:
        port = free_port()
        with pinned(cpus):
            self.procs.append(subprocess.Popen([self.in_tftpd, "-L", "-s", str(self.root), "-a", f"127.0.0.1:{port}"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return port

    def ours(self, instances: int, cpus: set[int] | None) -> int:
        """`instances` processes on one port (SO_REUSEPORT), as `scale.tftp` runs them under supervisord."""
        port = free_port()
        config = self.scratch / f"bootfleet-{port}.yaml"
        config.write_text("version: 1\nlogging: {level: warning}\n"
                          f"tftp: {{root: {self.root}, address: 127.0.0.1, port: {port}}}\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with pinned(cpus):
            for instance in range(instances):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "services.tftp", "--config", str(config), "--state-dir",
                     str(self.scratch / f"state-{port}"), "--instance", str(instance)], cwd=ROOT, env=env))
        return port

    def floor(self, program: list[str], cpus: set[int] | None, *shape: str) -> int:
        """A yardstick (`program PORT FILE [shape]`) leading a process group of its own forks."""
        port = free_port()
        with pinned(cpus):
            self.groups.append(subprocess.Popen([*program, str(port), str(self.root / "file"), *shape],
                                                start_new_session=True))
        return port

    def servers(self, floor: bool, cpus: set[int] | None = None) -> dict[str, int]:
        """Sharing the cores (cpus None): ours as one and as two processes; on one core, ours as one."""
        servers = {"tftpd-hpa": self.hpa(cpus), "ours, 1 process": self.ours(1, cpus)}
        if cpus is None:
            servers["ours, 2 processes"] = self.ours(2, cpus)
        if floor:
            shapes = (("1", "1 process"), ("2", "2 processes"), ("fork", "a process/transfer"))
            for shape, label in shapes if cpus is None else (shapes[0], shapes[2]):
                servers[f"the floor, {label}"] = self.floor([sys.executable, str(FLOOR)], cpus, shape)
            if self.c_floor is not None:
                servers["the C floor, 1 process"] = self.floor([str(self.c_floor)], cpus)
        return servers

    def stop(self) -> None:
        for proc in self.groups:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs + self.groups:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--parallel-rounds", type=int, default=3)
    parser.add_argument("--floor", action="store_true", help="add the minimal servers (Python loop, Python fork per transfer, C loop) to the parallel case")
    args = parser.parse_args()
    in_tftpd = need("in.tftpd")
    need("curl")
    need("atftp")
    size = args.size_mib << 20
    scratch = Path(tempfile.mkdtemp(prefix="bench-tftp-"))
    root = scratch / "root"
    c_floor = build_c_floor(scratch) if args.floor else None
    if args.floor and c_floor is None:
        print("the C floor: left out, there is no C compiler (apt-get install gcc)")
    launcher = Launcher(scratch, root, in_tftpd, c_floor)
    try:
        root.mkdir()
        (root / "file").write_bytes(os.urandom(size))
        os.chmod(scratch, 0o755)
        os.chmod(root, 0o755)
        os.chmod(root / "file", 0o644)
        servers = launcher.servers(args.floor)
        split = split_cores()
        split_servers = launcher.servers(args.floor, split[0]) if split else {}
        for label, port in {**servers, **split_servers}.items():
            wait_udp(port, label)
        time.sleep(1.5)  # the second of a pair answers once its imports are done; until then the first serves all
        hpa_port, our_port = servers["tftpd-hpa"], servers["ours, 1 process"]

        began = time.monotonic()
        ours, theirs, ws1, ws16 = [], [], [], []
        for _ in range(args.rounds):
            theirs.append(one_curl(hpa_port, "file", size))
            ours.append(one_curl(our_port, "file", size))
            ws1.append(one_atftp(our_port, "file", size, 1))
            ws16.append(one_atftp(our_port, "file", size, 16))
        par = parallel_rounds(servers, "file", size, args.parallel, args.parallel_rounds)
        par_split = (parallel_rounds(split_servers, "file", size, args.parallel, args.parallel_rounds, split[1],
                                     split[0]) if split else {})

        o, t, w1, w16 = (statistics.median(x) for x in (ours, theirs, ws1, ws16))
        print(f"file {args.size_mib} MiB, loopback, medians of {args.rounds} rounds (MB/s = 10^6 bytes/s)")
        print(f"one client, curl blksize 1468:  ours {o:7.1f} MB/s   tftpd-hpa {t:7.1f} MB/s   ratio {o / t:.2f}")
        print(f"atftp blksize 1468, ours:       windowsize 16 {w16:7.1f} MB/s   windowsize 1 {w1:7.1f} MB/s   "
              f"ratio {w16 / w1:.2f}")
        print(f"{args.parallel} parallel curl clients, {args.parallel_rounds} rounds (median MB/s; ratio to tftpd-hpa "
              f"in the same round: median [each round]):")
        print(" sharing all cores:")
        report(par, "all cores")
        if split:
            print(f" cores split: the servers on core {min(split[0])}, the clients on {sorted(split[1])}:")
            report(par_split, "server core")
        else:
            print(" cores split: left out, this machine has one core")
        print(f"bench time {time.monotonic() - began:.0f} s")
        print(f"rounds, one client: ours {[round(x, 1) for x in ours]} tftpd-hpa {[round(x, 1) for x in theirs]}; "
              f"ws16 {[round(x, 1) for x in ws16]} ws1 {[round(x, 1) for x in ws1]}")
    finally:
        launcher.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
