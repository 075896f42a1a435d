"""Boot virtual PCs end to end, through Bootfleet or through the reference servers, and report what happened.

Used by the e2e test, `make demo` and `bench/boot.py`, so all three boot the same way:

    with BootfleetLab(workdir, pcs=2) as bl:
        results = bl.boot()            # every PC powered on at once; each result says what its console showed
        bl.stack.cli("clients")

Each PC gets its own copy of the boot disk with its own token, and its own target. A result is `ok` when the
guest printed the marker, read its token back, and the nonce it printed is on its disk as read through the
target by an independent initiator (QEMU's libiscsi) after the guest powered off.
"""

from __future__ import annotations

import functools
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lab import image
from lab.netns import SERVER_IP, Lab
from lab.qemu import ConsoleLine, VirtualPC
from lab.reference import ReferenceStack, ReferenceTarget, SiteDhcp, read_through_target
from lab.stack import BootfleetStack, LabClient, LabConfig

IQN_PREFIX = "iqn.2026-11.org.bootfleet:lab-"
UEFI_LOADER = Path("/usr/lib/ipxe/snponly.efi")  # Debian package ipxe; boot.loaders.efi


def missing_tools(reference: bool = False) -> list[str]:
    """Everything a lab boot needs that this host lacks, each naming its Debian package; empty when ready."""
    from lab import netns, qemu, reference as ref

    missing = netns.check_tools() + qemu.check_tools() + image.check_tools()
    if shutil.which("qemu-img") is None:
        missing.append("qemu-img (Debian packages qemu-utils, qemu-block-extra: reads the nonce back over iSCSI)")
    if reference:
        missing += ref.check_tools()
    return missing


def pc_mac(n: int) -> str:
    return f"52:54:00:77:00:{0x10 + n:02x}"


@dataclass
class BootResult:
    name: str
    mac: str
    iqn: str
    token: str
    marker_s: float | None = None  # power-on to the marker on the console
    dhcp_s: float | None = None  # iPXE's "Configuring (net0 ...)" to its "ok": DHCP and the IPv6 wait
    nonce_s: float | None = None  # power-on to the guest's report of its write
    token_seen: str | None = None
    nonce_seen: str | None = None
    nonce_on_disk: str | None = None
    error: str | None = None
    console: list[ConsoleLine] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.error is None and self.marker_s is not None and self.token_seen == self.token
                and self.nonce_seen is not None and self.nonce_seen == self.nonce_on_disk)

    def summary(self) -> str:
        if self.ok:
            return (f"{self.name} {self.mac}: marker {self.marker_s:.2f} s after power-on "
                    f"(iPXE DHCP {self.dhcp_s:.2f} s), nonce written {self.nonce_s:.2f} s, token and nonce verified")
        return f"{self.name} {self.mac}: FAILED: {self.error or 'token/nonce mismatch'}"


class _LabRun:
    """Common part: the namespace, one disk per PC, booting the PCs in parallel, reading their nonces back."""

    lun = 0

    def __init__(self, workdir: Path, pcs: int = 1, disk: Path | None = None,
                 on_line: Callable[[VirtualPC, ConsoleLine], None] | None = None, boot_timeout: float = 150.0,
                 firmware: list[str] | None = None):
        self.workdir = workdir
        # per PC: bios (SeaBIOS + iPXE ROM), uefi (OVMF's own PXE) or uefi-http (OVMF's HTTP boot)
        self.firmware = firmware or ["bios"] * pcs
        self.disk = disk
        self.n = pcs
        self.on_line = on_line
        self.boot_timeout = boot_timeout
        self.lab: Lab | None = None
        self.results: list[BootResult] = []
        self.images: list[Path] = []

    def __enter__(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        golden = self.disk or image.build()
        for n in range(self.n):
            img = self.workdir / f"pc{n}.img"
            shutil.copyfile(golden, img)
            token = f"token-{uuid.uuid4().hex}"
            image.write_token(img, token)
            self.images.append(img)
            self.results.append(BootResult(f"pc{n}", pc_mac(n), f"{IQN_PREFIX}pc{n}", token))
        self.lab = Lab()
        try:
            self.lab.up()
            self.start_servers()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_servers(self) -> None:
        raise NotImplementedError

    def stop_servers(self) -> None:
        pass

    def close(self) -> None:
        try:
            self.stop_servers()
        finally:
            if self.lab:
                self.lab.close()

    def read_nonce(self, result: BootResult) -> str | None:
        sector = read_through_target(self.lab, result.iqn, self.lun, image.NONCE_SECTOR * image.SECTOR, image.SECTOR,
                                     portal=SERVER_IP)
        return image.parse_nonce(sector)

    def boot(self) -> list[BootResult]:
        """Power on every PC at once; wait for each to finish; verify its token and nonce."""
        pcs = []
        for result in self.results:
            pc = VirtualPC(result.name, result.mac, self.lab.add_tap(), self.lab.name,
                           firmware=self.firmware[len(pcs)])
            if self.on_line:
                pc.on_line = functools.partial(self.on_line, pc)
            pcs.append(pc)
        threads = [threading.Thread(target=self._boot_one, args=(pc, r), daemon=True) for pc, r in zip(pcs, self.results)]
        try:
            for pc in pcs:
                pc.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join(self.boot_timeout + 30)
        finally:
            for pc in pcs:
                pc.stop()
        for pc, result in zip(pcs, self.results):
            result.console = list(pc.lines)
            if result.error is None and result.nonce_seen:
                try:
                    result.nonce_on_disk = self.read_nonce(result)
                except Exception as exc:
                    result.error = f"reading the nonce back through the target: {exc}"
        return self.results

    def _boot_one(self, pc: VirtualPC, result: BootResult) -> None:
        try:
            result.marker_s = pc.wait_for(image.MARKER, self.boot_timeout).t
            configuring = pc.line(r"Configuring \(net0.*\bok\b")
            if configuring is not None:
                result.dhcp_s = configuring.t - configuring.t_start
            pc.wait_for("BOOTFLEET-DONE", 60)
            m = pc.find(r"BOOTFLEET-TOKEN (\S*)")
            result.token_seen = m.group(1) if m else None
            m = pc.find(r"BOOTFLEET-NONCE ([0-9a-f]{32})")
            result.nonce_seen = m.group(1) if m else None
            result.nonce_s = pc.line_time(r"BOOTFLEET-NONCE [0-9a-f]{32}")
            pc.wait_exit(15)  # poweroff -f: the guest's writes are all out once QEMU exits
        except Exception as exc:
            result.error = str(exc)


class BootfleetLab(_LabRun):
    """The PCs boot through Bootfleet (supervisord, controller, DHCP, TFTP, iSCSI) in the namespace."""

    def __init__(self, workdir: Path, pcs: int = 1, ipv6_ra: bool = True, proxy: bool = False, site_ping: bool = False,
                 site_server: str = "dnsmasq", unknown: str = "default", unassigned: tuple[str, ...] = (),
                 config_extra: dict | None = None, **kwargs):
        super().__init__(workdir, pcs, **kwargs)
        self.ipv6_ra = ipv6_ra
        self.proxy = proxy  # beside the site's own DHCP server (dnsmasq, addresses only), in dhcp.mode: proxy
        self.site_ping = site_ping  # the site's dnsmasq with its ping-before-offer check (off by default)
        self.site_server = site_server  # the site's DHCP server: dnsmasq or kea
        self.unknown = unknown  # boot.unknown
        self.unassigned = unassigned  # PCs (by name) left out of clients[]: they boot as `new` PCs
        self.config_extra = config_extra or {}  # LabConfig.extra: config sections merged over the lab's own
        self.site: SiteDhcp | None = None
        self.stack: BootfleetStack | None = None

    def start_servers(self) -> None:
        if self.proxy:
            self.site = SiteDhcp(self.lab, self.workdir, ping=self.site_ping, server=self.site_server)
            self.site.start()
        clients = [LabClient(r.name, r.mac, r.iqn, img) for r, img in zip(self.results, self.images)]
        # the firmware's PXE or HTTP boot loads iPXE first: Debian's ipxe package has it
        if any(f.startswith("uefi") for f in self.firmware):
            (self.workdir / "tftp").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(UEFI_LOADER, self.workdir / "tftp" / UEFI_LOADER.name)
        config = LabConfig(clients, tftp_root=self.workdir / "tftp", ipv6_ra=self.ipv6_ra,
                           dhcp_mode="proxy" if self.proxy else "server", unknown=self.unknown,
                           unassigned=self.unassigned, extra=self.config_extra)
        state = self.workdir / "state"
        state.mkdir(exist_ok=True)
        self.stack = BootfleetStack(self.lab, state, config)
        self.stack.start()

    def stop_servers(self) -> None:
        if self.stack:
            self.stack.stop()


class ReferenceLab(_LabRun):
    """The PCs boot through dnsmasq and tgtd, stock settings, in the namespace."""

    def start_servers(self) -> None:
        self.lun = 1  # tgtd keeps LUN 0 for its controller
        targets = [ReferenceTarget(r.iqn, img) for r, img in zip(self.results, self.images)]
        self.reference = ReferenceStack(self.lab, self.workdir, targets, {r.mac: r.iqn for r in self.results})
        self.reference.start()
