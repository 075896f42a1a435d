"""The dashboard's and /metrics' response times with a fleet of PCs, on loopback.

    .venv/bin/python bench/web.py [--pcs 200] [--rounds 10]

Starts a controller (alone, events at warning level) with its web server on a free loopback port, files the
synthetic events of `--pcs` booted PCs (tests/web/web_support.py: DHCP, TFTP, two logins, first READ, two
io_stats each) through the events socket as services would, then times `--rounds` GETs of each page and of
/metrics (urllib, one at a time). Prints the body size and the median and worst time per path. Each GET is a
few control-socket requests to the controller plus the rendering, so this is what a browser or a Prometheus
scrape costs the controller process.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this folder's http.py (a benchmark) would shadow the standard library's http package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "web")]

from support import Procs, wait_for  # noqa: E402
from web_support import WebStack, booted_pc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pcs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-web-"))
    procs = Procs()
    try:
        stack = WebStack(procs, tmp, {"logging": {"level": "warning"}})
        t0 = time.time() - 30
        for i in range(args.pcs):
            mac = f"52:54:00:00:{i // 256:02x}:{i % 256:02x}"
            stack.feeder.events(booted_pc(mac=mac, ip=f"10.77.{i // 250}.{i % 250 + 1}", t0=t0))
        wait_for(lambda: len(stack.cli_json("clients")["clients"]) >= args.pcs, timeout=120, what=f"{args.pcs} PCs filed")
        print(f"{args.pcs} PCs, {args.rounds} GETs per path")
        for path in ("/", "/metrics", "/pc/52:54:00:00:00:05", "/services", "/events"):
            times, size = [], 0
            for _ in range(args.rounds):
                start = time.perf_counter()
                with urllib.request.urlopen(stack.url + path, timeout=60) as r:
                    size = len(r.read())
                times.append((time.perf_counter() - start) * 1000)
            print(f"GET {path:24} {size:8d} bytes  median {statistics.median(times):6.1f} ms  worst {max(times):6.1f} ms")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
