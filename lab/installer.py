"""CD/DVD targets in the lab (issue 14): ISO images built with xorriso, Linux's sr driver reading one over iSCSI,
and the installer ISO that puts the lab's system onto an empty network disk from the network alone.

- `make_iso(path, files)`: an ISO 9660 image (Rock Ridge, Joliet) holding `files`; with `boot=True` it is
  El Torito bootable through ISOLINUX (Debian package isolinux), which boots the lab kernel and initramfs.
- `installer_iso(path, system)`: the installer: ISOLINUX, the lab kernel and initramfs taken from the lab's
  boot disk (lab/image.py), `bootfleet.install` on the kernel line, and `system` (a copy of the boot disk) as
  /install/disk.img. The initramfs's /init then mounts the disc over iSCSI (/dev/sr0) and writes the image onto
  the network disk the iBFT names (/dev/sdX), and powers off.
- `CdromLab`: BootfleetLab PCs whose targets (`lab-cd<n>`) carry the boot disk as LUN 0 and an ISO as LUN 1
  (`backstore: {type: cdrom}`); the guest's /init, seeing a target named *-cd*, waits for /dev/sr0, mounts it
  as ISO 9660 and prints `BOOTFLEET-CDROM <the first line of /BOOTFLEET.TXT>`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lab import image
from lab.scenario import BootfleetLab
from lab.stack import LabConfig

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")  # Debian package isolinux
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")  # syslinux-common
ISOLINUX_CFG = """DEFAULT install
PROMPT 0
TIMEOUT 0
LABEL install
  KERNEL /vmlinuz
  INITRD /initrd.lz4
  APPEND @APPEND@ bootfleet.install
"""


def check_tools() -> list[str]:
    missing = [] if shutil.which("xorriso") else ["xorriso (Debian package xorriso)"]
    missing += [f"{p} (Debian package {pkg})" for p, pkg in ((ISOLINUX_BIN, "isolinux"), (LDLINUX_C32, "syslinux-common"))
                if not p.exists()]
    return missing + ([] if shutil.which("mcopy") else ["mcopy (Debian package mtools)"])


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise image.ImageError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")


def make_iso(path: Path, files: dict[str, bytes | Path], boot: bool = False, volume: str = "BOOTFLEET") -> Path:
    """An ISO 9660 image at `path` holding `files` (name in the image -> bytes, or a file to copy)."""
    missing = check_tools()
    if missing:
        raise image.ImageError("cannot build an ISO; missing: " + "; ".join(missing))
    tree = path.with_name(path.name + ".tree")
    shutil.rmtree(tree, ignore_errors=True)
    for name, data in files.items():
        dest = tree / name.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            shutil.copyfile(data, dest)
        else:
            dest.write_bytes(data)
    cmd = ["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-V", volume, "-o", str(path)]
    if boot:  # El Torito, no emulation, ISOLINUX's 2048-byte boot image (what iPXE's CD emulation starts)
        cmd += ["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4",
                "-boot-info-table"]
    try:
        _run(cmd + [str(tree)])
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return path


def _from_boot_disk(disk: Path, name: str, dest: Path) -> Path:
    """A file of the boot disk's FAT partition (the kernel, the initramfs), read with mtools: no loop mount."""
    _run(["mcopy", "-n", "-i", f"{disk}@@{image.PARTITION_START * image.SECTOR}", f"::/{name}", str(dest)])
    return dest


def installer_iso(path: Path, system: Path, boot_disk: Path | None = None) -> Path:
    """The lab's installer ISO: boots the lab kernel in install mode; carries `system` as /install/disk.img."""
    boot_disk = boot_disk or image.build()
    work = path.with_name(path.name + ".parts")
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = {
            "isolinux/isolinux.bin": ISOLINUX_BIN, "isolinux/ldlinux.c32": LDLINUX_C32,
            "isolinux/isolinux.cfg": ISOLINUX_CFG.replace("@APPEND@", image.KERNEL_ARGS).encode(),
            "vmlinuz": _from_boot_disk(boot_disk, "vmlinuz", work / "vmlinuz"),
            "initrd.lz4": _from_boot_disk(boot_disk, "initrd.lz4", work / "initrd.lz4"),
            "install/disk.img": system,
            "BOOTFLEET.TXT": b"bootfleet-installer\n",
        }
        return make_iso(path, files, boot=True, volume="BOOTFLEET_INSTALL")
    finally:
        shutil.rmtree(work, ignore_errors=True)


class CdConfig(LabConfig):
    """The lab's config with more LUNs on the PCs' targets: `extra_luns` target IQN -> [lun entries]."""

    def __init__(self, *args, extra_luns: dict[str, list[dict]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_luns = extra_luns or {}

    def document(self) -> dict:
        doc = super().document()
        for t in doc["iscsi"]["targets"]:
            t["luns"] += self.extra_luns.get(t["name"], [])
        return doc


class CdromLab(BootfleetLab):
    """PCs whose target also carries a CD/DVD LUN (LUN 1) with `iso` as its disc."""

    def __init__(self, workdir: Path, iso: Path, pcs: int = 1, **kwargs):
        super().__init__(workdir, pcs, **kwargs)
        self.iso = iso

    def start_servers(self) -> None:
        from lab.scenario import IQN_PREFIX
        from lab.stack import BootfleetStack, LabClient

        for n, r in enumerate(self.results):
            r.iqn = f"{IQN_PREFIX}cd{n}"  # *-cd*: the guest looks for the disc
        clients = [LabClient(r.name, r.mac, r.iqn, img) for r, img in zip(self.results, self.images)]
        cd = [{"id": 1, "backstore": {"type": "cdrom", "path": str(self.iso)}}]
        config = CdConfig(clients, tftp_root=self.workdir / "tftp", extra_luns={r.iqn: cd for r in self.results})
        state = self.workdir / "state"
        state.mkdir(exist_ok=True)
        self.stack = BootfleetStack(self.lab, state, config)
        self.stack.start()


class InstallLab(BootfleetLab):
    """One PC with an EMPTY network disk (its target, LUN 0) and no other: `bootfleet client install MAC ISO`
    makes its next boot the installer's (sanhook its disk, sanboot the disc); `install()` runs that boot to the
    installer's power-off, then `boot()` is the installed system's ordinary boot from the network disk."""

    DISK_MIB = 48

    def __init__(self, workdir: Path, iso: Path, system_token: str, **kwargs):
        super().__init__(workdir, 1, **kwargs)
        self.iso = iso
        self.system_token = system_token
        self.install_answer = None

    def start_servers(self) -> None:
        for img, r in zip(self.images, self.results):
            with open(img, "wb") as f:  # empty: whatever boots from it later, the installer put there
                f.truncate(self.DISK_MIB << 20)
            r.token = self.system_token
        super().start_servers()
        r = self.results[0]
        self.install_answer = self.stack.cli("client", "install", r.mac, str(self.iso))
        if self.install_answer.returncode != 0:
            raise image.ImageError(f"bootfleet client install: {self.install_answer.stderr.strip()}")
        self.stack.wait_ready(30)

    def install(self, timeout: float = 240.0):
        """The install boot: returns (the PC, with its console) once the installer powered it off."""
        from lab.qemu import VirtualPC

        r = self.results[0]
        pc = VirtualPC(r.name, r.mac, self.lab.add_tap(), self.lab.name)
        try:
            pc.start()
            pc.wait_for("BOOTFLEET-INSTALLED", timeout, fail=("BOOTFLEET-FAIL", "the install boot of .* failed"))
            pc.wait_exit(30)
        finally:
            pc.stop()
        return pc
