"""Build the lab's boot disk from Debian packages, without installing them and without loop mounts.

The disk (`BOOT_DISK_MIB` MiB, raw):
- sector 0: syslinux's `mbr.bin` and an MBR partition table with one bootable FAT16 partition at 1 MiB;
- sector `TOKEN_SECTOR`: a token the test writes before boot; the guest reads it and prints it;
- sector `NONCE_SECTOR`: where the guest writes a nonce of its own; the test reads it back through the target;
- the partition: syslinux (ldlinux.sys/.c32), `syslinux.cfg`, GRUB as `EFI/BOOT/BOOTX64.EFI` (the UEFI
  path to the same kernel), a Debian kernel taken from its .deb, and a busybox
  initramfs whose /init prints `MARKER`, logs in again with open-iscsi's `iscsistart` from the iBFT that iPXE left,
  reads the token, writes the nonce, and powers off.

Everything is cached under `var/cache/lab/`; the image is rebuilt only when this module or the packages change.
Run `python -m lab.image` to build it and print its path.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "var" / "cache" / "lab"

BOOT_DISK_MIB = 32
PARTITION_START = 2048  # sectors: 1 MiB, the usual alignment
SECTOR = 512
TOKEN_SECTOR = 1024  # in the gap between the MBR and the partition: no filesystem owns it
NONCE_SECTOR = 1025
MARK_SECTOR = 1026  # the one-image lab's super PC writes a marker here (lab/golden.py)
MARKER = "BOOTFLEET-MARKER"

# Debian's cloud kernel: LZ4-compressed (the generic one is XZ, which takes ~4 s more to unpack under TCG) and
# fewer built-in drivers to probe. It has no e1000 driver, so the lab's PCs have a virtio NIC.
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"

# Kernel modules the guest needs; their dependencies are added at build time, built-in ones skipped.
MODULES = [
    "sd_mod",  # the iSCSI LUN as /dev/sdX
    "virtio_pci", "virtio_net",  # the virtio NIC iPXE booted from
    "iscsi_tcp",  # open-iscsi's transport
    "iscsi_ibft",  # /sys/firmware/ibft: what iPXE left for the OS
    "crc32c_generic",  # libiscsi_tcp asks the crypto API for crc32c (digests) when a session starts
    "sr_mod", "cdrom", "isofs",  # a CD/DVD LUN as /dev/sr0 and its ISO 9660 file system (lab/installer.py)
]

# /init of the guest. It runs under busybox sh; its output goes to the serial console (console=ttyS0).
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /var/lock /etc/iscsi
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
mount -t sysfs sys /sys
up() { cut -d' ' -f1 /proc/uptime; }
echo "@MARKER@ uptime=$(up)"
for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko 2>/dev/null || echo "BOOTFLEET-WARN insmod $m failed"
done
fail() { echo "BOOTFLEET-FAIL $*"; poweroff -f; sleep 30; }
[ -d /sys/firmware/ibft ] || fail "no iBFT: did iPXE keep the SAN (set keep-san 1)?"
echo "BOOTFLEET-IBFT target=$(cat /sys/firmware/ibft/target0/target-name 2>/dev/null) lun=$(cat /sys/firmware/ibft/target0/lun 2>/dev/null)"
iscsistart -N >/tmp/net.log 2>&1 || { cat /tmp/net.log; fail "iscsistart -N (network from iBFT)"; }
echo "BOOTFLEET-NET $(ip -4 -o addr show | grep -v ' lo ' | tr -s ' ' | cut -d' ' -f2,4) uptime=$(up)"
# the second lab PC's OS asks for CRC32C header and data digests: Linux's own initiator checks ours
digests=""
case "$(cat /sys/firmware/ibft/target0/target-name 2>/dev/null)" in
    *pc1) digests="-P node.conn[0].iscsi.HeaderDigest=CRC32C -P node.conn[0].iscsi.DataDigest=CRC32C" ;;
esac
iscsistart -b $digests >/tmp/login.log 2>&1 || { cat /tmp/login.log; fail "iscsistart -b (login from iBFT)"; }
echo "BOOTFLEET-LOGIN uptime=$(up)"
disk=""
i=0
while [ -z "$disk" ] && [ $i -lt 200 ]; do
    for d in /sys/block/sd*; do [ -e "$d" ] && disk=${d##*/} && break; done
    [ -z "$disk" ] && { sleep 0.1; i=$((i + 1)); }
done
[ -n "$disk" ] || fail "no disk appeared after the iSCSI login"
# a CD/DVD LUN (Linux's sr driver over iSCSI): its ISO 9660 file system mounted, a known file read; expected on a
# target named *-cd* (lab/installer.py) and always by the installer (bootfleet.install on the kernel line)
cdrom() {
    i=0
    while [ ! -b /dev/sr0 ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b /dev/sr0 ] || fail "no /dev/sr0 after the iSCSI login (the CD/DVD LUN)"
    mkdir -p /cdrom
    mount -t iso9660 -o ro /dev/sr0 /cdrom 2>/tmp/mount.log || { cat /tmp/mount.log; fail "mount -t iso9660 /dev/sr0"; }
    echo "BOOTFLEET-CDROM $(head -c 64 /cdrom/BOOTFLEET.TXT 2>/dev/null | tr -dc 'A-Za-z0-9-') uptime=$(up)"
}
if grep -q bootfleet.install /proc/cmdline; then
    # the installer (lab/installer.py): the network disk the iBFT names gets the system the disc carries
    cdrom
    [ -f /cdrom/install/disk.img ] || fail "the installer disc has no /install/disk.img"
    echo "BOOTFLEET-INSTALLING onto /dev/$disk ($(cat /sys/block/$disk/size) sectors) uptime=$(up)"
    dd if=/cdrom/install/disk.img of=/dev/$disk bs=1M conv=fsync 2>/tmp/dd.log || { cat /tmp/dd.log; fail "dd onto /dev/$disk"; }
    sync
    echo "BOOTFLEET-INSTALLED $(dd if=/dev/$disk bs=512 skip=@TOKEN_SECTOR@ count=1 2>/dev/null | tr -dc 'A-Za-z0-9-' | head -c 64) uptime=$(up)"
    umount /cdrom
    poweroff -f
    sleep 30
fi
case "$(cat /sys/firmware/ibft/target0/target-name /sys/firmware/ibft/target1/target-name 2>/dev/null)" in
    *-cd*) cdrom; umount /cdrom ;;
esac
token=$(dd if=/dev/$disk bs=512 skip=@TOKEN_SECTOR@ count=1 2>/dev/null | tr -dc 'A-Za-z0-9-' | head -c 64)
echo "BOOTFLEET-TOKEN $token"
# a sector's "BOOTFLEET-<WORD> <32 hex>" line, read past the page cache (what the target serves now)
sector() { echo 3 >/proc/sys/vm/drop_caches; dd if=/dev/$disk bs=512 skip=$1 count=1 2>/dev/null | head -c 64 | tr -d '\000' | head -n 1 \
    | sed -n "s/^BOOTFLEET-$2 \([0-9a-f]\{32\}\).*/\1/p"; }
# PCs booting one image: the initiator name DHCP option 203 gave iPXE (iBFT) names the PC; what the disk held
# before this boot wrote anything (a discard PC: nothing of its last boot; a persistent one: its last nonce),
# and the marker a super PC wrote into a version published since
initiator=$(cat /sys/firmware/ibft/initiator/initiator-name 2>/dev/null)
echo "BOOTFLEET-INITIATOR ${initiator:-none}"
prev=$(sector @NONCE_SECTOR@ NONCE)
echo "BOOTFLEET-PREV ${prev:-none}"
mark=$(sector @MARK_SECTOR@ MARK)
echo "BOOTFLEET-SEEMARK ${mark:-none}"
# /dev/urandom would wait ~1 s under TCG for the entropy jitter dance (crng not ready this early); the kernel's
# random UUIDs do not wait, and a nonce needs no more than that
nonce=$(cat /proc/sys/kernel/random/uuid /proc/sys/kernel/random/uuid | tr -d '\n-' | head -c 32)
printf 'BOOTFLEET-NONCE %s\n' "$nonce" | dd of=/dev/$disk bs=512 seek=@NONCE_SECTOR@ count=1 conv=sync,fsync 2>/dev/null \
    || fail "write of the nonce to /dev/$disk"
echo "BOOTFLEET-NONCE $nonce uptime=$(up)"
back=$(sector @NONCE_SECTOR@ NONCE)
echo "BOOTFLEET-READBACK ${back:-none}"
case "$initiator" in
    *:pc.super*)  # the super PC of the one-image lab writes a marker for the next version
        printf 'BOOTFLEET-MARK %s\n' "$nonce" | dd of=/dev/$disk bs=512 seek=@MARK_SECTOR@ count=1 conv=sync,fsync 2>/dev/null \
            || fail "write of the marker to /dev/$disk"
        echo "BOOTFLEET-MARKED $nonce" ;;
esac
echo "BOOTFLEET-DONE"
case "$initiator" in
    *:pc.watch*)  # keeps running: what its disk shows at the marker's sector, every second, until stopped
        while true; do m=$(sector @MARK_SECTOR@ MARK); echo "BOOTFLEET-WATCH ${m:-none} uptime=$(up)"; sleep 1; done ;;
esac
poweroff -f
sleep 30
"""

# UEFI: the same kernel and initramfs through GRUB, a standalone EFI image at the removable-media path
# \EFI\BOOT\BOOTX64.EFI on the same FAT partition (iPXE's sanboot under UEFI starts that file of the SAN disk).
# Its config (in GRUB's memdisk) finds the partition by a file on it: the SAN disk is the only disk.
GRUB_CFG = """set timeout=0
search --no-floppy --file /vmlinuz --set=root
echo BOOTFLEET-GRUB $root
linux /vmlinuz @APPEND@
initrd /initrd.lz4
boot
"""
GRUB_MODULES = "part_msdos fat search search_fs_file linux echo normal"
EFI_LOADER = "EFI/BOOT/BOOTX64.EFI"

SYSLINUX_CFG = """DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.lz4
  APPEND @APPEND@
"""

# The kernel command line. Under TCG every skipped probe and self-test counts; measured gains on this kernel:
# crypto self-tests and the kdf108/kprobe initcalls ~0.5 s, TSC calibration and the timer check ~0.3 s.
KERNEL_ARGS = " ".join([
    "console=ttyS0,115200", "quiet", "loglevel=3", "panic=-1", "rdinit=/init",
    "cryptomgr.notests", "initcall_blacklist=crypto_kdf108_init,init_kprobe_trace",
    "tsc=reliable", "no_timer_check", "i8042.noaux", "i8042.nokbd", "i8042.nopnp",
    "nokaslr", "mitigations=off", "rcupdate.rcu_expedited=1",
])


class ImageError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageError(f"{cmd[0]} is missing: install it (see deploy/system-deps.sh)") from exc
    if done.returncode != 0:
        raise ImageError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout


def kernel_package() -> str:
    """The versioned kernel package the metapackage depends on (e.g. linux-image-6.1.0-56-cloud-amd64)."""
    try:
        out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    except ImageError:
        out = ""
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)", out)
    if not m and os.geteuid() == 0:
        _run(["apt-get", "update", "-qq"])  # a fresh container has no package lists yet
        out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
        m = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)", out)
    if not m:
        raise ImageError(f"apt-cache depends {KERNEL_METAPACKAGE} names no kernel package:\n{out}")
    return m.group(1)


def download(package: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    os.chmod(debs, 0o777)  # apt drops to the _apt user when it can write here
    _run(["apt-get", "download", package], cwd=debs)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise ImageError(f"apt-get download {package} left no .deb in {debs}")
    return found[-1]


def extract(deb: Path, into: Path) -> Path:
    if not (into / ".done").exists():
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(into)])
        (into / ".done").touch()
    return into


def module_depends(ko: Path) -> list[str]:
    m = re.search(rb"\x00depends=([^\x00]*)\x00", ko.read_bytes())
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d] if m else []


def module_paths(kernel_root: Path) -> dict[str, Path]:
    return {p.stem.replace("-", "_"): p for p in kernel_root.glob("lib/modules/*/kernel/**/*.ko")}


def builtin_modules(kernel_root: Path) -> set[str]:
    names = set()
    for listing in kernel_root.glob("lib/modules/*/modules.builtin"):
        names.update(Path(line).stem.replace("-", "_") for line in listing.read_text().split())
    return names


def load_order(paths: dict[str, Path], wanted: list[str], builtin: set[str] = frozenset()) -> list[str]:
    """`wanted` and everything they depend on, each after its dependencies (what modprobe would do)."""
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name not in paths:
            raise ImageError(f"kernel module {name} (needed by {' <- '.join(chain) or 'MODULES'}) is not in the kernel package")
        for dep in module_depends(paths[name]):
            visit(dep, (name, *chain))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def shared_libs(binary: Path, package_root: Path | None = None) -> list[Path]:
    """The shared libraries (and the loader) a binary needs, as `ldd` resolves them on this Debian host;
    one the host lacks is taken from the binary's own package (`package_root`) when it ships it."""
    libs = []
    for line in _run(["ldd", str(binary)]).splitlines():
        missing = re.match(r"\s*(\S+) => not found", line)
        if missing:
            found = sorted(package_root.glob(f"**/{missing.group(1)}")) if package_root else []
            if not found:
                raise ImageError(f"{binary.name} needs {missing.group(1)}, which neither this host nor its package has")
            libs.append(found[0])
            continue
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


class Cpio:
    """A `newc` cpio archive written in memory: the format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name_b = name.encode() + b"\0"
        header = b"070701" + b"".join(
            f"{v:08x}".encode()
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
        )
        self.ino += 1
        self.buf.write(header + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initramfs(busybox_root: Path, iscsi_root: Path, kernel_root: Path) -> bytes:
    paths = module_paths(kernel_root)
    modules = load_order(paths, MODULES, builtin_modules(kernel_root))
    cpio = Cpio()
    dirs: set[str] = set()

    def mkdirs(path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                cpio.dir(d)

    def add(path: str, data: bytes, mode: int = 0o644) -> None:
        mkdirs(path)
        cpio.file(path.lstrip("/"), data, mode)

    for d in ("proc", "sys", "dev", "tmp", "run", "etc", "bin", "sbin"):
        dirs.add(d)
        cpio.dir(d)
    busybox = busybox_root / "bin" / "busybox"
    if not busybox.exists():
        raise ImageError(f"{busybox} missing from busybox-static")
    add("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    init = INIT.replace("@MARKER@", MARKER).replace("@TOKEN_SECTOR@", str(TOKEN_SECTOR))
    init = init.replace("@MARK_SECTOR@", str(MARK_SECTOR))
    add("init", init.replace("@NONCE_SECTOR@", str(NONCE_SECTOR)).encode(), 0o755)

    iscsistart = next((p for p in (iscsi_root / "sbin/iscsistart", iscsi_root / "usr/sbin/iscsistart") if p.exists()), None)
    if iscsistart is None:
        raise ImageError(f"iscsistart missing from open-iscsi (looked in {iscsi_root})")
    add("sbin/iscsistart", iscsistart.read_bytes(), 0o755)
    for lib in shared_libs(iscsistart, iscsi_root):
        real = lib.resolve()
        if str(lib).startswith("/lib64/"):
            add(str(lib), real.read_bytes(), 0o755)  # the loader path is baked into the binary
        else:
            add(f"lib/x86_64-linux-gnu/{lib.name}", real.read_bytes(), 0o755)
    add("etc/iscsi/initiatorname.iscsi", b"InitiatorName=iqn.2026-11.org.bootfleet:lab-guest\n")
    add("etc/modules.order", ("\n".join(modules) + "\n").encode())
    for name in modules:
        add(f"lib/modules/{name}.ko", paths[name].read_bytes())
    # LZ4 (legacy frame, the kernel's RD_LZ4): unpacks several times faster than gzip under TCG, for 15 % more bytes
    done = subprocess.run(["lz4", "-l", "-9", "-q", "-c"], input=cpio.finish(), capture_output=True)
    if done.returncode != 0:
        raise ImageError(f"lz4 -l failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


MBR = "/usr/lib/syslinux/mbr/mbr.bin"
_TOOLS = {
    "apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg", "ldd": "libc-bin", "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools", "mcopy": "mtools", "mmd": "mtools", "syslinux": "syslinux", "lz4": "lz4",
    "grub-mkstandalone": "grub-common",
}
GRUB_EFI_DIR = "/usr/lib/grub/x86_64-efi"


def check_tools() -> list[str]:
    """What is missing to build the boot disk, naming the Debian package of each."""
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in _TOOLS.items() if shutil.which(tool) is None]
    if not Path(MBR).exists():
        missing.append(f"{MBR} (Debian package syslinux-common)")
    if not Path(GRUB_EFI_DIR, "linux.mod").exists():
        missing.append(f"{GRUB_EFI_DIR} (Debian package grub-efi-amd64-bin: the disk's UEFI boot path)")
    return missing


def _fingerprint(debs: list[Path]) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    for deb in debs:
        h.update(deb.name.encode())
    for tool in ("/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/syslinux/modules/bios/ldlinux.c32",
                 f"{GRUB_EFI_DIR}/linux.mod"):
        h.update(Path(tool).read_bytes() if Path(tool).exists() else b"-")
    return h.hexdigest()[:16]


def build(cache: Path = CACHE, log=print) -> Path:
    """Build (or reuse) the boot disk and return its path. The caller copies it before writing to it.

    Serialised by a lock file: a test and a bench started together share one build."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(cache, log)


def _build(cache: Path, log) -> Path:
    missing = check_tools()
    if missing:
        raise ImageError("cannot build the boot disk; missing: " + "; ".join(missing))
    mbr = Path(MBR)
    debs_dir = cache / "debs"
    kpkg = kernel_package()
    debs = [download(p, debs_dir) for p in (kpkg, "busybox-static", "open-iscsi")]
    disk = cache / f"boot-{_fingerprint(debs)}.img"
    if disk.exists():
        return disk
    log(f"lab: building the boot disk {disk.name} from {', '.join(d.name for d in debs)}")
    roots = [extract(deb, cache / "root" / deb.stem) for deb in debs]
    kernel_root, busybox_root, iscsi_root = roots
    vmlinuz = sorted(kernel_root.glob("boot/vmlinuz-*"))
    if not vmlinuz:
        raise ImageError(f"no boot/vmlinuz-* in {debs[0].name}")
    initrd = build_initramfs(busybox_root, iscsi_root, kernel_root)

    work = cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "syslinux.cfg").write_text(SYSLINUX_CFG.replace("@APPEND@", KERNEL_ARGS))
    (work / "initrd.lz4").write_bytes(initrd)
    shutil.copyfile(vmlinuz[-1], work / "vmlinuz")
    (work / "grub.cfg").write_text(GRUB_CFG.replace("@APPEND@", KERNEL_ARGS))
    _run(["grub-mkstandalone", "-O", "x86_64-efi", "-o", str(work / "BOOTX64.EFI"), f"--modules={GRUB_MODULES}",
          f"--install-modules={GRUB_MODULES} boot configfile", "--locales=", "--themes=", "--fonts=",
          f"boot/grub/grub.cfg={work / 'grub.cfg'}"])

    tmp = cache / f"{disk.name}.tmp"
    size = BOOT_DISK_MIB * 1024 * 1024
    with open(tmp, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(tmp)],
        input=f"label: dos\nstart={PARTITION_START}, type=6, bootable\n", text=True, check=True,
        capture_output=True,
    )
    part_kib = (size - PARTITION_START * SECTOR) // 1024
    _run(["mkfs.vfat", "-F", "16", "-n", "BOOTFLEET", f"--offset={PARTITION_START}", str(tmp), str(part_kib)])
    at = f"{tmp}@@{PARTITION_START * SECTOR}"
    files = [str(work / n) for n in ("syslinux.cfg", "vmlinuz", "initrd.lz4")]
    _run(["mcopy", "-i", at, *files, "::/"])
    _run(["mmd", "-i", at, "::/EFI", "::/EFI/BOOT"])
    _run(["mcopy", "-i", at, str(work / "BOOTX64.EFI"), f"::/{EFI_LOADER}"])
    _run(["syslinux", "--install", f"--offset={PARTITION_START * SECTOR}", str(tmp)])
    with open(tmp, "r+b") as f:
        f.write(mbr.read_bytes()[:440])  # boot code only: the partition table stays
    used = sum((work / n).stat().st_size for n in ("vmlinuz", "initrd.lz4"))
    log(f"lab: kernel + initramfs = {used / 1e6:.1f} MB on a {BOOT_DISK_MIB} MiB disk")
    for old in cache.glob("boot-*.img"):
        old.unlink()
    tmp.rename(disk)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(cache / "root", ignore_errors=True)  # ~500 MB of unpacked kernel modules; the .debs stay
    return disk


def write_token(disk: Path, token: str) -> None:
    """Put the token the guest must read back at `TOKEN_SECTOR`, and clear the nonce sector."""
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", token):
        raise ValueError(f"token {token!r}: 1..64 characters of A-Z a-z 0-9 -")
    with open(disk, "r+b") as f:
        f.seek(TOKEN_SECTOR * SECTOR)
        f.write(token.encode().ljust(SECTOR, b"\0"))
        f.write(b"\0" * SECTOR)


def parse_nonce(sector: bytes) -> str | None:
    """The nonce the guest wrote at `NONCE_SECTOR`, or None when the sector holds none."""
    m = re.match(rb"BOOTFLEET-NONCE ([0-9a-f]{32})\n", sector)
    return m.group(1).decode() if m else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    try:
        print(build(args.cache))
    except ImageError as exc:
        print(f"lab.image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
