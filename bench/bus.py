"""Bus benchmark: revision propagation latency to N service processes, and events/s into the controller.

Run: .venv/bin/python bench/bus.py [--processes 1 4 8] [--revisions 40]
There is no reference implementation to run beside it; the figures are absolute (noisy machine: compare
runs made together). Latency is from sending `config-set` to the controller (which validates, fsyncs and
publishes) until a service process has applied the revision.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import yaml
import zmq

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PROBE = ROOT / "tests" / "bus" / "probe_service.py"


def call(sock, command, **arguments):
    sock.send(msgpack.packb({"command": command, "arguments": arguments}))
    return msgpack.unpackb(sock.recv())


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run(n_procs: int, revisions: int, flood: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        cfg = state / "c.yaml"
        cfg.write_text(yaml.safe_dump({"bus": {"heartbeat_interval": 0.5}}))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen([PY, "-m", "services.controller", "--config", str(cfg), "--state-dir", str(state)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)]
        try:
            ctx = zmq.Context.instance()
            sock = ctx.socket(zmq.REQ)
            sock.connect(f"ipc://{state}/bus/control.sock")
            call(sock, "version-get")
            for i in range(n_procs):
                procs.append(subprocess.Popen([PY, str(PROBE), "--state-dir", str(state), "--instance", str(i)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL))
            files = [state / f"probe-{i}.applied" for i in range(n_procs)]
            deadline = time.time() + 30
            while not all(f.exists() for f in files) and time.time() < deadline:
                time.sleep(0.05)
            latencies = []
            for r in range(revisions):
                lun = r + 1
                t0 = time.time()
                call(sock, "config-set", path="boot.default_lun", value=lun)
                seen = {}
                deadline = time.time() + 10
                while len(seen) < n_procs and time.time() < deadline:
                    for i, f in enumerate(files):
                        if i in seen:
                            continue
                        for line in f.read_text().splitlines():
                            v, ts = line.split()
                            if int(v) == lun:
                                seen[i] = float(ts) - t0
                    time.sleep(0.001)
                latencies += list(seen.values())
            # events/s: one more probe floods, the controller stores what arrives
            before = call(sock, "status-get")[ "arguments"]["controller"]["events_received"]
            fenv = {**env, "PROBE_FLOOD": str(flood)}
            procs.append(subprocess.Popen([PY, str(PROBE), "--state-dir", str(state), "--instance", "99"], cwd=ROOT, env=fenv, stderr=subprocess.DEVNULL))
            t0 = time.time()
            last, first_change, last_change = before, None, None
            while time.time() - t0 < 60:
                time.sleep(0.02)
                count = call(sock, "status-get")["arguments"]["controller"]["events_received"]
                now = time.time()
                if count != last:
                    first_change = first_change or now
                    last, last_change = count, now
                elif last_change and now - last_change > 1.0:
                    break
            received = last - before
            elapsed = (last_change - first_change) if first_change and last_change else 0
            return {
                "procs": n_procs,
                "p50_ms": percentile(latencies, 50) * 1000,
                "p99_ms": percentile(latencies, 99) * 1000,
                "samples": len(latencies),
                "events_per_s": received / elapsed if elapsed else 0,
                "events_received": received,
            }
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--revisions", type=int, default=40)
    ap.add_argument("--flood", type=int, default=20000)
    args = ap.parse_args()
    print(f"{'procs':>5} {'p50 ms':>8} {'p99 ms':>8} {'samples':>8} {'events/s':>10}")
    for n in args.processes:
        r = run(n, args.revisions, args.flood)
        print(f"{r['procs']:>5} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['samples']:>8} {r['events_per_s']:>10.0f}")


if __name__ == "__main__":
    main()
