"""The reference servers of the same boot chain: dnsmasq (DHCP + TFTP) and tgtd (iSCSI), run inside the lab.

Stock settings, as an administrator following the iPXE and tgt documentation would write them: the bench
compares Bootfleet with this. tgtd reserves LUN 0 for its controller, so the disk is LUN 1 and the root-path
names it (`iscsi:<server>::::1:<iqn>` has the LUN in the fourth field).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lab.netns import BRIDGE, SERVER_IP, SITE_IP, Lab, LabError

TGT_LUN = 1
SCRIPT = "#!ipxe\nset keep-san 1\nsanboot ${root-path}\n"


def check_tools() -> list[str]:
    missing = []
    for tool, package in (("dnsmasq", "dnsmasq-base"), ("tgtd", "tgt"), ("tgtadm", "tgt")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian package {package})")
    return missing


@dataclass
class ReferenceTarget:
    iqn: str
    image: Path


class ReferenceStack:
    """dnsmasq and tgtd inside `lab`, serving `targets` (booted by the MACs in `clients`, else the first)."""

    def __init__(self, lab: Lab, workdir: Path, targets: list[ReferenceTarget], clients: dict[str, str] | None = None):
        missing = check_tools()
        if missing:
            raise LabError("cannot start the reference servers; missing: " + "; ".join(missing))
        self.lab = lab
        self.workdir = workdir
        self.targets = targets
        self.clients = clients or {}  # mac -> iqn
        self.control_port = 1
        # tgtd's management socket defaults to a host-wide path (/var/run/tgtd/socket.N) that other tgtd runs
        # share; TGT_IPC_SOCKET (read by tgtd and tgtadm) puts ours in our work dir, so we never talk to theirs
        self.env = dict(os.environ, TGT_IPC_SOCKET=str(workdir / "tgtd.sock"))

    def root_path(self, iqn: str) -> str:
        return f"iscsi:{SERVER_IP}:::{TGT_LUN}:{iqn}"

    def start(self) -> None:
        self._start_tgtd()
        self._start_dnsmasq()

    def _tgtadm(self, *args: str) -> None:
        done = self.lab.run(["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args], env=self.env)
        if done.returncode != 0:
            raise LabError(f"tgtadm {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")

    def _start_tgtd(self) -> None:
        log = self.workdir / "tgtd.log"
        self.tgtd = self.lab.popen(
            ["tgtd", "-f", "-C", str(self.control_port), "--iscsi", f"portal={SERVER_IP}:3260"], log=log, env=self.env
        )
        deadline = time.monotonic() + 10
        while True:
            done = self.lab.run(["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", "--op", "show", "--mode", "sys"],
                                env=self.env)
            if done.returncode == 0:
                break
            if self.tgtd.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"tgtd did not start: {log.read_text()[-800:]}")
            time.sleep(0.1)
        for tid, target in enumerate(self.targets, start=1):
            self._tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", target.iqn)
            self._tgtadm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(TGT_LUN),
                         "-b", str(target.image))
            self._tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")

    def _start_dnsmasq(self) -> None:
        tftp_root = self.workdir / "tftp"
        tftp_root.mkdir(exist_ok=True)
        (tftp_root / "boot.ipxe").write_text(SCRIPT)
        args = [
            "dnsmasq", "-d", "--conf-file=/dev/null", f"--interface={BRIDGE}", "--bind-interfaces", "--port=0",
            "--user=root", "--group=root", "--pid-file=", f"--dhcp-leasefile={self.workdir / 'dnsmasq.leases'}",
            "--dhcp-range=10.77.0.100,10.77.0.199,255.255.255.0,1h",
            "--dhcp-userclass=set:ipxe,iPXE", "--dhcp-boot=tag:ipxe,boot.ipxe",
            "--enable-tftp", f"--tftp-root={tftp_root}", "--log-dhcp",
        ]
        default = self.targets[0].iqn
        args.append(f"--dhcp-option=tag:ipxe,17,{self.root_path(default)}")
        for n, (mac, iqn) in enumerate(self.clients.items()):
            args.append(f"--dhcp-host={mac},set:pc{n}")
            args.append(f"--dhcp-option=tag:pc{n},17,{self.root_path(iqn)}")
        self.dnsmasq = self.lab.popen(args, log=self.workdir / "dnsmasq.log")
        time.sleep(0.2)
        if self.dnsmasq.poll() is not None:
            raise LabError(f"dnsmasq exited: {(self.workdir / 'dnsmasq.log').read_text()[-800:]}")


def read_through_target(lab: Lab, iqn: str, lun: int, offset: int, length: int, portal: str = SERVER_IP) -> bytes:
    """Read bytes of a LUN as an initiator would: QEMU's libiscsi client (qemu-img dd) inside the lab."""
    if shutil.which("qemu-img") is None:
        raise LabError("qemu-img is missing (Debian packages qemu-utils and qemu-block-extra)")
    out = Path(tempfile.gettempdir()) / f"bootfleet-readback-{random.getrandbits(40):x}.bin"
    bs = 512
    if offset % bs or length % bs:
        raise ValueError("offset and length must be whole sectors")
    try:
        done = lab.run([
            "qemu-img", "dd", "-f", "raw", "-O", "raw", f"bs={bs}", f"skip={offset // bs}", f"count={(offset + length) // bs}",  # qemu-img counts from the start, skip included
            f"if=iscsi://{portal}/{iqn}/{lun}", f"of={out}",
        ])
        if done.returncode != 0:
            raise LabError(f"qemu-img dd from iscsi://{portal}/{iqn}/{lun}: {done.stderr.strip()}")
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


class SiteDhcp:
    """The site's own DHCP server for the ProxyDHCP runs: dnsmasq on another host of the LAN (its own
    namespace, SITE_IP), addresses only: a range, no boot options, no TFTP, no PXE (dnsmasq's PXE code is off
    unless pxe-service or a proxy range is configured), so every boot answer comes from Bootfleet's proxy."""

    def __init__(self, lab: Lab, workdir: Path, ping: bool = False, server: str = "dnsmasq"):
        self.server = server  # dnsmasq, or kea (ISC Kea's kea-dhcp4: a second server we did not write)
        tool, package = ("kea-dhcp4", "kea-dhcp4-server") if server == "kea" else ("dnsmasq", "dnsmasq-base")
        if shutil.which(tool) is None:
            raise LabError(f"cannot start the site's DHCP server; missing: {tool} (Debian package {package})")
        # dnsmasq pings an address before it first offers it and stays silent meanwhile: the PC's first offer
        # then comes with its third DISCOVER, ~3 s after the first (measured here: iPXE "Configuring" 3.05 s
        # with the ping, against this proxy adding nothing). Off by default, so lab times measure the boot
        # servers; `ping=True` shows a stock dnsmasq.
        self.ping = ping
        self.lab = lab
        self.workdir = workdir
        self.log = workdir / "site-dnsmasq.log"

    def start(self) -> None:
        self.ns = self.lab.add_host("site", SITE_IP)
        if self.server == "kea":
            return self._start_kea()
        args = [
            "dnsmasq", "-d", "--conf-file=/dev/null", "--interface=eth0", "--bind-interfaces", "--port=0",
            "--user=root", "--group=root", "--pid-file=", f"--dhcp-leasefile={self.workdir / 'site.leases'}",
            "--dhcp-range=10.77.0.100,10.77.0.199,255.255.255.0,1h", "--dhcp-authoritative", "--log-dhcp",
        ]
        if not self.ping:
            args.append("--no-ping")
        self.proc = self.lab.popen(args, log=self.log, ns=self.ns)
        deadline = time.monotonic() + 5
        while "DHCP, IP range" not in (self.log.read_text() if self.log.exists() else ""):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"the site's dnsmasq did not start: {self.log.read_text()[-800:]}")
            time.sleep(0.05)

    def _start_kea(self) -> None:
        """kea-dhcp4 with a subnet and a pool, nothing else (no option data, no client classes)."""
        conf = {"Dhcp4": {
            "interfaces-config": {"interfaces": ["eth0"]},
            "lease-database": {"type": "memfile", "persist": True, "name": str(self.workdir / "site-kea.csv"),
                               "lfc-interval": 0},
            "valid-lifetime": 3600,
            "subnet4": [{"id": 1, "subnet": "10.77.0.0/24", "pools": [{"pool": "10.77.0.100 - 10.77.0.199"}]}],
            "loggers": [{"name": "kea-dhcp4", "severity": "INFO", "output_options": [{"output": str(self.log)}]}],
        }}
        path = self.workdir / "site-kea.json"
        path.write_text(json.dumps(conf))
        env = dict(os.environ, KEA_LOCKFILE_DIR=str(self.workdir), KEA_PIDFILE_DIR=str(self.workdir))
        self.proc = self.lab.popen(["kea-dhcp4", "-c", str(path)], log=self.workdir / "site-kea.stdout", env=env,
                                   ns=self.ns)
        deadline = time.monotonic() + 10
        while "DHCP4_STARTED" not in (self.log.read_text() if self.log.exists() else ""):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = (self.workdir / "site-kea.stdout").read_text(errors="replace")[-800:]
                raise LabError(f"the site's kea-dhcp4 did not start: {out}")
            time.sleep(0.05)

    def leases(self) -> dict[str, str]:
        """mac -> address, from the server's lease file."""
        if self.server == "kea":
            path = self.workdir / "site-kea.csv"
            rows = [line.split(",") for line in (path.read_text().splitlines()[1:] if path.exists() else [])]
            return {r[1].lower(): r[0] for r in rows if len(r) > 1}
        path = self.workdir / "site.leases"
        out = {}
        for line in (path.read_text().splitlines() if path.exists() else []):
            parts = line.split()
            if len(parts) >= 3:
                out[parts[1].lower()] = parts[2]
        return out
