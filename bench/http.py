"""HTTP throughput: Bootfleet's HTTP listener (the TFTP service's) against nginx on loopback, one run, interleaved.

    .venv/bin/python bench/http.py [--rounds 5] [--parallel 50] [--size-mib 32] [--nginx-workers 1] [--quiet 0.15]

Cases (one file of random bytes under one root that both servers serve, warm page cache, clients write to
/dev/null):
1. one client (curl), the whole file: ours and nginx, each `--rounds` times in alternation; median MB/s.
2. `--parallel` curls at once, each the whole file: aggregate MB/s = bytes of all / wall time. A round runs
   each server twice, ABBA (ours, nginx, nginx, ours; the next round BAAB), and takes the ratio within the
   round, so a drift over the round cancels. Every window also measures what the rest of the machine took:
   the CPU busy time from /proc/stat (steal included) less the server's and its curls', as a share of the
   window's wall time x cores. Another process taking the cores for a second halves the window it hits (that
   is where single rounds of 0.5 and of 2.0 came from: 2 shared cores). A round where some window had more
   than `--quiet` of the machine taken by others is marked busy and run again, up to `--rounds` extra times;
   the bench prints every round with its ratio and the largest share, and the median of the quiet rounds and
   of all rounds. The CPU per GiB (server + its curls) does not depend on the others' load: printed too, and
   the share of the cores left idle during the windows (no process runnable: the server and its curls waiting
   on each other).
3. the same `--parallel` curls with the cores split (when there are at least two): a second nginx and a second
   ours started on the last core, the curls on the others, as when the clients are other machines (real boot
   clients are): the measure of the goal (ours >= 0.9x nginx), as for TFTP (docs/tftp.md). Sharing two cores
   with 50 local curls, the figure of case 2 depends on how the kernel schedules the curls around the server
   (idle gaps, a busy neighbour taking a core for a second): printed for information.
4. the same file from our own TFTP (the same service process, curl --tftp-blksize 1468, one client), against
   our HTTP: the ratio HTTP / TFTP.
nginx is Debian's package (`apt-get install nginx`), sendfile on, tcp_nopush on, access log off, started by this
bench on a free loopback port with its own temporary prefix and configuration (`daemon off`, so its PID is the
one we started), `--nginx-workers` worker processes (1: the same one process as ours; `auto`: one per core,
Debian's default), and stopped by that PID. Ours is `python -m services.tftp --config` standalone, one process,
with the defaults (`logging.level: info`: a line per reply) and `http.enabled: true`.
Prints MB/s (10^6 bytes/s), the ratios ours/nginx and, for the parallel case, the CPU (user + system) per GiB
sent of each server (its worker processes included) and of its curls (their rusage once reaped): with clients
and server on the same two cores, what a server costs its clients decides as much as its own CPU. Bounded:
every client has a timeout.
"""

from __future__ import annotations

import os
import sys

# run as `python bench/http.py`, this file's folder comes first on sys.path, where this file would stand in for
# the standard library's `http` package for anything that imports it
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, os.path.join(_HERE, "support"))
from cores import pinned, split_cores  # noqa: E402  bench/support/cores.py

ROOT = Path(__file__).resolve().parent.parent
CLIENT_TIMEOUT = 60  # s per download
NAME = "big.bin"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if not path:
        sys.exit(f"bench/http.py: {tool} is missing (apt-get install {package})")
    return path


def wait_tcp(port: int, what: str, proc: subprocess.Popen, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} does not listen on port {port} after {deadline} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_nginx(work: Path, root: Path, port: int, workers: str, name: str = "nginx") -> subprocess.Popen:
    nginx = need("nginx", "nginx")
    prefix = work / name
    (prefix / "logs").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root nginx would switch to nobody, who cannot read /tmp's 0700 dirs
    conf.write_text(f"""{user}worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    types {{ application/octet-stream bin; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    access_log off;
    keepalive_timeout 65;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
""")
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=open(prefix / "logs" / "stderr", "wb"))
    wait_tcp(port, "nginx", proc)
    return proc


def start_ours(work: Path, root: Path, http_port: int, tftp_port: int, name: str = "ours") -> subprocess.Popen:
    work = work / name
    work.mkdir()
    config = work / "bootfleet.yaml"
    # the defaults a user gets (logging at info: one line per reply, like an access log), HTTP turned on
    config.write_text(f"""version: 1
tftp: {{root: "{root}", address: 127.0.0.1, port: {tftp_port}}}
http: {{enabled: true, address: 127.0.0.1, port: {http_port}}}
""")
    log = open(work / "ours.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.tftp", "--config", str(config), "--state-dir", str(work)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=log)
    wait_tcp(http_port, "our TFTP service's HTTP listener", proc)
    return proc


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its children still running (nginx's workers), from /proc."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1]: the parent's PID
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def curl_http(port: int) -> subprocess.Popen:
    return subprocess.Popen(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "--max-time", str(CLIENT_TIMEOUT),
         f"http://127.0.0.1:{port}/{NAME}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def curl_tftp(port: int) -> subprocess.Popen:
    return subprocess.Popen(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "--max-time", str(CLIENT_TIMEOUT),
         "--tftp-blksize", "1468", f"tftp://127.0.0.1:{port}/{NAME}"], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)


def finished(proc: subprocess.Popen, size: int) -> bool:
    out, _ = proc.communicate()
    return proc.returncode == 0 and out.strip() == str(size).encode()


def one(start, port: int, size: int) -> float:
    """MB/s of one download."""
    t0 = time.perf_counter()
    proc = start(port)
    if not finished(proc, size):
        raise RuntimeError(f"a download from port {port} failed (curl exit {proc.returncode})")
    return size / (time.perf_counter() - t0) / 1e6


def parallel(port: int, size: int, clients: int, cpus: set[int] | None) -> tuple[float, int]:
    """-> (aggregate MB/s, failed downloads) of `clients` curls at once, on `cpus` (None: anywhere)."""
    t0 = time.perf_counter()
    with pinned(cpus):
        procs = [curl_http(port) for _ in range(clients)]
    failed = sum(not finished(p, size) for p in procs)
    wall = time.perf_counter() - t0
    return (clients - failed) * size / wall / 1e6, failed


def machine_cpu() -> tuple[float, float]:
    """-> (busy, idle) CPU seconds of all cores since boot, from /proc/stat's first line: busy is user, nice,
    system, irq, softirq and the time the hypervisor stole; idle is idle and iowait."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields)
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS, (idle + iowait) / CLOCK_TICKS


def window(port: int, server_pid: int, size: int, clients: int, cpus: set[int] | None) -> dict:
    """One parallel download: MB/s, failures, the server's and the curls' CPU, and the shares of the machine
    (cores x wall) that everything else took meanwhile and that stayed idle."""
    (busy0, idle0), cpu0 = machine_cpu(), cpu_seconds(server_pid)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # the curls; the servers are reaped last
    t0 = time.perf_counter()
    mbps, failed = parallel(port, size, clients, cpus)
    wall = time.perf_counter() - t0
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = cpu_seconds(server_pid) - cpu0
    curls = now.ru_utime + now.ru_stime - reaped.ru_utime - reaped.ru_stime
    busy1, idle1 = machine_cpu()
    cores = wall * os.cpu_count()
    return dict(mbps=mbps, failed=failed, server=server, curls=curls,
                others=max(0.0, busy1 - busy0 - server - curls) / cores, idle=(idle1 - idle0) / cores)


def parallel_rounds(servers: dict[str, int], pids: dict[str, int], size: int, clients: int, rounds: int,
                    quiet: float, cpus: set[int] | None = None) -> list[dict]:
    """ABBA rounds until `rounds` quiet ones (or `rounds` busy ones more): each round's windows and ratio."""
    done: list[dict] = []
    a, b = list(servers)
    while sum(r["quiet"] for r in done) < rounds and len(done) < 2 * rounds:
        order = [a, b, b, a] if len(done) % 2 == 0 else [b, a, a, b]
        windows = [(label, window(servers[label], pids[label], size, clients, cpus)) for label in order]
        mean = {label: statistics.mean(w["mbps"] for lab, w in windows if lab == label) for label in servers}
        busiest = max(w["others"] for _, w in windows)
        done.append(dict(windows=windows, ratio=mean["ours"] / mean["nginx"], busiest=busiest, quiet=busiest <= quiet,
                         order="".join(label[0] for label in order)))
    return done


def report(done: list[dict], servers: dict[str, int], clients: int, size: int, quiet_share: float) -> None:
    """Every round with its ratio and the largest share others took, each server's median, failures and CPU per
    GiB, and the medians of the ratios."""
    windows = [(label, w) for r in done for label, w in r["windows"]]
    for n, r in enumerate(done):
        print(f"  round {n + 1} {r['order']}: ours / nginx {r['ratio']:.2f}   " + "  ".join(
            f"{label} {w['mbps']:.0f}" for label, w in r["windows"])
              + f"   others at most {r['busiest']:.0%}" + ("" if r["quiet"] else "  (busy)"))
    for label in servers:
        mine = [w for lab, w in windows if lab == label]
        gib = len(mine) * clients * size / 2**30
        server, curls = sum(w["server"] for w in mine) / gib, sum(w["curls"] for w in mine) / gib
        print(f"  {label:6} median {statistics.median(w['mbps'] for w in mine):8.0f}   failed downloads "
              f"{sum(w['failed'] for w in mine)}   CPU s/GiB: server {server:.2f}, clients {curls:.2f}, "
              f"both {server + curls:.2f}   cores idle {statistics.mean(w['idle'] for w in mine):.1%}")
    quiet = [r["ratio"] for r in done if r["quiet"]]
    print(f"  ours / nginx: median of the quiet rounds (others <= {quiet_share:.0%}) "
          + (f"{statistics.median(quiet):.2f} ({len(quiet)} rounds)" if quiet else "-: no quiet round")
          + f"; of all rounds {statistics.median(r['ratio'] for r in done):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--nginx-workers", default="1", help="nginx worker_processes: 1 (as ours) or auto")
    parser.add_argument("--quiet", type=float, default=0.15,
                        help="a parallel round is quiet when no window had more of the cores taken by others")
    args = parser.parse_args()
    need("curl", "curl")
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        work = Path(tmp)
        root = work / "root"
        root.mkdir()
        (root / NAME).write_bytes(os.urandom(size))
        for path in (work, root):
            path.chmod(0o755)
        (root / NAME).chmod(0o644)
        ours_port, nginx_port, tftp_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
        started: list[subprocess.Popen] = []
        try:
            started.append(start_nginx(work, root, nginx_port, args.nginx_workers))
            started.append(start_ours(work, root, ours_port, tftp_port))
            servers = {"ours": ours_port, "nginx": nginx_port}
            pids = {"ours": started[1].pid, "nginx": started[0].pid}
            for port in servers.values():  # warm: page cache, first-connection costs
                one(curl_http, port, size)

            single: dict[str, list[float]] = {label: [] for label in servers}
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for label in order:
                    single[label].append(one(curl_http, servers[label], size))
            print(f"one client, {args.size_mib} MiB over HTTP, {args.rounds} rounds (MB/s):")
            for label, runs in single.items():
                print(f"  {label:6} median {statistics.median(runs):8.0f}   runs " + " ".join(f"{v:.0f}" for v in runs))
            ratio_1 = statistics.median(single["ours"]) / statistics.median(single["nginx"])
            print(f"  ours / nginx: {ratio_1:.2f}")

            done = parallel_rounds(servers, pids, size, args.parallel, args.rounds, args.quiet)
            print(f"{args.parallel} clients at once, {args.size_mib} MiB each, sharing the {os.cpu_count()} cores "
                  f"with the servers (for information; aggregate MB/s; others: the share of the cores other "
                  f"processes took in the window):")
            report(done, servers, args.parallel, size, args.quiet)
            split = split_cores()
            if split:
                server_cpus, client_cpus = split
                # a second pair, started on the server core (their threads and nginx's workers inherit it)
                split_ports = {"ours": free_port(), "nginx": free_port()}
                with pinned(server_cpus):
                    started.append(start_nginx(work, root, split_ports["nginx"], args.nginx_workers, "nginx-split"))
                    started.append(start_ours(work, root, split_ports["ours"], free_port(socket.SOCK_DGRAM),
                                              "ours-split"))
                split_pids = {"nginx": started[-2].pid, "ours": started[-1].pid}
                for port in split_ports.values():
                    one(curl_http, port, size)
                done = parallel_rounds(split_ports, split_pids, size, args.parallel, args.rounds, args.quiet,
                                       client_cpus)
                print(f"the same with the cores split, as when the clients are other machines (the goal's "
                      f"measure): the servers on core {min(server_cpus)}, the curls on {sorted(client_cpus)}:")
                report(done, split_ports, args.parallel, size, args.quiet)
            else:
                print("cores split: left out, this machine has one core")

            tftp_runs, http_runs = [], []
            for _ in range(max(1, min(args.rounds, 3))):
                tftp_runs.append(one(curl_tftp, tftp_port, size))
                http_runs.append(one(curl_http, ours_port, size))
            t, h = statistics.median(tftp_runs), statistics.median(http_runs)
            print(f"our TFTP (curl, blksize 1468) and our HTTP, one client, {args.size_mib} MiB (MB/s):")
            print(f"  tftp {t:8.1f}   http {h:8.0f}   http / tftp: {h / t:.1f}")
            print(f"nginx worker_processes {args.nginx_workers}; {os.cpu_count()} cores (shared with whatever else "
                  f"runs here: figures from a shared machine are noisy)")
        finally:
            for proc in started:
                stop(proc)


if __name__ == "__main__":
    main()
