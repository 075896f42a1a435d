"""A boot storm from one golden image (issue 13): 20 PCs at once, ours against tgtd; then an overlay LUN
against a plain file LUN of ours, both through the real target.

    .venv/bin/python bench/boot_storm.py [--pcs 20] [--rounds 7]

Boot storm. Each of `--pcs` initiators (one `qemu-io` process each, all started together, as PCs powered on
at once) reads the same 13 MiB of the image as 64 KiB READs at queue depth 1 (what a boot reads is the same
on every PC) and then writes 1 MiB of its own at queue depth 1, one command at a time. The time is the wall clock from
the first start to the last exit. Three servers, rounds interleaved:
- ours: one image version, each PC its own target (pc_target_iqn) and discard overlay; the writes go
  to the overlays;
- tgtd, shared: the same raw image as LUN 1 of every PC's target, read-only (the best tgtd can do: it has
  no overlays), plus a 2 MiB scratch file per PC as LUN 2 that takes its 1 MiB;
- tgtd, copies: every PC its own full copy of the image (the lab's way today), writes into it;
- ours, copies: our target serving those copies as plain file LUNs (what the overlays cost in the storm).
Before the measured rounds each server serves one storm that is not counted (its first logins, first
mappings and first page faults: a server that has booted a room before, as every server has); within a round
the servers take turns in one order, then in the reverse order in the next round, so that none always
follows the same one. Speed ratio = tgtd's time / ours (goal: ours >= 1.2x), taken within each round (the
same minute of a shared machine) and as the ratio of the medians; "ours" is the defaults a user gets
(`scale.iscsi_target: auto`: one target process per usable core, 2 on these machines), "ours, scale 1" one
process beside it. Then the page-cache check: `fincore` of the
version file (cached bytes against its size: one copy for all PCs), the overlays' allocated bytes, and the
cached bytes of tgtd's 20 copies.

Overlay against a plain file LUN (ours with its defaults, one initiator, a 256 MiB disk): 32000 4 KiB
writes at queue depth 32 into untouched granules of a fresh overlay (qemu-img bench -w -d 32 -s 4k, step
1028 KiB: every write a granule not written before, scattered over the disk) against the same writes into a
plain file LUN with the same content; 4 KiB reads at queue depth 1 of untouched granules against the plain
LUN. Goals: >= 0.8x and >= 0.9x. The machine is shared (2 cores, other jobs): figures move from run to run;
medians of rounds.

Before each storm and each qemu-img run the bench calls sync(2): the kernel's write-back of the run before
(its overlays' or copies' new pages) would otherwise land in whichever run comes next (a bare 4 KiB
pwrite took 15 us instead of 4 us while 500 MiB were being written back).

Each storm also prints the CPU time the hypervisor took from this VM meanwhile (/proc/stat "steal", both
cores; 0 on a machine of its own): this VM's speed moves by up to 2x over minutes with its host's load. A
round in which one storm lost more than STEAL_LIMIT (0.05 s, 5% of what a storm uses) is printed, not
counted, and run again (at most as many extra rounds as asked for), whichever server it disturbed. Each
storm also prints the server's CPU time (its process's utime + stime over the storm, from /proc): on 2 cores
the 20 initiators and the server share the CPU, so the wall clock follows the sum of both, and the server's
CPU is the part a server can change.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.iscsi import free_port, need, stop, wait_port  # noqa: E402
from shared.config.model import ScaleConfig  # noqa: E402
from shared.images.store import ImageStore  # noqa: E402

MB = 1 << 20
IMAGE_SIZE = 16 * MB       # the golden image: 16 MiB of data (a boot's reads and each PC's writes fit)
READ = 13 * MB             # what every PC reads
WRITE = 1 * MB             # what every PC writes of its own
WRITE_AT = 14 * MB
PREFIX = "iqn.2026-12.org.bootfleet"
TGT_PREFIX = "iqn.2026-12.org.bootfleet.bench"


def pc(n: int) -> str:
    return f"pc{n:02d}"


def ours_url(port: int, n: int) -> str:
    """qemu's json: filename, so the initiator can present the PC's own name (DHCP's option 203)."""
    return "json:" + json.dumps({"driver": "raw", "file": {
        "driver": "iscsi", "transport": "tcp", "portal": f"127.0.0.1:{port}", "target": f"{PREFIX}:win10.{pc(n)}",
        "lun": 0, "initiator-name": f"{PREFIX}:pc.{pc(n)}"}}, separators=(",", ":"))  # no spaces: a qemu-io command


def bench_cmd(url: str, count: int, size: str, offset: int, write: bool = False, depth: int = 1, step: str = "") -> list:
    cmd = [need("qemu-img"), "bench", "-c", str(count), "-d", str(depth), "-s", size, "-o", str(offset)]
    if step:
        cmd += ["-S", step]
    if write:
        cmd.append("-w")
    if not url.startswith("json:"):
        cmd += ["-f", "raw"]
    return cmd + [url]


def storm(urls: list[tuple[str, str]]) -> float:
    """Every PC at once, each one qemu-io process (one session, as a booting PC has): its READs, then its
    WRITEs, one command at a time (queue depth 1). (read url, (write url, write offset)) per PC."""
    started = time.perf_counter()
    procs = []
    for n, (read_url, (write_url, write_at)) in enumerate(urls):
        cmds = []
        for off in range(0, READ, 65536):
            cmds += ["-c", f"read {off} 64k"]
        for off in range(write_at, write_at + WRITE, 65536):
            cmds += ["-c", f"write -P {n + 1} {off} 64k"]
        def opened(url, readonly=False):
            return ["-c", "open " + ("-r " if readonly else "") + ("" if url.startswith("json:") else "-o driver=raw ") + url]
        reads, writes = cmds[:2 * (READ // 65536)], cmds[2 * (READ // 65536):]
        if read_url == write_url:
            args = [need("qemu-io")] + opened(read_url) + reads + writes
        else:  # tgtd's shared read-only LUN, then the PC's scratch LUN for its writes (one process)
            args = [need("qemu-io")] + opened(read_url, True) + reads + ["-c", "close"] + opened(write_url) + writes
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode:
            raise SystemExit(f"a PC's qemu-io failed: {err[-800:]}")
    return time.perf_counter() - started


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes so far (every thread, the ended ones too)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


STEAL_LIMIT = 0.05  # seconds of steal in one storm (of about 1 CPU-second) that make its round not counted


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests while this VM's vCPUs wanted it (/proc/stat "steal"), all
    cores: a storm that lost a tenth of its wall clock this way says so beside its time."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def _q(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def fincore(path: Path) -> int:
    r = subprocess.run([need("fincore"), "--bytes", "--noheadings", "--output", "RES", str(path)],
                       capture_output=True, text=True, timeout=30)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.split() else -1


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(4 * MB):
            pass


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (our own files only: nothing of the host's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd) if os.access(path, os.W_OK) else None
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- servers
def start_ours(tmp: Path, port: int, pcs: int, extra_targets: str = "", scale: int | None = None) -> list:
    """Our target as `scale.iscsi_target` says: None, the default (auto: one process per usable core)."""
    clients = "\n".join(f"  - {{mac: '52:54:00:00:01:{n:02x}', name: {pc(n)}, image: win10}}" for n in range(pcs))
    cfg = tmp / f"ours-{scale or 'default'}.yaml"
    cfg.write_text(f"""version: 1
logging: {{level: warning}}
{"" if scale is None else f"scale: {{iscsi_target: {scale}}}"}
iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
  io_stats_interval: 0
{extra_targets}
images: [{{name: win10}}]
clients:
{clients or "  []"}
""")
    out = []
    processes = ScaleConfig().processes("iscsi_target") if scale is None else scale
    for i in range(processes):  # processes sharing the port: each PC's target served by its owner (owners.py)
        log = open(tmp / f"ours-{scale or 'default'}-{i}.log", "ab")
        out.append(subprocess.Popen([sys.executable, "-m", "services.iscsi_target", "--config", str(cfg),
                                     "--state-dir", str(tmp), "--instance", str(i)], cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT))
    for proc in out:
        wait_port(port, proc, "our target")
    return out


class Tgtd:
    def __init__(self, tmp: Path, port: int):
        self.ctl = str(100 + (os.getpid() + port) % 30000)
        self.env = dict(os.environ, TGT_IPC_SOCKET=str(tmp / f"tgtd-{port}.sock"))  # ours alone, not the host's
        self.log = open(tmp / f"tgtd-{port}.log", "wb")
        self.proc = subprocess.Popen([need("tgtd"), "-f", "-C", self.ctl, "--iscsi", f"portal=127.0.0.1:{port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        wait_port(port, self.proc, "tgtd")

    def adm(self, *args: str) -> None:
        subprocess.run([need("tgtadm"), "-C", self.ctl, "--lld", "iscsi", *args], check=True, capture_output=True,
                       timeout=10, env=self.env)

    def target(self, tid: int, luns: list[tuple[Path, bool]]) -> str:
        name = f"{TGT_PREFIX}:{pc(tid - 1)}"
        self.adm("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", name)
        for lun, (path, readonly) in enumerate(luns, start=1):
            self.adm("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", str(lun), "--backing-store", str(path))
            if readonly:
                self.adm("--mode", "logicalunit", "--op", "update", "--tid", str(tid), "--lun", str(lun),
                         "--params", "readonly=1")
        self.adm("--mode", "target", "--op", "bind", "--tid", str(tid), "--initiator-address", "ALL")
        return name


def median(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pcs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-overlay", action="store_true", help="the boot storm only")
    args = ap.parse_args()
    need("qemu-img"), need("tgtd"), need("tgtadm"), need("fincore")
    # a SIGTERM (a timeout, ^C from a wrapper) still runs the `finally` below: every server we started stops
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="bootfleet-storm-"))
    procs: list = []
    try:
        boot_storm(tmp, args, procs)
        if not args.skip_overlay:
            overlay_vs_plain(tmp, args, procs)
    finally:
        for p in procs:
            stop(p, hard=os.path.basename(p.args[0]) == "tgtd")  # tgtd ignores SIGTERM
        shutil.rmtree(tmp, ignore_errors=True)


def boot_storm(tmp: Path, args, procs: list) -> None:
    n = args.pcs
    store = ImageStore.for_state_dir(tmp)
    raw = tmp / "golden.raw"
    raw.write_bytes(os.urandom(IMAGE_SIZE))
    store.import_file("win10", raw)
    version = store.version_path("win10", 1)
    copies, scratch = [], []
    for i in range(n):
        c = tmp / f"copy-{i:02d}.raw"
        shutil.copyfile(raw, c)  # a full copy, as the lab makes one per PC today
        copies.append(c)
        s = tmp / f"scratch-{i:02d}.raw"
        s.write_bytes(bytes(2 * MB))
        scratch.append(s)
    oport, o1port, sport, cport, fport = free_port(), free_port(), free_port(), free_port(), free_port()
    ours = start_ours(tmp, oport, n)
    (tmp / "s1").mkdir()
    (tmp / "s1/images").symlink_to(tmp / "images")  # the same store; owner locks of its own (runs take turns)
    ours1 = start_ours(tmp / "s1", o1port, n, scale=1)
    (tmp / "files").mkdir()
    files_targets = "  targets:\n" + "".join(
        f"    - {{name: '{TGT_PREFIX}:{pc(i)}', luns: [{{id: 1, backstore: {{type: file, path: {copies[i]}, create: false}}}}]}}\n"
        for i in range(n))
    ours_files = start_ours(tmp / "files", fport, 0, files_targets)  # ours without overlays: file LUNs of the copies
    procs += ours + ours1 + ours_files
    shared = Tgtd(tmp, sport)
    copied = Tgtd(tmp, cport)
    procs += [shared.proc, copied.proc]
    shared_urls, copies_urls = [], []
    for i in range(n):
        name = shared.target(i + 1, [(raw, True), (scratch[i], False)])
        shared_urls.append((f"iscsi://127.0.0.1:{sport}/{name}/1", (f"iscsi://127.0.0.1:{sport}/{name}/2", 0)))
        name = copied.target(i + 1, [(copies[i], False)])
        copies_urls.append((f"iscsi://127.0.0.1:{cport}/{name}/1", (f"iscsi://127.0.0.1:{cport}/{name}/1", WRITE_AT)))
    variants = {
        "ours": [(ours_url(oport, i), (ours_url(oport, i), WRITE_AT)) for i in range(n)],
        "ours, scale 1": [(ours_url(o1port, i), (ours_url(o1port, i), WRITE_AT)) for i in range(n)],
        "tgtd shared read-only": shared_urls,
        f"tgtd {n} copies": copies_urls,
        f"ours, {n} copies": [(u.replace(f":{cport}/", f":{fport}/"), (w.replace(f":{cport}/", f":{fport}/"), o))
                              for u, (w, o) in copies_urls],
    }
    servers = {"ours": [p.pid for p in ours], "ours, scale 1": [p.pid for p in ours1],
               "tgtd shared read-only": [shared.proc.pid], f"tgtd {n} copies": [copied.proc.pid],
               f"ours, {n} copies": [p.pid for p in ours_files]}
    files = [version, raw, *copies]

    def fresh_overlays() -> None:
        """Each round's PCs power on clean: their overlays emptied (the target closed them at logout)."""
        for i in range(n):
            deadline = time.monotonic() + 10
            while store.overlay_in_use("win10", pc(i)):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{pc(i)}'s overlay stayed open after its sessions ended")
                time.sleep(0.02)
            store.overlay_reset("win10", pc(i))

    print(f"boot storm: {n} PCs at once, each 13 MiB of 64 KiB READs at QD1 then 1 MiB of 64 KiB WRITEs at QD1; "
          f"{args.rounds} rounds after one storm per server that is not counted; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    for label, urls in variants.items():  # each server's first storm: not counted
        fresh_overlays()
        storm(urls)
    results, cpu_med = {}, {}
    cached = None
    ratios = {cache: {"ours": [], "ours, scale 1": []} for cache in ("warm", "cold")}  # within each round
    order = list(variants)
    for cache in ("warm", "cold"):
        times = {label: [] for label in variants}
        cpus = {label: [] for label in variants}
        disturbed = attempt = 0
        while len(times["ours"]) < args.rounds and attempt < 2 * args.rounds:
            r, attempt = attempt, attempt + 1
            got, used, stolen_in = {}, {}, {}
            for label in (order if r % 2 == 0 else order[::-1]):
                urls = variants[label]
                fresh_overlays()
                for path in files:
                    warm(path) if cache == "warm" else evict(path)
                os.sync()  # no earlier storm's writes left to write back during this one
                before, stolen = cpu_seconds(servers[label]), steal_seconds()
                got[label] = storm(urls)
                used[label] = cpu_seconds(servers[label]) - before
                stolen_in[label] = steal_seconds() - stolen
                if label == "ours" and cache == "warm" and cached is None:
                    overlays = sorted((tmp / "images/win10/overlays").glob("*.overlay"))
                    allocated = sum(os.stat(p).st_blocks * 512 for p in overlays)
                    cached = (fincore(version), len(overlays), allocated)
            line = ", ".join(f"{label} {got[label]:.2f} s (server CPU {used[label]:.2f} s, steal {stolen_in[label]:.2f} s)"
                             for label in variants)
            ratio = {mine: got["tgtd shared read-only"] / got[mine] for mine in ("ours", "ours, scale 1")}
            head = f"  {cache} page cache, round {r + 1} (load {os.getloadavg()[0]:.1f}): "
            tail = f"; tgtd shared / ours {ratio['ours']:.2f}x, / ours scale 1 {ratio['ours, scale 1']:.2f}x"
            if max(stolen_in.values()) > STEAL_LIMIT and attempt < 2 * args.rounds:
                disturbed += 1  # the host took CPU from this VM during the round: not counted, run another
                print(head + line + tail + f": not counted (steal over {STEAL_LIMIT} s in a storm)")
                continue
            for label in variants:
                times[label].append(got[label])
                cpus[label].append(used[label])
            for mine in ratio:
                ratios[cache][mine].append(ratio[mine])
            print(head + line + tail)
        if disturbed:
            print(f"  {cache} page cache: {disturbed} round(s) not counted for steal, {len(times['ours'])} counted")
        results[cache] = {label: median(t) for label, t in times.items()}
        cpu_med[cache] = {label: median(c) for label, c in cpus.items()}
    for cache, med in results.items():
        print(f"median, {cache} page cache" + (" (every file evicted before each storm)" if cache == "cold" else "") + ":")
        for mine in ("ours", "ours, scale 1"):
            line = f"  {mine:14s} {med[mine]:5.2f} s ({n * (READ + WRITE) / med[mine] / 1e6:4.0f} MB/s over all PCs)"
            for label in ("tgtd shared read-only", f"tgtd {n} copies"):
                line += f"; vs {label} {med[label]:5.2f} s: {med[label] / med[mine]:.2f}x its speed"
            rs = ratios[cache][mine]
            print(line + f"; within rounds vs tgtd shared: median {median(rs):.2f}x, {min(rs):.2f}-{max(rs):.2f}x"
                  f", >= 1.2x in {sum(r >= 1.2 for r in rs)} of {len(rs)} rounds, faster in "
                  f"{sum(r > 1 for r in rs)} (goal >= 1.2x)")
        c = cpu_med[cache]
        print(f"  server CPU per storm (medians): ours {c['ours']:.2f} s, ours scale 1 {c['ours, scale 1']:.2f} s, "
              f"tgtd shared {c['tgtd shared read-only']:.2f} s, tgtd {n} copies {c[f'tgtd {n} copies']:.2f} s")
        own = f"ours, {n} copies"
        print(f"  {own:14s} {med[own]:5.2f} s: our target without overlays (file LUNs of the copies); the overlays' "
              f"storm is {med[own] / med['ours']:.2f}x its speed")
    in_cache, count, allocated = cached
    print(f"page cache right after our first warm storm: version file {in_cache / MB:.1f} MiB cached of "
          f"{version.stat().st_size / MB:.0f} MiB: one copy for {n} PCs; {count} overlays hold "
          f"{allocated / MB:.1f} MiB on disk ({allocated / max(1, count) / MB:.2f} MiB each); tgtd's {n} copies: "
          f"{sum(fincore(c) for c in copies) / MB:.0f} MiB cached of {n * IMAGE_SIZE / MB:.0f} MiB after its last storm")
    for p in ours + ours1 + ours_files + [shared.proc, copied.proc]:
        stop(p, hard=p in (shared.proc, copied.proc))  # tgtd ignores SIGTERM
        procs.remove(p)


def overlay_vs_plain(tmp: Path, args, procs: list) -> None:
    size = 256 * MB  # 65536 granules: 32000 writes 1028 KiB apart are each a granule not written before
    store = ImageStore.for_state_dir(tmp / "ov")
    raw = tmp / "ov.raw"
    raw.write_bytes(os.urandom(size))
    store.import_file("win10", raw)
    plain = tmp / "plain.raw"
    shutil.copyfile(raw, plain)
    port = free_port()
    extra = f"""  targets:
    - name: {PREFIX}.bench:plain
      luns: [{{id: 0, backstore: {{type: file, path: {plain}, create: false}}}}]"""
    (tmp / "ov").mkdir(exist_ok=True)
    ours = start_ours(tmp / "ov", port, 1, extra)
    procs += ours
    plain_url = f"iscsi://127.0.0.1:{port}/{PREFIX}.bench:plain/0"
    pc_url = ours_url(port, 0)
    warm(raw), warm(plain), warm(store.version_path("win10", 1))
    writes, reads = 32000, 15000  # about half a second of writes a run: 8000 (0.15 s) swung 0.66x-0.96x
    res = {k: [] for k in ("w plain", "w overlay", "r plain", "r overlay")}

    def run(cmd) -> float:
        os.sync()  # the page cache's write-back of the run before (32000 new 4 KiB pages) is not this run's
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        m = re.search(r"Run completed in ([\d.]+) seconds", r.stdout)
        if r.returncode or not m:
            raise SystemExit(f"qemu-img bench failed: {r.stdout}{r.stderr}")
        return float(m.group(1))

    def fresh_overlay() -> None:
        deadline = time.monotonic() + 10
        while store.overlay_in_use("win10", pc(0)):  # the target closes it when the session has ended
            if time.monotonic() > deadline:
                raise SystemExit("the PC's overlay stayed open after its session ended")
            time.sleep(0.02)
        store.overlay_reset("win10", pc(0))

    print(f"overlay vs plain file LUN (ours, one initiator, {args.rounds} rounds; load average "
          f"{os.getloadavg()[0]:.1f}):")
    for r in range(args.rounds):
        fresh_overlay()
        res["w overlay"].append(writes / run(bench_cmd(pc_url, writes, "4k", 0, True, 32, "1028k")))
        res["w plain"].append(writes / run(bench_cmd(plain_url, writes, "4k", 0, True, 32, "1028k")))
        fresh_overlay()
        res["r overlay"].append(reads / run(bench_cmd(pc_url, reads, "4k", 0, False, 1, "1028k")))
        res["r plain"].append(reads / run(bench_cmd(plain_url, reads, "4k", 0, False, 1, "1028k")))
        print(f"  round {r + 1}: 4 KiB QD32 writes {res['w overlay'][-1]:8.0f} vs {res['w plain'][-1]:8.0f} IOPS; "
              f"4 KiB QD1 reads {res['r overlay'][-1]:8.0f} vs {res['r plain'][-1]:8.0f} IOPS (overlay vs plain)")
    w = median(res["w overlay"]) / median(res["w plain"])
    rd = median(res["r overlay"]) / median(res["r plain"])
    print(f"median: 4 KiB QD32 writes into untouched granules {median(res['w overlay']):.0f} IOPS vs plain "
          f"{median(res['w plain']):.0f}: {w:.2f}x (goal >= 0.8x)")
    print(f"median: 4 KiB QD1 reads of untouched granules {median(res['r overlay']):.0f} IOPS vs plain "
          f"{median(res['r plain']):.0f}: {rd:.2f}x (goal >= 0.9x)")
    for p in ours:
        stop(p)
        procs.remove(p)


if __name__ == "__main__":
    main()
