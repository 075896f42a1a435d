"""A probe, not the product (issue 13): the boot storm of bench/boot_storm.py against our target as it is (a
thread per connection), our target with every connection on ONE epoll loop thread (this file's `--serve`
mode: io_loop.Server's connections replaced by `LoopRunner`s, the sans-IO Connection unchanged), and tgtd
serving the raw image read-only. Its question: how much of the storm is the threads' cost.

    .venv/bin/python bench/storm_event_loop.py [--pcs 20] [--rounds 5]

Per round and server: wall time of the storm, the server's CPU (user, system, from /proc/PID/stat) and the
ratios to tgtd within the round. What the loop leaves out, so it cannot be the default as it is: scaled
processes (the Router's first-PDU routing and hand-over), and anything that blocks stalls every connection
of the loop: a durable overlay's fsync at SYNCHRONIZE CACHE or FUA, a page fault on a cold base image, a PC
login that waits for its dead sessions (pc_disks.PcDisk._end_dead: those end in this same thread).
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------- the loop
class LoopRunner:
    """One connection driven by the loop: non-blocking socket, the receive buffer, the output not yet sent.
    It offers what the service asks of a connection's handle: abort, request_logout, update_settings."""

    def __init__(self, loop, server, sock, peer, local):
        from services.iscsi_target import io_loop
        from services.iscsi_target.connection import Connection

        self.loop, self.server, self.sock, self.peer_ip = loop, server, sock, peer[0]
        self.iov_max = io_loop.IOV_MAX
        self.lock = threading.RLock()  # the loop thread, and the service's thread asking for a logout
        self.aborted = ""
        cfg = server.settings
        self.conn = Connection(server.registry, server.sessions, peer_ip=peer[0], portal=(local[0], local[1]),
                               now=time.monotonic(), nop_interval=cfg.get("nop_interval", 30.0),
                               nop_timeout=cfg.get("nop_timeout", 15.0), cmd_window=cfg.get("cmd_window", 32),
                               handle=self)
        self.buf = bytearray(io_loop.RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.pending: list = []
        self.closed = False

    def abort(self, reason: str) -> None:
        self.aborted = reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the loop sees the end and closes
        except OSError:
            pass

    def request_logout(self, grace: float) -> None:
        with self.lock:
            self.conn.request_logout(time.monotonic(), grace)
            self.flush()

    def update_settings(self, settings: dict) -> None:
        with self.lock:
            self.conn.nop_interval = settings.get("nop_interval", 30.0)
            self.conn.nop_timeout = settings.get("nop_timeout", 15.0)

    def flush(self) -> None:
        out = self.conn.take_output()
        if out:
            self.pending += out
        while self.pending:
            try:
                sent = self.sock.sendmsg(self.pending[: self.iov_max])
            except BlockingIOError:
                self.loop.want_write(self, True)
                break
            except OSError as exc:
                self.conn.connection_lost(f"send failed: {exc.strerror or exc}")
                self.pending = []
                break
            i, pending = 0, self.pending
            while i < len(pending) and sent >= len(pending[i]):
                sent -= len(pending[i])
                i += 1
            rest = pending[i:]
            if sent and rest:
                rest[0] = memoryview(rest[0])[sent:]
            self.pending = rest
        else:
            self.loop.want_write(self, False)
        for event in self.conn.take_events():
            self.server.on_event(event)

    def ready(self, mask: int, now: float) -> None:
        with self.lock:
            if mask & selectors.EVENT_WRITE and self.pending:
                self.flush()
            if self.pending:
                return  # the initiator reads slowly: no more input until our output is out
            try:
                n = self.sock.recv_into(self.view[self.end:])
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(f"receive failed: {exc.strerror or exc}")
                return
            if n == 0:
                self.close(self.aborted or "connection closed by the initiator")
                return
            self.end += n
            self.start += self.conn.receive(self.view[self.start:self.end], now)
            if self.start == self.end:
                self.start = self.end = 0
            elif self.end == len(self.buf):  # compact (the probe's PDUs are far below the 1 MiB buffer)
                self.buf[: self.end - self.start] = self.buf[self.start:self.end]
                self.end -= self.start
                self.start = 0
            self.flush()
            if self.conn.closing:
                self.close(self.conn.close_reason)

    def timer(self, now: float) -> None:
        with self.lock:
            self.conn.timer(now)
            self.flush()
            if self.conn.closing:
                self.close(self.conn.close_reason)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with self.lock:
            self.conn.connection_lost(self.aborted or reason)
            self.conn.take_output()
            for event in self.conn.take_events():
                self.server.on_event(event)
        self.loop.remove(self)
        try:
            self.sock.close()
        except OSError:
            pass


class Loop:
    """One thread, one epoll: every connection's readiness; timers once a second."""

    def __init__(self):
        self.sel = selectors.EpollSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.new: list = []
        self.lock = threading.Lock()
        self.runners: set = set()
        threading.Thread(target=self.run, daemon=True, name="iscsi-loop").start()

    def add(self, runner: LoopRunner) -> None:
        with self.lock:
            self.new.append(runner)
        os.write(self.wake_w, b"x")

    def want_write(self, runner: LoopRunner, on: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        if self.sel.get_key(runner.sock).events != events:
            self.sel.modify(runner.sock, events, runner)

    def remove(self, runner: LoopRunner) -> None:
        try:
            self.sel.unregister(runner.sock)
        except (KeyError, ValueError):
            pass
        self.runners.discard(runner)
        runner.server.forget(runner)

    def run(self) -> None:
        last = time.monotonic()
        while True:
            for key, mask in self.sel.select(1.0):
                if key.data is None:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    with self.lock:
                        new, self.new = self.new, []
                    for runner in new:
                        self.sel.register(runner.sock, selectors.EVENT_READ, runner)
                        self.runners.add(runner)
                    continue
                key.data.ready(mask, time.monotonic())
            now = time.monotonic()
            if now - last >= 1.0:
                last = now
                for runner in list(self.runners):
                    runner.timer(now)


def serve(argv: list[str]) -> None:
    """Our target (python -m services.iscsi_target's main) with its connections on one Loop."""
    from services.iscsi_target import io_loop
    from services.iscsi_target.service import IscsiTargetService
    from shared.service import main

    loop: list = []

    def start_connection(self, sock, peer, prefix=b"", handed=False, hops=0):
        if not loop:
            loop.append(Loop())
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        runner = LoopRunner(loop[0], self, sock, peer, sock.getsockname())
        with self._lock:
            self.runners.add(runner)
            self.accepted += 1
        loop[0].add(runner)

    io_loop.Server._start_connection = start_connection
    main(IscsiTargetService, argv)


# ---------------------------------------------------------------------------------------------- the storm
def cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(f[11]) / tick, int(f[12]) / tick


def storm_main() -> None:
    from bench import boot_storm as bs
    from bench.iscsi import free_port, need, stop, wait_port
    from shared.images.store import ImageStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--pcs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    need("qemu-io"), need("tgtd"), need("tgtadm")
    n = args.pcs
    tmp = Path(tempfile.mkdtemp(prefix="bootfleet-storm-loop-"))
    procs: list = []
    try:
        store = ImageStore.for_state_dir(tmp)
        raw = tmp / "golden.raw"
        raw.write_bytes(os.urandom(bs.IMAGE_SIZE))
        store.import_file("win10", raw)
        threads_port, loop_port, tgt_port = free_port(), free_port(), free_port()
        servers: dict[str, int] = {}
        variants: dict[str, list] = {}
        (ours,) = bs.start_ours(tmp, threads_port, n)
        procs.append(ours)
        servers["ours (threads)"] = ours.pid
        variants["ours (threads)"] = [(bs.ours_url(threads_port, i), (bs.ours_url(threads_port, i), bs.WRITE_AT))
                                      for i in range(n)]
        looped = tmp / "loop"
        looped.mkdir()
        (looped / "images").symlink_to(tmp / "images")  # the same store; its own owner state
        clients = "\n".join(f"  - {{mac: '52:54:00:00:01:{k:02x}', name: {bs.pc(k)}, image: win10}}" for k in range(n))
        cfg = looped / "loop.yaml"
        cfg.write_text(f"version: 1\nlogging: {{level: warning}}\niscsi:\n  portals: [{{ip: 127.0.0.1, port: {loop_port}}}]\n"
                       f"  io_stats_interval: 0\nimages: [{{name: win10}}]\nclients:\n{clients}\n")
        loop_proc = subprocess.Popen([sys.executable, __file__, "--serve", "--config", str(cfg), "--state-dir",
                                      str(looped), "--instance", "0"], cwd=ROOT)
        procs.append(loop_proc)
        wait_port(loop_port, loop_proc, "our target on one loop")
        servers["ours (one loop)"] = loop_proc.pid
        variants["ours (one loop)"] = [(bs.ours_url(loop_port, i), (bs.ours_url(loop_port, i), bs.WRITE_AT))
                                       for i in range(n)]
        scratch = []
        for i in range(n):
            s = tmp / f"scratch-{i:02d}.raw"
            s.write_bytes(bytes(2 * bs.MB))
            scratch.append(s)
        tgtd = bs.Tgtd(tmp, tgt_port)
        procs.append(tgtd.proc)
        servers["tgtd shared read-only"] = tgtd.proc.pid
        urls = []
        for i in range(n):
            name = tgtd.target(i + 1, [(raw, True), (scratch[i], False)])
            urls.append((f"iscsi://127.0.0.1:{tgt_port}/{name}/1", (f"iscsi://127.0.0.1:{tgt_port}/{name}/2", 0)))
        variants["tgtd shared read-only"] = urls
        version = store.version_path("win10", 1)
        print(f"boot storm, {n} PCs, warm page cache, {args.rounds} rounds; ratios = tgtd's time / ours, within "
              f"each round")
        ratios: dict[str, list] = {"ours (threads)": [], "ours (one loop)": []}
        for r in range(args.rounds):
            times, line = {}, []
            for label, variant in variants.items():
                for k in range(n):
                    deadline = time.monotonic() + 10
                    while store.overlay_in_use("win10", bs.pc(k)) and time.monotonic() < deadline:
                        time.sleep(0.02)
                    store.overlay_reset("win10", bs.pc(k))
                bs.warm(version), bs.warm(raw)
                u0, s0 = cpu(servers[label])
                times[label] = bs.storm(variant)
                u1, s1 = cpu(servers[label])
                line.append(f"{label} {times[label]:.2f} s (server CPU {u1 - u0 + s1 - s0:.2f} s: user {u1 - u0:.2f}, "
                            f"system {s1 - s0:.2f})")
            for label in ratios:
                ratios[label].append(times["tgtd shared read-only"] / times[label])
            print(f"  round {r + 1} (load {os.getloadavg()[0]:.1f}): " + "; ".join(line) + "; " +
                  ", ".join(f"{label} {rs[-1]:.2f}x" for label, rs in ratios.items()), flush=True)
        for label, rs in ratios.items():
            print(f"{label}: {bs.median(rs):.2f}x tgtd's speed (median of rounds; {min(rs):.2f}-{max(rs):.2f}x)")
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2:])
    else:
        storm_main()
