"""iSCSI target benchmark: ours against tgtd, side by side, same client, interleaved runs.

    .venv/bin/python bench/iscsi.py [--rounds 3] [--busy-poll-us 100] [--size-mib 128] [--logins 300]

Starts tgtd (`tgtd -f -C <ctl> --iscsi portal=127.0.0.1:<port>`, a target made with tgtadm, backing store
a file) and `python -m services.iscsi_target --config FILE` with a file LUN of the same size and content,
warms the page caches, then runs `qemu-img bench` over iscsi:// against each in turn for every workload
and round, and prints the median of each with the ratio ours/tgtd.

Ours runs with the defaults: `scale.iscsi_target: auto` (one process per usable core, --instance 0..N-1, one
port, one state directory, as supervisord runs them) and `busy_poll_us: 0`; beside it the same target tuned
with `busy_poll_us` (--busy-poll-us, 100), which spins a core while I/O flows. Then the cost of one owner per target (owners.py): our
target again with `scale.iscsi_target: 3`, against the default and tgtd: logins per second
(connect, login, INQUIRY, logout, close: one after the other, from this process), and 4 KiB QD1 read IOPS,
each run labelled by whether the kernel gave its connection to the owner (direct) or to another process
that handed it over (the debug log says so), so the steady-state data path of a handed-over connection is
compared with a direct one. Bounded: about three minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shared.config.model import ScaleConfig  # noqa: E402

DEFAULT_PROCESSES = ScaleConfig().processes("iscsi_target")
IQN = "iqn.2026-11.org.bootfleet.bench:disk"

# name, qemu-img bench arguments, unit, operations per run
WORKLOADS = [
    ("4 KiB read QD1 (IOPS)", ["-d", "1", "-s", "4k"], "iops", 15000),
    ("64 KiB read QD1 (MB/s)", ["-d", "1", "-s", "64k"], "mbs", 6000),
    ("64 KiB seq read QD32 (MB/s)", ["-d", "32", "-s", "64k"], "mbs", 30000),
    ("64 KiB seq write QD32 (MB/s)", ["-w", "-d", "32", "-s", "64k"], "mbs", 15000),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise SystemExit(f"{tool} is missing (deploy/system-deps.sh installs it)")
    return path


def start_tgtd(tmp: Path, image: Path, port: int) -> subprocess.Popen:
    ctl = str(100 + os.getpid() % 30000)  # tgtd accepts control ports up to 32767
    log = open(tmp / "tgtd.log", "wb")
    proc = subprocess.Popen([need("tgtd"), "-f", "-C", ctl, "--iscsi", f"portal=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, proc, "tgtd")
    adm = [need("tgtadm"), "-C", ctl, "--lld", "iscsi"]
    for args in (["--mode", "target", "--op", "new", "--tid", "1", "--targetname", IQN],
                 ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "--backing-store", str(image)],
                 ["--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", "ALL"]):
        subprocess.run(adm + args, check=True, capture_output=True, timeout=10)
    return proc


def start_ours(tmp: Path, image: Path, port: int, busy_poll_us: int | None = None, scale: int | None = None,
               name: str = "default") -> list[subprocess.Popen]:
    """Our target: `scale` processes sharing the port and a state directory `state-<name>` (as supervisord
    runs them); None: the defaults (scale auto, logging at info; busy_poll_us 0). An explicit scale logs at
    debug level (each hand-over logged, counted)."""
    state = tmp / f"state-{name}"
    state.mkdir(exist_ok=True)
    cfg = state / "bootfleet.yaml"
    explicit = "" if scale is None else f"logging: {{level: debug}}\nscale: {{iscsi_target: {scale}}}\n"
    spin = "" if busy_poll_us is None else f"  busy_poll_us: {busy_poll_us}\n"
    cfg.write_text(f"""version: 1
{explicit}iscsi:
  portals: [{{ip: 127.0.0.1, port: {port}}}]
{spin}  io_stats_interval: 0
  targets:
    - name: {IQN}
      luns: [{{id: 1, backstore: {{type: file, path: {image}, create: false}}}}]
""")
    procs = []
    scale = DEFAULT_PROCESSES if scale is None else scale
    for i in range(scale):
        log = open(state / f"ours-{i}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "services.iscsi_target", "--config", str(cfg),
                                       "--state-dir", str(state), "--instance", str(i)], cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            wait_port(port, proc, "our target")
        deadline = time.monotonic() + 15
        while scale > 1 and not all("listening on" in (state / f"ours-{i}.log").read_text() for i in range(scale)):
            if time.monotonic() > deadline:
                raise SystemExit("our target processes did not all listen")
            time.sleep(0.05)
    except BaseException:
        for proc in procs:  # the caller never gets them: stop them here
            stop(proc)
        raise
    return procs


def handed_overs(tmp: Path, scale: int) -> int:
    state = tmp / f"state-{scale}"  # start_ours(..., scale=scale, name=str(scale))
    return sum((state / f"ours-{i}.log").read_text().count("handed to instance") for i in range(scale))


# A minimal initiator for the login rate: header packing as RFC 7143 §11 lays it out.
_BHS = struct.Struct(">BBBBI8sIIIIIIII")  # opcode, flags, 2 bytes, lengths, LUN, ITT, 7 words


def _pdu(opcode, flags, lun=b"\0" * 8, itt=1, words=(0,) * 7, data=b"", b2=0, b3=0) -> bytes:
    pad = b"\0" * (-len(data) % 4)
    return _BHS.pack(opcode, flags, b2, b3, len(data), lun, itt, *words) + data + pad


def _read_pdu(sock) -> tuple[int, int, bytes]:
    head = _recv(sock, 48)
    dsl = int.from_bytes(head[5:8], "big")
    ahs = head[4] * 4
    body = _recv(sock, ahs + dsl + (-dsl % 4))
    return head[0] & 0x3F, head[1], head + body


def _recv(sock, n) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed by the target")
        buf += chunk
    return bytes(buf)


def login_inquiry_logout(port: int, isid: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keys = (f"InitiatorName=iqn.2026-11.org.bootfleet.bench:client\0TargetName={IQN}\0"
                "SessionType=Normal\0HeaderDigest=None\0DataDigest=None\0").encode()
        s.sendall(_pdu(0x43, 0x87, lun=struct.pack(">Q", isid << 16), words=(0, 1, 0, 0, 0, 0, 0), data=keys))
        op, flags, pdu = _read_pdu(s)
        status = pdu[36:38]
        if op != 0x23 or status != b"\0\0" or flags & 0x83 != 0x83:
            raise SystemExit(f"login refused on {port}: status {status.hex()}")
        statsn = int.from_bytes(pdu[24:28], "big")
        cdb = bytes([0x12, 0, 0, 0, 96, 0]).ljust(16, b"\0")
        lun = struct.pack(">Q", 1 << 48)
        s.sendall(_BHS.pack(0x01, 0xC1, 0, 0, 0, lun, 2, 96, 1, statsn + 1, *struct.unpack(">IIII", cdb)))
        while True:  # Data-In (status in the last, or a SCSI Response after it)
            op, flags, pdu = _read_pdu(s)
            if op == 0x21 or (op == 0x25 and flags & 0x01):
                break
        s.sendall(_pdu(0x46, 0x80, itt=3, words=(0, 2, statsn + 2, 0, 0, 0, 0)))
        op, _, _ = _read_pdu(s)
        if op != 0x26:
            raise SystemExit(f"no logout response from {port}")


def login_rate(port: int, count: int) -> float:
    started = time.perf_counter()
    for n in range(count):
        login_inquiry_logout(port, 0x800000000000 | (n & 0xFFFFFF))
    return count / (time.perf_counter() - started)


def bench(port: int, args: list[str], count: int) -> float:
    """Seconds qemu-img bench took for `count` requests."""
    url = f"iscsi://127.0.0.1:{port}/{IQN}/1"
    r = subprocess.run([need("qemu-img"), "bench", "-f", "raw", "-c", str(count), *args, url],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Run completed in ([\d.]+) seconds", r.stdout)
    if r.returncode or not m:
        raise SystemExit(f"qemu-img bench failed on port {port}: {r.stdout}{r.stderr}")
    return float(m.group(1))


def figure(unit: str, args: list[str], count: int, seconds: float) -> float:
    if unit == "iops":
        return count / seconds
    size = 65536 if "64k" in args else 4096
    return count * size / seconds / 1e6


def stop(proc: subprocess.Popen, hard: bool = False) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)  # tgtd ignores SIGTERM
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy-poll-us", type=int, default=100,
                        help="iscsi.busy_poll_us of the tuned target measured beside the default one "
                             "(the config default is 0: no spinning)")
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--logins", type=int, default=300, help="login+INQUIRY+logout cycles per measurement")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-iscsi-"))
    procs = []
    try:
        theirs_img, ours_img = tmp / "tgtd.img", tmp / "ours.img"
        chunk = os.urandom(1 << 20)
        with open(theirs_img, "wb") as f:
            for _ in range(args.size_mib):
                f.write(chunk)
        shutil.copyfile(theirs_img, ours_img)
        tport, oport, bport, sport = free_port(), free_port(), free_port(), free_port()
        procs.append(start_tgtd(tmp, theirs_img, tport))
        procs += start_ours(tmp, ours_img, oport)  # the defaults
        procs += start_ours(tmp, ours_img, bport, args.busy_poll_us, name="spin")  # the tuned setting beside
        servers = [("tgtd", tport), ("ours", oport), ("spin", bport)]
        for _, port in servers:  # warm the page caches and the targets
            bench(port, ["-d", "32", "-s", "64k"], args.size_mib * 16)
        results: dict[str, dict[str, list[float]]] = {w[0]: {who: [] for who, _ in servers} for w in WORKLOADS}
        started = time.monotonic()
        for round_no in range(args.rounds):
            for name, wargs, unit, count in WORKLOADS:
                for who, port in servers if round_no % 2 == 0 else servers[::-1]:
                    results[name][who].append(figure(unit, wargs, count, bench(port, wargs, count)))
            if time.monotonic() - started > 200:
                break  # stay within the time bound on a slow machine
        print(f"iSCSI target vs tgtd ({subprocess.run(['tgtd', '-V'], capture_output=True, text=True).stdout.strip()}), "
              f"qemu-img bench over loopback, {len(results[WORKLOADS[0][0]]['ours'])} interleaved rounds, median; "
              f"ours with the defaults (scale.iscsi_target auto: {DEFAULT_PROCESSES} processes; busy_poll_us 0), "
              f"and beside it tuned with busy_poll_us {args.busy_poll_us} (a core spins while I/O flows)")
        tuned = f"busy_poll {args.busy_poll_us}"
        print(f"{'workload':32} {'ours':>10} {'tgtd':>10} {'ratio':>7} {tuned:>16} {'ratio':>7}")
        for name, *_ in WORKLOADS:
            ours, spin = (statistics.median(results[name][who]) for who in ("ours", "spin"))
            theirs = statistics.median(results[name]["tgtd"])
            print(f"{name:32} {ours:10.0f} {theirs:10.0f} {ours / theirs:6.2f}x {spin:16.0f} {spin / theirs:6.2f}x")
        scaled(args, tmp, ours_img, tport, oport, sport, procs)
    finally:
        for i, proc in enumerate(procs):
            stop(proc, hard=i == 0)
        shutil.rmtree(tmp, ignore_errors=True)


def scaled(args, tmp: Path, image: Path, tport: int, oport: int, sport: int, procs: list) -> None:
    """The default scale vs scale 3 vs tgtd: login rate, and 4 KiB QD1 reads split by direct / handed-over."""
    procs += start_ours(tmp, image, sport, scale=3, name="3")
    bench(sport, ["-d", "32", "-s", "64k"], 2000)  # claim and warm
    default = f"auto ({DEFAULT_PROCESSES})"
    servers = [("tgtd", tport), (default, oport), ("scale 3", sport)]
    logins: dict[str, list[float]] = {name: [] for name, _ in servers}
    qd1: dict[str, list[float]] = {"tgtd": [], default: [], "scale 3 direct": [], "scale 3 handed over": []}
    count = 8000
    handed_before = handed_overs(tmp, 3)
    for round_no in range(max(3, args.rounds)):
        for name, port in servers if round_no % 2 == 0 else servers[::-1]:
            logins[name].append(login_rate(port, args.logins))
        for _ in range(2):
            for name, port in servers if round_no % 2 == 0 else servers[::-1]:
                before = handed_overs(tmp, 3)
                iops = count / bench(port, ["-d", "1", "-s", "4k"], count)
                if name == "scale 3":
                    name += " handed over" if handed_overs(tmp, 3) > before else " direct"
                qd1[name].append(iops)
    total = args.logins * len(logins["scale 3"])
    handed = handed_overs(tmp, 3) - handed_before
    print(f"\nOne owner per target: scale.iscsi_target {default} vs 3 (3 processes, one port) vs tgtd; "
          f"{len(logins['tgtd'])} interleaved rounds, median; logins: {args.logins} sequential "
          f"connect+login+INQUIRY+logout from one Python client; {handed} of the scale-3 connections were "
          f"handed over ({total} logins + {len(qd1['scale 3 direct']) + len(qd1['scale 3 handed over'])} qemu-img runs)")
    base = statistics.median(logins["tgtd"])
    print(f"{'':34} {'value':>10} {'vs tgtd':>8}")
    for name, _ in servers:
        value = statistics.median(logins[name])
        print(f"{'logins/s, ' + name:34} {value:10.0f} {value / base:7.2f}x")
    base = statistics.median(qd1["tgtd"])
    for name, values in qd1.items():
        if values:
            value = statistics.median(values)
            print(f"{'4 KiB QD1 read IOPS, ' + name:34} {value:10.0f} {value / base:7.2f}x  ({len(values)} runs)")
        else:
            print(f"{'4 KiB QD1 read IOPS, ' + name:34} {'-':>10}  (no run landed so)")


if __name__ == "__main__":
    main()
