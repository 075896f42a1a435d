"""DHCP benchmark: perfdhcp against Kea (memfile) and Bootfleet's DHCP, side by side in one run.

Two network namespaces joined by a veth pair: the server's (10.64.0.2/16) and perfdhcp's (10.64.0.1/16).
perfdhcp speaks only as a relay (giaddr = 10.64.0.1), so both servers serve a relayed /16 with a pool of
~65,000 addresses. For each server, in the same run:
- storm: `perfdhcp --scenario avalanche -R 100`: 100 clients at once; time to provision all, retransmissions;
- ladder: 4-way exchanges at rising rates (3 s each) with 60,000 simulated clients; the sustained rate is the
  highest one completed with < 1 % loss; CPU per exchange (server process) and p50/p99 latency at that rate.
Ours runs with leases durable before the ACK (SQLite WAL, group commit); Kea's memfile does not fsync.

Run as root: `.venv/bin/python bench/dhcp.py` (bounded < 3 min). Prints ours, Kea's and ours/Kea.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATES = (2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000)
STEP_SECONDS = 3
CLIENTS = 60000
SERVER_IP, CLIENT_IP = "10.64.0.2", "10.64.0.1"
TICK = os.sysconf("SC_CLK_TCK")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


class Netns:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.srv, self.cli = f"bf-dbs-{tag}", f"bf-dbc-{tag}"
        self.srv_if, self.cli_if = f"bfs{tag}", f"bfc{tag}"

    def __enter__(self) -> "Netns":
        sh("ip", "netns", "add", self.srv)
        sh("ip", "netns", "add", self.cli)
        sh("ip", "link", "add", self.srv_if, "netns", self.srv, "type", "veth", "peer", "name", self.cli_if, "netns", self.cli)
        for ns, ifname, addr in ((self.srv, self.srv_if, SERVER_IP), (self.cli, self.cli_if, CLIENT_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", ifname)
            sh("ip", "-n", ns, "link", "set", ifname, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        sh("ip", "netns", "del", self.srv, check=False)
        sh("ip", "netns", "del", self.cli, check=False)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def perfdhcp(ns: Netns, *args: str, timeout: float = 30) -> str:
    cmd = ["ip", "netns", "exec", ns.cli, "perfdhcp", "-4", "-g", "single", "-l", CLIENT_IP, *args, SERVER_IP]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout


def parse_run(out: str) -> dict:
    rate = re.search(r"Rate: ([\d.]+) 4-way", out)
    sent = [int(x) for x in re.findall(r"sent packets: (\d+)", out)]
    recv = [int(x) for x in re.findall(r"received packets: (\d+)", out)]
    delays = []
    for s, r in re.findall(r"sent / received: ([\d.]+) / ([\d.]+)", out):
        delays.append((float(r) - float(s)) * 1000)
    delays.sort()
    loss = 1 - (recv[1] / sent[0]) if sent and sent[0] and len(recv) > 1 else 1.0
    return {
        "rate": float(rate.group(1)) if rate else 0.0,
        "exchanges": recv[1] if len(recv) > 1 else 0,
        "loss": max(0.0, loss),
        "p50": delays[len(delays) // 2] if delays else float("nan"),
        "p99": delays[int(len(delays) * 0.99)] if delays else float("nan"),
    }


def storm(ns: Netns) -> dict:
    out = perfdhcp(ns, "--scenario", "avalanche", "-R", "100", timeout=30)
    took = re.search(r"It took (\d+):(\d+):([\d.]+) to provision (\d+) clients", out)
    resent = re.search(r"Requests resent: (\d+)", out)
    seconds = int(took.group(1)) * 3600 + int(took.group(2)) * 60 + float(took.group(3)) if took else float("nan")
    return {"seconds": seconds, "clients": int(took.group(4)) if took else 0, "resent": int(resent.group(1)) if resent else -1}


def ladder(ns: Netns, pid: int) -> dict:
    best = None
    for rate in RATES:
        c0 = cpu_seconds(pid)
        res = parse_run(perfdhcp(ns, "-r", str(rate), "-R", str(CLIENTS), "-p", str(STEP_SECONDS), "-x", "t", timeout=STEP_SECONDS + 20))
        res["cpu_ms_per_exchange"] = (cpu_seconds(pid) - c0) * 1000 / max(1, res["exchanges"])
        res["target"] = rate
        ok = res["loss"] < 0.01 and res["rate"] >= rate * 0.97
        print(f"    {rate:>6}/s: achieved {res['rate']:8.0f}/s loss {res['loss'] * 100:5.2f} % p50 {res['p50']:6.2f} ms "
              f"p99 {res['p99']:6.2f} ms cpu {res['cpu_ms_per_exchange']:.3f} ms/exchange", flush=True)
        if not ok:
            break
        best = res
    return best or {"rate": 0.0, "loss": 1.0, "p50": float("nan"), "p99": float("nan"), "cpu_ms_per_exchange": float("nan")}


def wait_ready(ns: Netns, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if "received packets: 1" in perfdhcp(ns, "-n", "1", "-R", "1", "-d", "0.5", timeout=10):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer within 15 s")


def run_server(ns: Netns, name: str, cmd: list[str], env: dict, log: Path) -> dict:
    print(f"== {name}", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", ns.srv, *cmd], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT)
    try:
        wait_ready(ns, proc, name)
        st = storm(ns)
        print(f"    storm: {st['clients']} clients in {st['seconds']:.3f} s, {st['resent']} resent", flush=True)
        best = ladder(ns, proc.pid)
        return {"storm": st, "sustained": best}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    for tool in ("perfdhcp", "kea-dhcp4", "ip"):
        if not shutil.which(tool):
            print(f"bench/dhcp.py: {tool} is not installed (deploy/system-deps.sh)", file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="bf-dhcp-bench-"))
    started = time.monotonic()
    try:
        with Netns() as ns:
            kea_conf = {"Dhcp4": {
                "interfaces-config": {"interfaces": [ns.srv_if], "dhcp-socket-type": "udp"},
                "lease-database": {"type": "memfile", "persist": True, "name": str(tmp / "kea-leases.csv"), "lfc-interval": 0},
                "valid-lifetime": 3600,
                "subnet4": [{"id": 1, "subnet": "10.64.0.0/16", "pools": [{"pool": "10.64.1.0 - 10.64.255.250"}]}],
                "loggers": [{"name": "kea-dhcp4", "severity": "WARN", "output_options": [{"output": str(tmp / "kea.log")}]}],
            }}
            (tmp / "kea.json").write_text(json.dumps(kea_conf))
            (tmp / "ours.yaml").write_text(
                "logging: {level: warning}\n"
                "dhcp:\n"
                f"  interfaces: [{{name: {ns.srv_if}}}]\n"
                f"  lease_file: {tmp / 'leases.sqlite'}\n"
                "  scopes:\n"
                "    - {name: bench, subnet: 10.64.0.0/16, lease_time: 3600, ranges: [{start: 10.64.1.0, end: 10.64.255.250}]}\n"
            )
            kea = run_server(ns, "Kea 2.x kea-dhcp4 (memfile)", ["kea-dhcp4", "-c", str(tmp / "kea.json")],
                             {"KEA_LOCKFILE_DIR": str(tmp), "KEA_PIDFILE_DIR": str(tmp)}, tmp / "kea.out")
            ours = run_server(ns, "Bootfleet dhcp (SQLite WAL, durable before ACK)",
                              [sys.executable, "-m", "services.dhcp", "--config", str(tmp / "ours.yaml"), "--state-dir", str(tmp)],
                              {"PYTHONPATH": str(ROOT)}, tmp / "ours.log")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b and b == b and a == a else "n/a"

    k, o = kea["sustained"], ours["sustained"]
    print()
    print(f"{'':34}{'ours':>12}{'Kea':>12}{'ours/Kea':>10}")
    print(f"{'sustained 4-way exchanges/s <1%':34}{o['rate']:12.0f}{k['rate']:12.0f}{ratio(o['rate'], k['rate']):>10}")
    print(f"{'CPU ms per exchange':34}{o['cpu_ms_per_exchange']:12.3f}{k['cpu_ms_per_exchange']:12.3f}"
          f"{ratio(o['cpu_ms_per_exchange'], k['cpu_ms_per_exchange']):>10}")
    print(f"{'p50 latency ms at sustained rate':34}{o['p50']:12.2f}{k['p50']:12.2f}{ratio(o['p50'], k['p50']):>10}")
    print(f"{'p99 latency ms at sustained rate':34}{o['p99']:12.2f}{k['p99']:12.2f}{ratio(o['p99'], k['p99']):>10}")
    print(f"{'100-client storm seconds':34}{ours['storm']['seconds']:12.3f}{kea['storm']['seconds']:12.3f}"
          f"{ratio(ours['storm']['seconds'], kea['storm']['seconds']):>10}")
    print(f"{'storm retransmissions':34}{ours['storm']['resent']:12d}{kea['storm']['resent']:12d}")
    print(f"(bench took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
