"""Block devices and partitions as backstores (scsi/block_device.py), on loop devices this test makes:
size and block sizes from the device, reads and writes landing where they should (a partition at its
offset in the disk), O_DIRECT, and the refusals: a mounted device, a device whose partition is mounted,
a device with a device-mapper holder (on a
fake sysfs tree: this kernel has no device-mapper), a device another program claims exclusively, the host's root.

Needs root and util-linux's losetup/partx, fdisk's sfdisk, e2fsprogs and dosfstools (deploy/system-deps.sh).
Every loop device is detached by the name the test got for it.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess

import pytest

from services.iscsi_target.scsi import BackstoreError
from services.iscsi_target.scsi.block_device import BlockBackstore

from .helpers import MiB, data, nexus, read10, read_capacity16, ready_target, write10
from support import tool

NX = nexus()



def run(*args, **kw) -> str:
    r = subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=60, **kw)
    assert r.returncode == 0, f"{args}: {r.stderr}"
    return r.stdout.strip()


@contextlib.contextmanager
def loop_device(image, *opts):
    dev = run("losetup", "-f", "--show", *opts, str(image))
    try:
        yield dev
    finally:
        subprocess.run([tool("losetup"), "-d", dev], timeout=30)


@contextlib.contextmanager
def partitioned(image):
    """A loop device over `image` with two GPT partitions (16 MiB and the rest) and their device nodes."""
    run("sfdisk", "-q", str(image), input="label: gpt\n,16M\n,\n")
    with loop_device(image, "-P") as dev:
        if not os.path.exists(dev + "p1"):  # this kernel does not scan at attach: add them from the table
            run("partx", "-a", dev)
        try:
            yield dev
        finally:
            subprocess.run([tool("partx"), "-d", dev], timeout=30)


@contextlib.contextmanager
def mounted(dev, point):
    point.mkdir(exist_ok=True)
    run("mount", dev, str(point))
    try:
        yield point
    finally:
        subprocess.run([tool("umount"), str(point)], timeout=30)


def sysfs(dev, item):
    with open(f"/sys/class/block/{os.path.basename(dev)}/{item}") as f:
        return int(f.read())


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(48 * MiB)
    return path


def test_a_loop_device_served_with_its_size_and_block_sizes(image):
    with loop_device(image) as dev:
        store = BlockBackstore(dev)
        try:
            assert store.size == 48 * MiB and store.block_size == sysfs(dev, "queue/logical_block_size") == 512
            assert store.physical_block_size == max(512, sysfs(dev, "queue/physical_block_size"))
            t = ready_target(store)
            assert t.execute(NX, 0, write10(100, 2, flags=0x08), b"\xab" * 1024).status == 0
            assert data(t.execute(NX, 0, read10(100, 2), None)) == b"\xab" * 1024
            cap = data(t.execute(NX, 0, read_capacity16(), None))
            last, bs = struct.unpack_from(">QI", cap)
            assert (last + 1, bs) == (48 * MiB // 512, 512)
            assert 1 << (cap[13] & 0x0F) == store.physical_block_size // 512
        finally:
            store.close()
        with open(image, "rb") as f:
            f.seek(100 * 512)
            assert f.read(1024) == b"\xab" * 1024  # it went through the device to the file behind it


def test_a_4096_byte_device_and_a_block_size_it_cannot_serve(image):
    with loop_device(image, "-b", "4096") as dev:
        store = BlockBackstore(dev)
        assert (store.block_size, store.blocks) == (4096, 48 * MiB // 4096)
        store.close()
        with pytest.raises(BackstoreError, match="smaller than, or not a multiple of, the device's logical block size 4096"):
            BlockBackstore(dev, block_size=512)


def test_physical_block_size_reaches_read_capacity_16_and_block_limits():
    from services.iscsi_target.scsi import RamBackstore

    store = RamBackstore(MiB)
    store.physical_block_size = 4096  # what BLKPBSZGET says of a 512e disk
    t = ready_target(store)
    cap = data(t.execute(NX, 0, read_capacity16(), None))
    assert cap[13] & 0x0F == 3  # 2**3 logical blocks per physical block
    b0 = data(t.execute(NX, 0, memoryview(bytes([0x12, 1, 0xB0, 0, 255, 0]).ljust(16, b"\0")), None))
    assert struct.unpack_from(">H", b0, 6)[0] == 8  # OPTIMAL TRANSFER LENGTH GRANULARITY


def test_a_partition_is_served_at_its_offset(image):
    with partitioned(image) as dev:
        part = dev + "p2"
        start, sectors = sysfs(part, "start"), sysfs(part, "size")
        store = BlockBackstore(part)
        try:
            assert store.size == sectors * 512
            t = ready_target(store)
            assert t.execute(NX, 0, write10(0, 1, flags=0x08), b"P2" * 256).status == 0
            last = store.blocks - 1
            assert t.execute(NX, 0, write10(last, 1, flags=0x08), b"EN" * 256).status == 0
            assert t.execute(NX, 0, read10(store.blocks, 1), None).status == 2  # past the partition's end
        finally:
            store.close()
        with open(image, "rb") as f:
            f.seek(start * 512)
            assert f.read(512) == b"P2" * 256
            f.seek((start + sectors - 1) * 512)
            assert f.read(512) == b"EN" * 256


def test_o_direct_reads_and_writes_through_aligned_buffers(image):
    with loop_device(image) as dev:
        store = BlockBackstore(dev, direct=True)
        try:
            assert os.get_blocking(store.fd)
            flags = int(open(f"/proc/self/fdinfo/{store.fd}").read().split("flags:")[1].split()[0], 8)
            assert flags & os.O_DIRECT
            payload = os.urandom(3 * 512)
            store.write(512 * 7, memoryview(payload))  # a memoryview of unaligned memory: copied to aligned
            store.sync()
            assert bytes(store.read(512 * 7, 3 * 512)) == payload
        finally:
            store.close()
        with open(image, "rb") as f:
            f.seek(512 * 7)
            assert f.read(3 * 512) == payload


def test_a_mirror_of_two_o_direct_devices_shares_a_stream_and_writes_both(tmp_path):
    """Two loop devices opened O_DIRECT as a mirror's legs: a sequential stream read through the SCSI layer
    is served by both devices (no readahead to keep on one), and every write lands on both devices. Real
    devices' times decide the share (two alike here, but a loaded machine can time one slower)."""
    from services.iscsi_target.scsi.mirror import MirrorBackstore

    images = [tmp_path / f"leg{i}.img" for i in (0, 1)]
    content = os.urandom(8 * MiB)
    for path in images:
        path.write_bytes(content)
    with loop_device(images[0]) as dev0, loop_device(images[1]) as dev1:
        legs = [BlockBackstore(dev, direct=True) for dev in (dev0, dev1)]
        served = [0, 0]
        for i, leg in enumerate(legs):
            leg.read = lambda o, n, r=leg.read, i=i: (served.__setitem__(i, served[i] + 1), r(o, n))[1]
        m = MirrorBackstore(legs)
        t = ready_target(m)
        try:
            for k in range(64):  # 64 KiB reads, one after the other
                r = t.execute(NX, 0, read10(k * 128, 128), None)
                assert r.status == 0 and data(r) == content[k * 65536:(k + 1) * 65536]
            # both devices serve the stream (kept on one leg, one would serve all 64): shared while their
            # timed reads are alike, else the slower still gets its first read and 1 in COLD_PROBE
            assert min(served) >= 3, served
            payload = os.urandom(32 * 512)
            assert t.execute(NX, 0, write10(2048, 32), payload).status == 0
            m.sync()
        finally:
            m.close()
    for path in images:
        with open(path, "rb") as f:
            f.seek(2048 * 512)
            assert f.read(32 * 512) == payload


def test_a_mounted_device_is_refused(image, tmp_path):
    with loop_device(image) as dev:
        run("mkfs.ext2", "-q", "-F", dev)  # (this kernel has no vfat)
        with mounted(dev, tmp_path / "mnt") as point:
            with pytest.raises(BackstoreError, match=f"{dev}: refused: it is mounted on {point}"):
                BlockBackstore(dev)
        BlockBackstore(dev).close()  # unmounted: served


def test_a_device_whose_partition_is_mounted_is_refused_the_other_partition_is_served(image, tmp_path):
    with partitioned(image) as dev:
        p1 = dev + "p1"
        run("mkfs.ext2", "-q", "-F", p1)
        with mounted(p1, tmp_path / "mnt") as point:
            name = os.path.basename(p1)
            with pytest.raises(BackstoreError, match=f"refused: its partition {name} is mounted on {point}"):
                BlockBackstore(dev)
            with pytest.raises(BackstoreError, match=f"refused: it is mounted on {point}"):
                BlockBackstore(p1)
            BlockBackstore(dev + "p2").close()


def test_a_device_with_a_device_mapper_or_md_holder_is_refused(tmp_path, monkeypatch):
    """This machine's kernel has neither device-mapper nor md, so the holder walk runs over a sysfs tree
    laid out as the kernel's: sdz, its partition sdz1, and dm-7 holding sdz1."""
    from services.iscsi_target.scsi import block_device as B

    sys_block = tmp_path / "class_block"
    for name, dev, parent in (("sdz", "240:0", None), ("sdz1", "240:1", "sdz"), ("dm-7", "240:7", None)):
        d = sys_block / name if parent is None else sys_block / parent / name
        (d / "holders").mkdir(parents=True)
        (d / "dev").write_text(dev + "\n")
        if parent:
            (d / "partition").write_text("1\n")
            (sys_block / name).symlink_to(d)
    (sys_block / "sdz" / "sdz1" / "holders" / "dm-7").symlink_to(sys_block / "dm-7")
    monkeypatch.setattr(B, "SYS_BLOCK", str(sys_block))
    monkeypatch.setattr(B, "_sys_name", lambda devno: "sdz" if devno == os.makedev(240, 0) else "sdz1")
    related = B.related_devices("sdz")
    assert related == {os.makedev(240, 0): "sdz", os.makedev(240, 1): "its partition sdz1",
                       os.makedev(240, 7): "dm-7 (a device-mapper/md device on sdz1)"}
    assert B.in_use("/dev/sdz", os.makedev(240, 0)) == "dm-7 (a device-mapper/md device on sdz1) is built on it"
    assert B.in_use("/dev/sdz1", os.makedev(240, 1)) == "dm-7 (a device-mapper/md device on sdz1) is built on it"


def test_a_device_another_program_holds_exclusively_is_refused(image):
    with loop_device(image) as dev:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
        try:
            with pytest.raises(BackstoreError, match="busy"):
                BlockBackstore(dev)
        finally:
            os.close(fd)


def test_the_hosts_root_device_and_non_devices_are_refused(tmp_path):
    root = os.stat("/").st_dev
    path = next((f"/dev/{e}" for e in os.listdir("/dev")
                 if os.path.exists(f"/dev/{e}") and os.stat(f"/dev/{e}").st_rdev == root
                 and not os.path.islink(f"/dev/{e}")), None)
    assert path, "no /dev node for the root file system's device"
    with pytest.raises(BackstoreError, match="refused: it holds the host's root file system"):
        BlockBackstore(path)
    (tmp_path / "f").write_bytes(bytes(4096))
    with pytest.raises(BackstoreError, match="not a block device"):
        BlockBackstore(tmp_path / "f")
    with pytest.raises(BackstoreError, match="cannot open"):
        BlockBackstore("/dev/does-not-exist")
