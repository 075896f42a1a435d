"""PCs on images through real initiators (issue 13): libiscsi's iscsi-test-cu against a PC's overlay LUN
served by a per-PC target from the configuration, and qemu-io writing and flushing into a persistent
overlay while the target process is killed with SIGKILL and started again: every flushed write is there.

The target runs standalone (`python -m services.iscsi_target --config`) over an image store the test fills
with ImageStore. iscsi-test-cu and qemu-io are required (deploy/system-deps.sh): a missing one fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import support
from shared.images.store import ImageStore
from tests.iscsi.target_process import start_target, stop_process

pytestmark = pytest.mark.integration

MB = 1 << 20
TARGET = "iqn.2026-12.org.bootfleet:win10.pc1"
INITIATOR = "iqn.2026-12.org.bootfleet:pc.pc1"



class PcTarget:
    """A target process serving one PC on image win10 (mode given), from a store under `tmp`."""

    def __init__(self, tmp: Path, mode: str, ip: str | None = None, size: int = 64 * MB):
        self.tmp, self.port = tmp, support.free_port()
        store = ImageStore.for_state_dir(tmp)
        base = tmp / "base.raw"
        with open(base, "wb") as f:  # 16 MiB of data, the rest a hole
            f.write(os.urandom(16 * MB))
            f.truncate(size)
        store.import_file("win10", base)
        client = f"{{mac: '52:54:00:00:00:01', name: pc1, image: win10, mode: {mode}" + (f", ip: {ip}}}" if ip else "}")
        self.cfg = tmp / "bootfleet.yaml"
        self.cfg.write_text(f"""version: 1
iscsi:
  portals: [{{ip: 127.0.0.1, port: {self.port}}}]
  io_stats_interval: 0
images: [{{name: win10}}]
clients: [{client}]
""")
        self.log = tmp / "target.log"
        self.proc = None

    def start(self):
        with open(self.log, "ab") as logf:
            self.proc = start_target(self.cfg, self.tmp, logf, self.port)

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)  # by PID: only the process this test started
        self.proc.wait(10)

    def stop(self):
        stop_process(self.proc, 12)

    def url(self):
        return f"iscsi://127.0.0.1:{self.port}/{TARGET}/0"

    def image_opts(self):
        return (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{self.port},target={TARGET},lun=0,"
                f"initiator-name={INITIATOR}")


@pytest.fixture
def pc_target(tmp_path):
    made = []

    def make(mode, ip=None):
        t = PcTarget(tmp_path, mode, ip)
        made.append(t)
        t.start()
        return t

    yield make
    for t in made:
        t.stop()


def test_iscsi_test_cu_against_a_pc_overlay_lun(pc_target):
    # clients[].ip admits the suite's second initiator name too (its multi-initiator tests)
    t = pc_target("persistent", ip="127.0.0.1")
    url = t.url()
    r = subprocess.run([support.tool("iscsi-test-cu"), "--dataloss", "--test=ALL", "-i", INITIATOR, url, url],
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    summary = re.search(r"Run Summary:.*?(?:Elapsed time.*?\n|\Z)", out, re.S)
    text = summary.group(0) if summary else out[-3000:]
    print("\niscsi-test-cu against a PC overlay LUN:\n" + text)
    tests = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text)
    asserts = re.search(r"asserts\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text)
    assert tests, out[-3000:]
    if int(tests.group(4)):
        print("failures:", re.findall(r"Test: (\S+) \.\.\.\s*FAILED", out)[:50])
    assert int(tests.group(3)) > 100  # the suites ran (Read, Write, WriteSame, Unmap, CompareAndWrite, ...)
    assert int(tests.group(4)) == 0, text
    assert asserts and int(asserts.group(4)) == 0
    assert "Traceback" not in t.log.read_text()


def test_kill_9_under_write_and_flush_keeps_every_flushed_write(pc_target):
    t = pc_target("persistent")
    total, confirmed, done = 160, [0], threading.Event()
    qio = subprocess.Popen(["stdbuf", "-oL", support.tool("qemu-io"), "--image-opts", t.image_opts()],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []

    def load():
        # write i then flush; write i+1's answer proves flush i completed (qemu-io runs commands in order)
        try:
            for i in range(total):
                qio.stdin.write(f"write -P {i % 250 + 1} {i * 64}k 64k\nflush\n")
                qio.stdin.flush()
                while True:
                    line = qio.stdout.readline()
                    if not line:
                        return
                    lines.append(line)
                    if "wrote 65536/65536" in line:
                        confirmed[0] = i  # flushes 0..i-1 are done
                        break
            qio.stdin.write("flush\n")
            qio.stdin.close()
            qio.wait(60)
            confirmed[0] = total
        except (BrokenPipeError, OSError):
            pass
        finally:
            done.set()

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        support.wait_for(lambda: confirmed[0] >= 40, 60, what="40 flushed writes")
        t.kill9()  # in the middle of the load
        at_kill = confirmed[0]
        t.start()
        done.wait(120)  # libiscsi reconnects to the new process and the load goes on
    finally:
        if qio.poll() is None:
            qio.kill()  # by its PID (Popen): only what this test started
        qio.wait(10)
    assert at_kill >= 40
    flushed = confirmed[0]
    print(f"\n{at_kill} writes flushed before kill -9, {flushed} of {total} when the load ended")
    checks = []
    for i in range(flushed):
        checks += ["-c", f"read -P {i % 250 + 1} {i * 64}k 64k"]
    r = subprocess.run([support.tool("qemu-io"), "-r", "--image-opts", t.image_opts(), *checks],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    assert r.stdout.count("read 65536/65536") == flushed


def test_two_processes_one_owner_per_pc_and_a_new_owner_after_kill_9(tmp_path):
    """scale.iscsi_target 2: every PC's disk is opened by one process only (its target's owner), whichever
    process the kernel hands the connection to; the owner killed with SIGKILL, the other serves the PC's
    persistent overlay with every flushed write."""
    t = PcTarget(tmp_path, "persistent")
    pcs = [f"p{n}" for n in range(4)]
    clients = ", ".join(f"{{mac: '52:54:00:00:02:0{n}', name: {p}, image: win10, mode: persistent}}"
                        for n, p in enumerate(pcs))
    text = t.cfg.read_text().replace("version: 1\n", "version: 1\nscale: {iscsi_target: 2}\n")
    t.cfg.write_text(re.sub(r"clients: \[.*\]", f"clients: [{clients}]", text))
    procs, logs = {}, {i: tmp_path / f"target-{i}.log" for i in (0, 1)}

    def start(i):
        with open(logs[i], "ab") as logf:
            procs[i] = subprocess.Popen([sys.executable, "-m", "services.iscsi_target", "--config", str(t.cfg),
                                         "--state-dir", str(tmp_path), "--instance", str(i)], cwd=support.ROOT,
                                        stdout=logf, stderr=subprocess.STDOUT)
        support.wait_for(lambda: "listening on" in logs[i].read_text(), 15, what=f"instance {i} listening")

    def opts(p):
        return (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{t.port},target=iqn.2026-12.org.bootfleet:win10.{p},"
                f"lun=0,initiator-name=iqn.2026-12.org.bootfleet:pc.{p}")

    def qio(p, *cmds):
        args = [support.tool("qemu-io"), "--image-opts", opts(p)]
        for c in cmds:
            args += ["-c", c]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr, r.stdout + r.stderr
        return r

    def openers(p):
        return [i for i in (0, 1) if f"PC {p}: disk open" in logs[i].read_text()]

    try:
        start(0)
        start(1)
        for n, p in enumerate(pcs):
            for _ in range(3):  # three sessions each: the kernel spreads connections over both processes
                qio(p, f"write -P {n + 1} 0 64k", "flush")
            qio(p, f"read -P {n + 1} 0 64k")
            assert len(openers(p)) == 1, (p, openers(p))
        assert {openers(p)[0] for p in pcs} == {0, 1}  # the PCs' owners are spread over both (owners.hrw_order)
        owner = openers(pcs[0])[0]
        os.kill(procs[owner].pid, signal.SIGKILL)  # by PID: a process this test started
        procs[owner].wait(10)
        qio(pcs[0], "read -P 1 0 64k")  # the other process owns it now and finds every flushed write
        assert f"PC {pcs[0]}: disk open" in logs[1 - owner].read_text()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(12)
