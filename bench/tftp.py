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
Prints MB/s (10^6 bytes/s) for each and the ratios ours/theirs. Bounded: every client has a timeout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT_TIMEOUT = 30  # s per single download
PARALLEL_TIMEOUT = 80  # s per client of a parallel run (50 x 32 MiB at 25 MB/s takes 67 s)
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


def parallel(port: int, name: str, size: int, clients: int) -> tuple[float, list[int]]:
    """-> (aggregate MB/s of the downloads that succeeded, the exit code of each curl that failed)."""
    start = time.perf_counter()
    procs = [curl(port, name, size, PARALLEL_TIMEOUT) for _ in range(clients)]
    codes: list[int] = []
    for p in procs:
        ok(p, size, codes)
    elapsed = time.perf_counter() - start
    return (clients - len(codes)) * size / elapsed / 1e6, codes


def parallel_rounds(servers: dict[str, int], name: str, size: int, clients: int, rounds: int) -> dict[str, list]:
    """-> server -> [(MB/s, failed curls' exit codes) per round]; the order rotates so no server always runs
    after another."""
    results: dict[str, list] = {label: [] for label in servers}
    labels = list(servers)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            results[label].append(parallel(servers[label], name, size, clients))
    return results


def build_c_floor(scratch: Path) -> Path | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    binary = scratch / "tftp_floor_c"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(C_FLOOR)], check=True)
    return binary


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
    procs: list[subprocess.Popen] = []
    groups: list[subprocess.Popen] = []  # the floors: each leads a process group of its forks
    try:
        root = scratch / "root"
        root.mkdir()
        (root / "file").write_bytes(os.urandom(size))
        os.chmod(scratch, 0o755)
        os.chmod(root, 0o755)
        os.chmod(root / "file", 0o644)
        hpa_port, our_port, pair_port = free_port(), free_port(), free_port()
        procs.append(subprocess.Popen([in_tftpd, "-L", "-s", str(root), "-a", f"127.0.0.1:{hpa_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        # ours as one process, and as two on one port (SO_REUSEPORT), as `scale.tftp: 2` runs it under supervisord
        for label, port, instances in (("one", our_port, 1), ("pair", pair_port, 2)):
            config = scratch / f"bootfleet-{label}.yaml"
            config.write_text(
                "version: 1\nlogging: {level: warning}\n"
                f"tftp: {{root: {root}, address: 127.0.0.1, port: {port}}}\n"
            )
            for instance in range(instances):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "services.tftp", "--config", str(config), "--state-dir",
                     str(scratch / f"state-{label}"), "--instance", str(instance)], cwd=ROOT, env=env))
        servers = {"tftpd-hpa": hpa_port, "ours, 1 process": our_port, "ours, 2 processes": pair_port}
        if args.floor:
            for shape, label in (("1", "1 process"), ("2", "2 processes"), ("fork", "a process/transfer")):
                port = free_port()
                groups.append(subprocess.Popen([sys.executable, str(FLOOR), str(port), str(root / "file"), shape],
                                               start_new_session=True))
                servers[f"the floor, {label}"] = port
            binary = build_c_floor(scratch)
            if binary is None:
                print("the C floor: left out, there is no C compiler (apt-get install gcc)")
            else:
                port = free_port()
                groups.append(subprocess.Popen([str(binary), str(port), str(root / "file")], start_new_session=True))
                servers["the C floor, 1 process"] = port
        for label, port in servers.items():
            wait_udp(port, label)
        time.sleep(1.5)  # the second of a pair answers once its imports are done; until then the first serves all

        began = time.monotonic()
        ours, theirs, ws1, ws16 = [], [], [], []
        for _ in range(args.rounds):
            theirs.append(one_curl(hpa_port, "file", size))
            ours.append(one_curl(our_port, "file", size))
            ws1.append(one_atftp(our_port, "file", size, 1))
            ws16.append(one_atftp(our_port, "file", size, 16))
        par = parallel_rounds(servers, "file", size, args.parallel, args.parallel_rounds)

        o, t, w1, w16 = (statistics.median(x) for x in (ours, theirs, ws1, ws16))
        print(f"file {args.size_mib} MiB, loopback, medians of {args.rounds} rounds (MB/s = 10^6 bytes/s)")
        print(f"one client, curl blksize 1468:  ours {o:7.1f} MB/s   tftpd-hpa {t:7.1f} MB/s   ratio {o / t:.2f}")
        print(f"atftp blksize 1468, ours:       windowsize 16 {w16:7.1f} MB/s   windowsize 1 {w1:7.1f} MB/s   "
              f"ratio {w16 / w1:.2f}")
        hpa = par["tftpd-hpa"]
        print(f"{args.parallel} parallel curl clients, {args.parallel_rounds} rounds (median MB/s; ratio to tftpd-hpa "
              f"in the same round: median [each round]):")
        for label, runs in par.items():
            codes = [c for _, failed in runs for c in failed]
            line = f"  {label:30} {statistics.median(m for m, _ in runs):7.1f} MB/s, {len(codes)} failed"
            if label != "tftpd-hpa":
                ratios = [m / h for (m, _), (h, _) in zip(runs, hpa)]
                line += f"   ratio {statistics.median(ratios):.2f} {[round(x, 2) for x in ratios]}"
            print(line + (f"; curl exit codes {sorted(set(codes))} (28: its --max-time ran out)" if codes else ""))
        print(f"bench time {time.monotonic() - began:.0f} s")
        print(f"rounds, one client: ours {[round(x, 1) for x in ours]} tftpd-hpa {[round(x, 1) for x in theirs]}; "
              f"ws16 {[round(x, 1) for x in ws16]} ws1 {[round(x, 1) for x in ws1]}")
    finally:
        for proc in groups:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs + groups:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
