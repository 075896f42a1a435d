"""One image for a room of PCs, in the lab (issue 13, docs/lab.md "One image, many PCs"): Bootfleet serves every
PC the same image, each through its own target and its own overlay.

    with GoldenLab(workdir, disk, {"d1": "discard", "p1": "persistent", "super": "super"}) as gl:
        boots = gl.boot(["d1", "p1", "super"])      # powered on at once; each Boot says what its console showed
        gl.read_sector("d1", image.NONCE_SECTOR)     # through d1's own target, as d1 (its initiator name)

The boot disk is imported with `bootfleet image import` (one token for the image, at sector 1024). A PC
cannot be told apart by its disk any more, so it is told apart by the initiator name DHCP option 203 gave
iPXE, which the guest reads from the iBFT and prints; the guest also prints what its disk held at the nonce
and marker sectors before it wrote anything, writes its nonce and reads it back past its page cache. A PC
named `super*` writes a marker as well; one named `watch*` stays up and prints the marker sector every
second (lab/image.py); `hard_reset(name)` presses such a PC's reset button (QEMU's monitor) while its
iSCSI session is up.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lab import image
from lab.netns import BRIDGE, NETWORK, SERVER_IP, Lab, LabError
from lab.qemu import ConsoleLine, VirtualPC
from lab.stack import BootfleetStack

IMAGE = "lab"
IQN_PREFIX = "iqn.2026-12.org.bootfleet"


def mac_of(n: int) -> str:
    return f"52:54:00:77:01:{0x10 + n:02x}"


@dataclass
class GoldenConfig:
    """The lab's configuration: PCs on one image, no targets of their own in iscsi.targets."""

    pcs: dict[str, tuple[str, str]]  # name -> (mac, mode)
    tftp_root: Path
    nop: tuple[int, int] = (2, 2)  # iscsi.nop_interval, nop_timeout

    def document(self) -> dict:
        return {
            "version": 1,
            "boot": {"server": SERVER_IP, "keep_san": True, "iqn_prefix": IQN_PREFIX},
            "images": [{"name": IMAGE, "mode": "discard", "keep_versions": 2}],
            "clients": [{"mac": mac, "name": name, "image": IMAGE, "mode": mode} for name, (mac, mode) in self.pcs.items()],
            # short pings: a PC that powered off without logging out (poweroff -f) is logged out in ~4 s, so a
            # publish or a power-on reset after it need not wait 45 s
            "iscsi": {"portals": [{"ip": SERVER_IP, "port": 3260}], "nop_interval": self.nop[0],
                      "nop_timeout": self.nop[1]},
            "dhcp": {
                "interfaces": [{"name": BRIDGE, "ipv6_ra": True}],
                "scopes": [{"name": "lab", "subnet": NETWORK, "interface": BRIDGE,
                            "ranges": [{"start": "10.77.0.100", "end": "10.77.0.199"}], "lease_time": 3600}],
            },
            "tftp": {"root": str(self.tftp_root), "address": SERVER_IP, "port": 69},
        }

    def write(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.document(), sort_keys=False))
        return path


@dataclass
class Boot:
    """One power-on of one PC and what its console said."""

    name: str
    mac: str
    lines: list[ConsoleLine] = field(default_factory=list)
    error: str | None = None
    marker_s: float | None = None
    pc: VirtualPC | None = None

    def value(self, word: str) -> str | None:
        rx = re.compile(rf"BOOTFLEET-{word} (\S+)")
        for line in self.lines:
            m = rx.search(line.text)
            if m:
                return m.group(1)
        return None

    @property
    def nonce(self) -> str | None:
        return self.value("NONCE")

    def watched(self, since: float) -> list[str]:
        """The marker sector as a watching PC saw it, in the lines printed after `since` (its power-on clock)."""
        lines = list(self.pc.lines) if self.pc else self.lines
        return [m.group(1) for line in lines if line.t > since for m in [re.search(r"BOOTFLEET-WATCH (\S+)", line.text)] if m]

    def tail(self, n: int = 30) -> str:
        lines = list(self.pc.lines) if self.pc else self.lines
        return "\n".join(f"  [{line.t:6.2f}] {line.text}" for line in lines[-n:])


@dataclass
class ResettablePC(VirtualPC):
    """A PC with a reset button: QEMU's monitor on a Unix socket, and a reset reboots (no -no-reboot)."""

    monitor: Path | None = None

    def command(self) -> list[str]:
        cmd = [a for a in super().command() if a != "-no-reboot"]
        cmd[cmd.index("-monitor") + 1] = f"unix:{self.monitor},server,nowait"
        return cmd

    def hard_reset(self) -> None:
        """Press reset: the machine restarts at once, its OS gets no word of it (its TCP connections die
        unannounced)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.monitor))
            s.sendall(b"system_reset\n")
            time.sleep(0.3)  # let the monitor read it before the socket closes


class GoldenLab:
    def __init__(self, workdir: Path, disk: Path, modes: dict[str, str], boot_timeout: float = 180.0,
                 nop: tuple[int, int] = (2, 2)):
        self.workdir = workdir
        self.disk = disk
        self.pcs = {name: (mac_of(i), mode) for i, (name, mode) in enumerate(modes.items())}
        self.boot_timeout = boot_timeout
        self.nop = nop
        self.token = f"image-{uuid.uuid4().hex[:16]}"
        self.lab: Lab | None = None
        self.stack: BootfleetStack | None = None
        self.running: dict[str, Boot] = {}

    def __enter__(self) -> "GoldenLab":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.golden = self.workdir / "golden.img"
        shutil.copyfile(self.disk, self.golden)
        image.write_token(self.golden, self.token)  # one token: the image's, the same for every PC
        self.lab = Lab()
        try:
            self.lab.up()
            state = self.workdir / "state"
            state.mkdir(exist_ok=True)
            self.stack = BootfleetStack(self.lab, state, GoldenConfig(self.pcs, self.workdir / "tftp", self.nop))
            self.stack.start()
            done = self.stack.cli("image", "import", IMAGE, str(self.golden), timeout=120)
            if done.returncode != 0:
                raise LabError(f"bootfleet image import: {done.stderr.strip()}")
            self.import_output = done.stdout + done.stderr
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for b in self.running.values():
            if b.pc:
                b.pc.stop()
        try:
            if self.stack:
                self.stack.stop()
        finally:
            if self.lab:
                self.lab.close()

    def initiator(self, name: str) -> str:
        return f"{IQN_PREFIX}:pc.{name}"

    def target(self, name: str) -> str:
        return f"{IQN_PREFIX}:{IMAGE}.{name}"

    def boot(self, names: list[str], keep: tuple[str, ...] = ()) -> dict[str, Boot]:
        """Power these PCs on at once and wait until each wrote its nonce (and powered off, but those in
        `keep`, which stay running: `self.running`)."""
        boots = {n: Boot(n, self.pcs[n][0]) for n in names}
        for b in boots.values():
            name = f"{b.name}-{uuid.uuid4().hex[:4]}"
            if b.name in keep:  # one that stays up can be reset
                b.pc = ResettablePC(name, b.mac, self.lab.add_tap(), self.lab.name,
                                    monitor=self.workdir / f"{name}.monitor")
            else:
                b.pc = VirtualPC(name, b.mac, self.lab.add_tap(), self.lab.name)
        threads = [threading.Thread(target=self._wait, args=(b, b.name in keep), daemon=True) for b in boots.values()]
        try:
            for b in boots.values():
                b.pc.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join(self.boot_timeout + 30)
        finally:
            for b in boots.values():
                if b.name in keep and b.error is None:
                    self.running[b.name] = b
                else:
                    b.pc.stop()
                b.lines = list(b.pc.lines)
        return boots

    def _wait(self, b: Boot, keep: bool) -> None:
        try:
            b.marker_s = b.pc.wait_for(image.MARKER, self.boot_timeout).t
            b.pc.wait_for("BOOTFLEET-DONE", 90)
            if keep:
                b.pc.wait_for("BOOTFLEET-WATCH", 30)
            elif b.pc.wait_exit(20) is None:
                b.error = "did not power off after BOOTFLEET-DONE"
        except Exception as exc:
            b.error = str(exc)

    def hard_reset(self, name: str) -> Boot:
        """Reset a running PC (it stays in `self.running`) and wait until its next boot wrote its nonce; the
        Boot returned holds that boot's console lines only."""
        b = self.running[name]
        seen = len(b.pc.lines)
        b.pc.hard_reset()
        again = Boot(name, b.mac, pc=None)
        deadline = time.monotonic() + self.boot_timeout
        while not any("BOOTFLEET-DONE" in line.text for line in b.pc.lines[seen:]):
            if time.monotonic() > deadline or b.pc.proc.poll() is not None:
                again.error = f"no second boot after the reset\n{b.tail()}"
                break
            time.sleep(0.5)
        again.lines = list(b.pc.lines[seen:])
        return again

    def stop(self, name: str) -> Boot:
        b = self.running.pop(name)
        b.pc.stop()
        b.lines = list(b.pc.lines)
        return b

    def read_sector(self, name: str, sector: int) -> bytes:
        """One sector of PC `name`'s disk through its own target, logged in as the PC (its initiator name, the
        target admits no other), with QEMU's libiscsi: an initiator independent of ours and of the guest's."""
        out = self.workdir / f"read-{uuid.uuid4().hex[:8]}.bin"
        opts = (f"driver=iscsi,transport=tcp,portal={SERVER_IP}:3260,target={self.target(name)},lun=0,"
                f"initiator-name={self.initiator(name)}")
        try:
            done = self.lab.run(["qemu-img", "dd", "--image-opts", "-O", "raw", "bs=512", f"skip={sector}",
                                 f"count={sector + 1}", f"if={opts}", f"of={out}"])
            if done.returncode != 0:
                raise LabError(f"qemu-img dd from {self.target(name)}: {done.stderr.strip()}")
            return out.read_bytes()
        finally:
            out.unlink(missing_ok=True)

    @staticmethod
    def parse(sector: bytes, word: str) -> str | None:
        m = re.match(rb"BOOTFLEET-" + word.encode() + rb" ([0-9a-f]{32})\n", sector)
        return m.group(1).decode() if m else None
