"""HTTP throughput: Bootfleet's HTTP listener (the TFTP service's) against nginx on loopback, one run, interleaved.

    .venv/bin/python bench/http.py [--rounds 5] [--parallel 50] [--size-mib 32] [--nginx-workers 1]

Cases (one file of random bytes under one root that both servers serve, warm page cache, clients write to
/dev/null):
1. one client (curl), the whole file: ours and nginx, each `--rounds` times in alternation; median MB/s.
2. `--parallel` curls at once, each the whole file: aggregate MB/s = bytes of all / wall time; each round runs
   both servers in a rotated order and the ratio is taken within the round (the machine's speed drifts over
   minutes); the median of the rounds' ratios is printed.
3. the same file from our own TFTP (the same service process, curl --tftp-blksize 1468, one client), against
   our HTTP: the ratio HTTP / TFTP.
nginx is Debian's package (`apt-get install nginx`), sendfile on, tcp_nopush on, access log off, started by this
bench on a free loopback port with its own temporary prefix and configuration (`daemon off`, so its PID is the
one we started), `--nginx-workers` worker processes (1: the same one process as ours; `auto`: one per core,
Debian's default), and stopped by that PID. Ours is `python -m services.tftp --config` standalone, one process.
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


def start_nginx(work: Path, root: Path, port: int, workers: str) -> subprocess.Popen:
    nginx = need("nginx", "nginx")
    prefix = work / "nginx"
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


def start_ours(work: Path, root: Path, http_port: int, tftp_port: int) -> subprocess.Popen:
    config = work / "bootfleet.yaml"
    config.write_text(f"""version: 1
logging: {{level: warning}}
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


def parallel(port: int, size: int, clients: int) -> tuple[float, int]:
    """-> (aggregate MB/s, failed downloads) of `clients` curls at once."""
    t0 = time.perf_counter()
    procs = [curl_http(port) for _ in range(clients)]
    failed = sum(not finished(p, size) for p in procs)
    wall = time.perf_counter() - t0
    return (clients - failed) * size / wall / 1e6, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--nginx-workers", default="1", help="nginx worker_processes: 1 (as ours) or auto")
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

            ratios, par = [], {label: [] for label in servers}
            failures = {label: 0 for label in servers}
            cpu = {label: 0.0 for label in servers}
            client_cpu = {label: 0.0 for label in servers}
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                got = {}
                for label in order:
                    before = cpu_seconds(pids[label])
                    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # the curls; the servers are reaped last
                    mbps, failed = parallel(servers[label], size, args.parallel)
                    cpu[label] += cpu_seconds(pids[label]) - before
                    now = resource.getrusage(resource.RUSAGE_CHILDREN)
                    client_cpu[label] += now.ru_utime + now.ru_stime - reaped.ru_utime - reaped.ru_stime
                    got[label] = mbps
                    par[label].append(mbps)
                    failures[label] += failed
                ratios.append(got["ours"] / got["nginx"])
            gib = args.rounds * args.parallel * size / 2**30
            print(f"{args.parallel} clients at once, {args.size_mib} MiB each, {args.rounds} rounds (aggregate MB/s):")
            for label, runs in par.items():
                print(f"  {label:6} median {statistics.median(runs):8.0f}   runs " + " ".join(f"{v:.0f}" for v in runs)
                      + f"   failed downloads {failures[label]}"
                      + f"   CPU s/GiB: server {cpu[label] / gib:.2f}, clients {client_cpu[label] / gib:.2f}")
            print(f"  ours / nginx per round: " + " ".join(f"{v:.2f}" for v in ratios)
                  + f"   median {statistics.median(ratios):.2f}")

            tftp_runs, http_runs = [], []
            for _ in range(max(1, min(args.rounds, 3))):
                tftp_runs.append(one(curl_tftp, tftp_port, size))
                http_runs.append(one(curl_http, ours_port, size))
            t, h = statistics.median(tftp_runs), statistics.median(http_runs)
            print(f"our TFTP (curl, blksize 1468) and our HTTP, one client, {args.size_mib} MiB (MB/s):")
            print(f"  tftp {t:8.1f}   http {h:8.0f}   http / tftp: {h / t:.1f}")
            print(f"nginx worker_processes {args.nginx_workers}; {os.cpu_count()} cores shared with the clients "
                  f"(and with whatever else runs here: figures from a shared machine are noisy)")
        finally:
            for proc in started:
                stop(proc)


if __name__ == "__main__":
    main()
