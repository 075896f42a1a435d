"""A virtual PC with no disk: QEMU (TCG) whose e1000 NIC boots iPXE from `ipxe-qemu`, its serial console captured.

Power-on is the moment QEMU is started; every console line is stamped with the seconds since then, so a test
can ask how long the chain took to reach a line (`wait_for`). TCG always: /dev/kvm can exist on nested hosts yet
fail in real mode, which is where PXE spends its time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

NIC_ROM = Path("/usr/lib/ipxe/qemu/pxe-virtio.rom")  # iPXE for virtio-net, BIOS only (ipxe-qemu); PCI id 1af4:1041
NIC_MODEL = "virtio-net-pci"  # modern-only (disable-legacy=on) to match the ROM; the lab kernel has no e1000
QEMU = "qemu-system-x86_64"
# UEFI PCs: Debian's OVMF (package ovmf), its own network stack and PXE; the NIC gets no option ROM
# (romfile=), so the firmware's PXE, not iPXE's, boots it
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# UEFI HTTP boot (firmware "uefi-http"): OVMF's fw_cfg knobs (OvmfPkg PlatformDxe) turn its PXE boot options off,
# so the first network entry of its boot manager is "UEFI HTTPv4 (MAC:...)" and it boots that one, not PXE
OVMF_NO_PXE = ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
               "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"]
SERCON_PORT_FILE = Path(tempfile.gettempdir()) / "bootfleet-lab-sercon-port.bin"  # 0x3f8, little-endian
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


class QemuError(RuntimeError):
    pass


def check_tools() -> list[str]:
    """What is missing to run a virtual PC, as sentences naming the Debian package."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (Debian package qemu-system-x86)")
    if not NIC_ROM.exists():
        missing.append(f"{NIC_ROM} (Debian package ipxe-qemu)")
    return missing


def check_uefi_tools() -> list[str]:
    return [f"{p} (Debian package ovmf)" for p in (OVMF_CODE, OVMF_VARS) if not p.exists()]


@dataclass
class ConsoleLine:
    t: float  # seconds since power-on when the line ended
    text: str
    t_start: float = 0.0  # when its first character arrived (iPXE prints "Configuring..." then waits, then "ok")


@dataclass
class VirtualPC:
    """One PC: `start()` powers it on inside `netns` on tap device `tap`; `stop()` pulls the plug."""

    name: str
    mac: str
    tap: str
    netns: str | None = None
    memory_mib: int = 256
    # bios: SeaBIOS + the iPXE ROM; uefi: OVMF and its own PXE, no NIC ROM; uefi-http: OVMF's HTTP boot, no PXE
    firmware: str = "bios"
    on_line: Callable[[ConsoleLine], None] | None = None  # called from the reader thread for each line
    lines: list[ConsoleLine] = field(default_factory=list)
    powered_on: float = 0.0  # time.monotonic() when QEMU started
    proc: subprocess.Popen | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    def command(self) -> list[str]:
        if self.firmware in ("uefi", "uefi-http"):
            return self._uefi_command()
        cmd = [
            QEMU, "-machine", "pc,accel=tcg", "-cpu", "qemu64", "-m", str(self.memory_mib),
            "-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            # SeaBIOS copies the BIOS text console (iPXE's messages, syslinux) to COM1: one stream to watch
            "-fw_cfg", f"name=etc/sercon-port,file={SERCON_PORT_FILE}",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", f"{NIC_MODEL},disable-legacy=on,netdev=n0,mac={self.mac},romfile={NIC_ROM},bootindex=0",
            "-boot", "n", "-name", self.name, "-uuid", self.uuid,
        ]
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def _uefi_command(self) -> list[str]:
        # OVMF's variable store is written at boot: each PC gets its own copy
        self.vars_file = Path(tempfile.gettempdir()) / f"bootfleet-ovmf-vars-{self.name}-{self.mac.replace(':', '')}.fd"
        shutil.copyfile(OVMF_VARS, self.vars_file)
        cmd = [
            QEMU, "-machine", "pc,accel=tcg", "-cpu", "qemu64", "-m", str(max(self.memory_mib, 512)),
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.vars_file}",
            "-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", f"{NIC_MODEL},netdev=n0,mac={self.mac},romfile=,bootindex=0",
            "-name", self.name, "-uuid", self.uuid,
        ]
        if self.firmware == "uefi-http":
            cmd += OVMF_NO_PXE
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    @property
    def uuid(self) -> str:
        """The PC's SMBIOS system UUID (QEMU -uuid), from its MAC: what DHCP option 97 reports."""
        return f"5eb00f1e-0000-4000-8000-{self.mac.replace(':', '')}"

    def start(self) -> None:
        missing = check_tools() + (check_uefi_tools() if self.firmware.startswith("uefi") else [])
        if missing:
            raise QemuError("cannot start a virtual PC; missing: " + "; ".join(missing))
        if not SERCON_PORT_FILE.exists():
            SERCON_PORT_FILE.write_bytes((0x3F8).to_bytes(2, "little"))
        self.powered_on = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, name=f"console-{self.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        pending = b""
        since = 0.0  # when the first byte of the pending line arrived
        while True:
            chunk = self.proc.stdout.read1(4096)
            now = time.monotonic() - self.powered_on
            if not chunk:
                break
            if not pending:
                since = now
            pending += chunk
            *complete, pending = re.split(rb"\r?\n|\r(?!\n)", pending)
            for raw in complete:
                self._add(ConsoleLine(now, _ANSI.sub("", raw.decode("utf-8", "replace")), since))
                since = now
        if pending:
            self._add(ConsoleLine(now, _ANSI.sub("", pending.decode("utf-8", "replace")), since))
        with self._cond:
            self._cond.notify_all()

    def _add(self, line: ConsoleLine) -> None:
        if not line.text.strip():
            return
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()
        if self.on_line:
            self.on_line(line)

    def find(self, pattern: str) -> re.Match | None:
        rx = re.compile(pattern)
        with self._cond:
            for line in self.lines:
                m = rx.search(line.text)
                if m:
                    return m
        return None

    def line(self, pattern: str) -> ConsoleLine | None:
        rx = re.compile(pattern)
        with self._cond:
            for line in self.lines:
                if rx.search(line.text):
                    return line
        return None

    def line_time(self, pattern: str) -> float | None:
        line = self.line(pattern)
        return line.t if line else None

    def wait_for(self, pattern: str, timeout: float, fail: Iterable[str] = ("BOOTFLEET-FAIL",)) -> ConsoleLine:
        """Block until a console line matches `pattern`; raise with the console's tail on timeout or failure."""
        rx = re.compile(pattern)
        fail_rx = [re.compile(f) for f in fail]
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line.text):
                        return line
                    if any(f.search(line.text) for f in fail_rx):
                        raise QemuError(f"{self.name}: {line.text.strip()}\n{self.tail()}")
                seen = len(self.lines)
                if self.proc and self.proc.poll() is not None and (not self._reader or not self._reader.is_alive()):
                    raise QemuError(f"{self.name}: QEMU exited ({self.proc.returncode}) before {pattern!r}\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QemuError(f"{self.name}: no {pattern!r} within {timeout:.0f} s\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def tail(self, n: int = 40) -> str:
        return "\n".join(f"  [{line.t:6.2f}] {line.text}" for line in self.lines[-n:])

    def wait_exit(self, timeout: float) -> int | None:
        if not self.proc:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Power off now (SIGTERM, then SIGKILL), by PID."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader:
            self._reader.join(5)
        vars_file = getattr(self, "vars_file", None)
        if vars_file is not None:
            vars_file.unlink(missing_ok=True)
