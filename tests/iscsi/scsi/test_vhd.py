"""VHD and VHDX backstores: what we read equals qemu's reading of the same file (fixed, dynamic, with and
without force_size, VHDX); what we write qemu reads back (fixed, dynamic); differencing chains three deep
against a model (qemu is no oracle there: it reads a differencing VHD as if it had no parent); corrupt
files refused naming the field; crashes between the allocation steps leave a file that opens and reads
the old contents. qemu-img and qemu-io (Debian qemu-utils) are required: a missing tool fails the test."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.iscsi_target.scsi import vhd as V
from services.iscsi_target.scsi import vhd_backstore as VB
from services.iscsi_target.scsi.backstore import BackstoreError
from services.iscsi_target.scsi.vhd_backstore import (VhdBackstore, create_differencing, create_dynamic,
                                                      create_fixed, open_image)
from services.iscsi_target.scsi.vhdx_backstore import VhdxBackstore
from support import tool

MiB = 1 << 20



def run(*args) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def qemu_raw(path, fmt: str, tmp_path) -> bytes:
    out = tmp_path / (os.path.basename(path) + ".raw")
    run(tool("qemu-img"), "convert", "-f", fmt, "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_io(path, fmt: str, *writes) -> None:
    """writes: (offset, length, pattern byte), done by qemu-io."""
    args = [tool("qemu-io"), "-f", fmt]
    for offset, length, pattern in writes:
        args += ["-c", f"write -P {pattern:#x} {offset} {length}"]
    run(*args, str(path))


def whole(store) -> bytes:
    return bytes(store.read(0, store.size))


QEMU_WRITES = [(0, 4096, 0x11), (MiB, 64 * 1024, 0xAB), (2 * MiB - 512, 8192, 0x5C),  # across a block edge
               (5 * MiB + 3584, 3 * MiB, 0x22), (40 * MiB, 512, 0x7E)]


# ---------------------------------------------------------------------------------------------- format units
def test_footer_and_header_round_trip_and_checksums():
    layout = V.dynamic_layout(10 * MiB, 1 * MiB)
    footer = V.parse_footer(layout.footer)
    assert (footer.disk_type, footer.current_size, footer.data_offset) == (V.DYNAMIC, 10 * MiB, 512)
    assert layout.head[:512] == layout.footer  # the copy at offset 0
    header = V.parse_dynamic_header(layout.head[512:1536])
    assert (header.table_offset, header.max_table_entries, header.block_size) == (1536, 10, MiB)
    assert list(V.parse_bat(layout.head[1536:], 10)) == [V.UNUSED] * 10
    bad = bytearray(layout.footer)
    bad[100] ^= 1
    with pytest.raises(V.VhdFormatError, match="footer checksum"):
        V.parse_footer(bad)
    bad = bytearray(layout.head[512:1536])
    bad[600] ^= 1
    with pytest.raises(V.VhdFormatError, match="dynamic header checksum"):
        V.parse_dynamic_header(bad)


def test_checksum_is_ones_complement_of_byte_sum():
    buf = bytes(range(256)) * 2
    assert V.checksum(buf, 64) == ~(sum(buf) - sum(buf[64:68])) & 0xFFFFFFFF


@given(st.binary(min_size=1, max_size=64), st.data())
def test_bitmap_helpers_against_a_bit_list(raw, data):
    n = len(raw) * 8
    first = data.draw(st.integers(0, n - 1))
    end = data.draw(st.integers(first + 1, n))
    bits = [(raw[i >> 3] >> (7 - (i & 7))) & 1 for i in range(n)]  # MSB first, as the spec says
    part = bits[first:end]
    expect = 1 if all(part) else 0 if not any(part) else -1
    assert V.bits_state(raw, first, end) == expect
    runs = list(V.bit_runs(raw, first, end))
    assert runs[0][1] == first and runs[-1][2] == end
    assert [b for present, a, e in runs for b in [int(present)] * (e - a)] == part
    bm = bytearray(raw)
    V.set_bits(bm, first, end)
    after = [(bm[i >> 3] >> (7 - (i & 7))) & 1 for i in range(n)]
    assert after == bits[:first] + [1] * (end - first) + bits[end:]


# ---------------------------------------------------------------------------------------------- qemu as the oracle
@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
@pytest.mark.parametrize("force_size", [False, True])
def test_reads_equal_qemu_convert(tmp_path, subformat, force_size):
    path = tmp_path / "q.vhd"
    opts = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    run(tool("qemu-img"), "create", "-q", "-f", "vpc", "-o", opts, str(path), "65M")
    qemu_io(path, "vpc", *QEMU_WRITES, (65 * MiB - 4096, 4096, 0x99))
    expect = qemu_raw(path, "vpc", tmp_path)
    store = open_image(path, readonly=True)
    try:
        assert store.kind == subformat
        if force_size:
            assert store.size == 65 * MiB  # not a multiple of the 2 MiB block: the last block is partial
        else:
            assert store.size > 65 * MiB  # qemu's CHS rounding, which it also writes as current_size
        assert store.size == len(expect)
        assert whole(store) == expect
        # a read across a block edge, and one inside a block, against the same bytes
        assert bytes(store.read(2 * MiB - 4096, 8192)) == expect[2 * MiB - 4096:2 * MiB + 4096]
        assert bytes(store.read(MiB, 65536)) == expect[MiB:MiB + 65536]
    finally:
        store.close()


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_what_we_write_qemu_reads(tmp_path, subformat):
    path = tmp_path / "w.vhd"
    run(tool("qemu-img"), "create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size=on", str(path),
        "24M")
    qemu_io(path, "vpc", (3 * MiB, 65536, 0x33))
    model = bytearray(qemu_raw(path, "vpc", tmp_path))
    rng = random.Random(14)
    store = open_image(path)
    try:
        for _ in range(200):
            sectors = rng.choice([1, 8, 128, 4096 + 8])
            offset = rng.randrange(0, len(model) // 512 - sectors) * 512
            data = rng.randbytes(sectors * 512)
            store.write(offset, data)
            model[offset:offset + len(data)] = data
            if rng.random() < 0.05:
                store.sync()
        assert whole(store) == bytes(model)
    finally:
        store.close()
    assert qemu_raw(path, "vpc", tmp_path) == bytes(model)
    again = open_image(path, readonly=True)
    try:
        assert whole(again) == bytes(model)
    finally:
        again.close()


def test_dynamic_vhd_we_create_qemu_reads(tmp_path):
    path = tmp_path / "ours.vhd"
    create_dynamic(path, 20 * MiB + 512 * 7)  # an odd size: qemu must honour current_size
    store = open_image(path)
    store.write(512 * 7, b"\x42" * 4096)
    store.write(20 * MiB, b"\x43" * 512 * 7)
    store.close()
    expect = bytearray(20 * MiB + 512 * 7)
    expect[512 * 7:512 * 7 + 4096] = b"\x42" * 4096
    expect[20 * MiB:] = b"\x43" * 512 * 7
    assert qemu_raw(path, "vpc", tmp_path) == bytes(expect)
    fixed = tmp_path / "ours-fixed.vhd"
    create_fixed(fixed, 4 * MiB)
    store = open_image(fixed)
    assert store.kind == "fixed"
    store.write(MiB, b"\x44" * 512)
    store.close()
    assert qemu_raw(fixed, "vpc", tmp_path) == bytes(MiB) + b"\x44" * 512 + bytes(3 * MiB - 512)


@pytest.mark.parametrize("opts", ["subformat=dynamic", "subformat=fixed", "block_size=1M,block_state_zero=off"])
def test_vhdx_read_only_equals_qemu(tmp_path, opts):
    path = tmp_path / "q.vhdx"
    run(tool("qemu-img"), "create", "-q", "-f", "vhdx", "-o", opts, str(path), "72M")
    qemu_io(path, "vhdx", *QEMU_WRITES, (72 * MiB - 512, 512, 0x99))
    expect = qemu_raw(path, "vhdx", tmp_path)
    store = open_image(path)
    try:
        assert isinstance(store, VhdxBackstore) and store.readonly
        assert whole(store) == expect
        assert bytes(store.read(8 * MiB - 4096, 8192)) == expect[8 * MiB - 4096:8 * MiB + 4096]
        with pytest.raises(BackstoreError, match="read-only"):
            store.write(0, bytes(512))
        assert store.mapped(MiB)[0] and not store.mapped(60 * MiB)[0]
    finally:
        store.close()


def test_vhdx_bat_with_sector_bitmap_entries(tmp_path):
    """1 MiB blocks and 512-byte sectors: a sector-bitmap BAT entry follows every 4096 payload entries, so
    blocks past 4 GiB are found only if the reader skips them."""
    path = tmp_path / "big.vhdx"
    run(tool("qemu-img"), "create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(path), "5G")
    far = 4096 * MiB + 3 * MiB
    qemu_io(path, "vhdx", (0, 4096, 0x11), (far - 4096, 65536, 0x22))
    store = open_image(path)
    try:
        assert store.size == 5 << 30
        assert bytes(store.read(0, 8192)) == b"\x11" * 4096 + bytes(4096)
        assert bytes(store.read(far - 8192, 73728)) == bytes(4096) + b"\x22" * 65536 + bytes(4096)
        assert not store.mapped(2 << 30)[0]
    finally:
        store.close()


def test_vhdx_with_a_log_to_replay_is_refused(tmp_path):
    path = tmp_path / "log.vhdx"
    run(tool("qemu-img"), "create", "-q", "-f", "vhdx", str(path), "16M")
    raw = bytearray(path.read_bytes())
    for at in (64 * 1024, 128 * 1024):
        raw[at + 48:at + 64] = b"\x01" * 16  # log_guid
        raw[at + 4:at + 8] = bytes(4)
        raw[at + 4:at + 8] = struct.pack("<I", crc32c.crc32c(bytes(raw[at:at + 4096])))
    path.write_bytes(raw)
    with pytest.raises(BackstoreError, match=r"log\.vhdx: header log_guid"):
        open_image(path)
    raw[64 * 1024 + 100] ^= 1
    raw[128 * 1024 + 100] ^= 1
    path.write_bytes(raw)
    with pytest.raises(BackstoreError, match="header checksum"):
        open_image(path)


# ---------------------------------------------------------------------------------------------- differencing
class Chain:
    """A base made by qemu, differencing layers made by us, and a model of each layer's contents."""

    def __init__(self, tmp_path, size=12 * MiB, block_size=None):
        self.dir = tmp_path
        self.size = size
        base = tmp_path / "base.vhd"
        run(tool("qemu-img"), "create", "-q", "-f", "vpc", "-o", "force_size=on", str(base), str(size))
        qemu_io(base, "vpc", (0, 8192, 0x10), (MiB + 512, 2 * MiB, 0x20))
        self.paths = [base]
        self.models = [bytearray(qemu_raw(base, "vpc", tmp_path))]
        self.block_size = block_size

    def add_layer(self) -> VhdBackstore:
        path = self.dir / f"layer{len(self.paths)}.vhd"
        create_differencing(path, self.paths[-1], block_size=self.block_size)
        self.paths.append(path)
        self.models.append(bytearray(self.models[-1]))
        return open_image(path)

    def write(self, store, rng, count=60, align=1):
        model = self.models[-1]
        for _ in range(count):
            sectors = rng.choice([1, 3, 8, 200]) * align
            offset = rng.randrange(0, (self.size // 512 - sectors) // align) * 512 * align
            data = rng.randbytes(sectors * 512)
            store.write(offset, data)
            model[offset:offset + len(data)] = data


def test_differencing_chain_three_deep_against_model(tmp_path):
    chain = Chain(tmp_path)
    rng = random.Random(3)
    for _ in range(3):
        store = chain.add_layer()
        assert store.kind == "differencing"
        assert whole(store) == bytes(chain.models[-2])  # a new layer shows its parent
        chain.write(store, rng)
        assert whole(store) == bytes(chain.models[-1])
        store.close()
    top = open_image(chain.paths[-1], readonly=True)
    try:
        assert whole(top) == bytes(chain.models[-1])
        assert top.parent.parent.parent.kind == "dynamic" and top.parent.parent.parent.parent is None
        # every layer below still reads as it was when the next was made
        for path, model in zip(chain.paths[1:], chain.models[1:]):
            layer = open_image(path, readonly=True)
            assert whole(layer) == bytes(model)
            layer.close()
        # GET LBA STATUS: mapped where any layer holds a block, unmapped beyond the base's data and writes
        assert top.mapped(0)[0]
    finally:
        top.close()


LIBVHDI = r"""
import sys, pyvhdi
files = []
for path in sys.argv[1:]:
    f = pyvhdi.file()
    f.open(path)
    files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
sys.stdout.buffer.write(files[0].read_buffer_at_offset(files[0].media_size, 0))
"""


def libvhdi_read(paths) -> bytes:
    """The top of a chain (paths from the top down to the base) as libvhdi reads it (Debian python3-libvhdi,
    for the system's python3: a second reader, independent of ours)."""
    python = shutil.which("python3", path="/usr/bin")
    assert python, "/usr/bin/python3 is missing"
    probe = subprocess.run([python, "-c", "import pyvhdi"], capture_output=True)
    assert probe.returncode == 0, "pyvhdi is missing (Debian python3-libvhdi; deploy/system-deps.sh installs it)"
    return subprocess.run([python, "-c", LIBVHDI, *map(str, paths)], check=True, capture_output=True).stdout


def test_differencing_chain_equals_libvhdi(tmp_path):
    """libvhdi follows parents itself; it reads 4 KiB-aligned data of a chain right (design.md), so the
    writes here are 4 KiB-aligned."""
    chain = Chain(tmp_path)
    rng = random.Random(7)
    for _ in range(3):
        store = chain.add_layer()
        chain.write(store, rng, 40, align=8)
        store.close()
    for depth in range(1, 4):
        layers = list(reversed(chain.paths[:depth + 1]))
        assert libvhdi_read(layers) == bytes(chain.models[depth]), f"layer {depth}"


def test_parent_found_relative_first_then_absolute(tmp_path):
    here = tmp_path / "a"
    here.mkdir()
    chain = Chain(here)
    rng = random.Random(5)
    store = chain.add_layer()
    chain.write(store, rng, 20)
    store.close()
    moved = tmp_path / "b"
    here.rename(moved)  # the absolute locator is now stale: only the relative one leads to the parent
    store = open_image(moved / "layer1.vhd", readonly=True)
    try:
        assert store.parent_path == str(moved / "base.vhd")
        assert whole(store) == bytes(chain.models[-1])
    finally:
        store.close()
    elsewhere = tmp_path / "c"
    elsewhere.mkdir()
    (moved / "layer1.vhd").rename(elsewhere / "layer1.vhd")  # now only the absolute locator is stale...
    create_differencing(tmp_path / "d.vhd", moved / "base.vhd")
    (tmp_path / "d.vhd").rename(elsewhere / "d.vhd")  # ...and here only the relative one is
    store = open_image(elsewhere / "d.vhd", readonly=True)
    try:
        assert store.parent_path == str(moved / "base.vhd")
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- corrupt files
def dynamic_file(tmp_path, name="c.vhd") -> tuple:
    path = tmp_path / name
    run(tool("qemu-img"), "create", "-q", "-f", "vpc", "-o", "force_size=on", str(path), "8M")
    qemu_io(path, "vpc", (MiB, 4096, 0x61), (5 * MiB, 4096, 0x62))
    return path, bytearray(path.read_bytes())


def refused(path, field):
    with pytest.raises(BackstoreError) as info:
        open_image(path)
    assert str(path) in str(info.value) and field in str(info.value), str(info.value)


def test_bad_footer_checksum_refused(tmp_path):
    path, raw = dynamic_file(tmp_path)
    raw[-512 + 70] ^= 0xFF  # inside the UUID: checksum no longer matches
    path.write_bytes(raw)
    refused(path, "footer checksum")


def test_bad_cookie_refused(tmp_path):
    path, raw = dynamic_file(tmp_path)
    raw[-512:-504] = b"notavhd!"
    raw[0:8] = b"notavhd!"
    path.write_bytes(raw)
    refused(path, "footer cookie")
    path, raw = dynamic_file(tmp_path, "h.vhd")
    raw[512:520] = b"cxsparsX"
    path.write_bytes(raw)
    refused(path, "dynamic header cookie")


def test_bad_dynamic_header_checksum_refused(tmp_path):
    path, raw = dynamic_file(tmp_path)
    raw[512 + 28] ^= 0x01  # max_table_entries
    path.write_bytes(raw)
    refused(path, "dynamic header checksum")


def test_bat_entry_beyond_file_end_refused(tmp_path):
    path, raw = dynamic_file(tmp_path)
    table = struct.unpack_from(">Q", raw, 512 + 16)[0]
    struct.pack_into(">I", raw, table + 4 * 3, len(raw) // 512 + 10)
    path.write_bytes(raw)
    refused(path, "BAT entry 3")


def test_bat_entries_overlapping_refused(tmp_path):
    path, raw = dynamic_file(tmp_path)
    table = struct.unpack_from(">Q", raw, 512 + 16)[0]
    first = struct.unpack_from(">I", raw, table)[0]
    used = [i for i in range(4) if struct.unpack_from(">I", raw, table + 4 * i)[0] != V.UNUSED]
    struct.pack_into(">I", raw, table + 4 * used[1], struct.unpack_from(">I", raw, table + 4 * used[0])[0])
    assert first
    path.write_bytes(raw)
    refused(path, f"BAT entry {used[1]}")


def test_parent_uuid_mismatch_and_missing_parent_refused(tmp_path):
    chain = Chain(tmp_path, size=4 * MiB)
    chain.add_layer().close()
    base, child = chain.paths
    # another base with the same name and size but another UUID
    base.unlink()
    run(tool("qemu-img"), "create", "-q", "-f", "vpc", "-o", "force_size=on", str(base), str(4 * MiB))
    refused(child, "parent_uuid")
    base.unlink()
    refused(child, "parent not found")


def test_differencing_child_refuses_a_parent_of_another_size(tmp_path):
    chain = Chain(tmp_path, size=4 * MiB)
    chain.add_layer().close()
    base, child = chain.paths
    raw = bytearray(base.read_bytes())
    uid = raw[68:84]
    base.unlink()
    run(tool("qemu-img"), "create", "-q", "-f", "vpc", "-o", "force_size=on", str(base), str(6 * MiB))
    other = bytearray(base.read_bytes())
    for at in (0, len(other) - 512):  # give it the old UUID (checksums fixed), so only the size differs
        other[at + 68:at + 84] = uid
        struct.pack_into(">I", other, at + 64, V.checksum(other[at:at + 512], 64))
    base.write_bytes(other)
    refused(child, "current_size")


# ---------------------------------------------------------------------------------------------- crashes
def crash_copy(store, tmp_path, name) -> str:
    """The file as a crash would leave it now: what the process wrote is in the page cache, so a copy sees
    exactly the writes done so far (a power cut could lose more, but only writes not yet synced, and the
    order of the synced ones is what the copies at each step check)."""
    out = tmp_path / name
    shutil.copyfile(store.path, out)
    return str(out)


def test_crash_between_allocation_steps_keeps_old_contents(tmp_path, monkeypatch):
    path, _ = dynamic_file(tmp_path)
    old = qemu_raw(path, "vpc", tmp_path)
    store = open_image(path)
    new_block = 3 * MiB + 4096  # block 1 is not allocated yet
    assert store.bat[new_block >> store.shift] == V.UNUSED
    store.write(new_block, b"\x77" * 8192)
    store.write(MiB, b"\x78" * 512)  # an overwrite in an allocated block
    # 1. data written, no bitmap, footer not moved, no BAT entry
    after_data = crash_copy(store, tmp_path, "after-data.vhd")
    # 2. bitmap and footer written, BAT not: stop the commit just before the BAT sectors
    monkeypatch.setattr(V, "pack_bat", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        store.sync()
    after_footer = crash_copy(store, tmp_path, "after-footer.vhd")
    monkeypatch.undo()
    store.sync()
    store.close()
    done = bytearray(old)
    done[new_block:new_block + 8192] = b"\x77" * 8192
    done[MiB:MiB + 512] = b"\x78" * 512
    for copy in (after_data, after_footer):
        crashed = open_image(copy, readonly=True)
        try:
            got = whole(crashed)
            # the new block is not there (old contents: zeros); the in-place overwrite may be
            assert got[new_block:new_block + 8192] == old[new_block:new_block + 8192]
            assert got[:MiB] == old[:MiB] and got[MiB + 512:] == old[MiB + 512:]
        finally:
            crashed.close()
        # opened for writing, the orphan is reused and reads right, for us and for qemu (which ignores bitmaps)
        again = open_image(copy)
        again.write(new_block + 8192, b"\x79" * 512)
        again.close()
        expect = bytearray(qemu_raw(copy, "vpc", tmp_path))
        assert expect[new_block:new_block + 8192] == bytes(8192)  # the orphan's data is gone, not resurrected
        assert expect[new_block + 8192:new_block + 8704] == b"\x79" * 512
        check = open_image(copy, readonly=True)
        assert whole(check) == bytes(expect)
        check.close()
    assert qemu_raw(path, "vpc", tmp_path) == bytes(done)


def test_bitmap_bits_reach_the_file_only_after_a_sync(tmp_path, monkeypatch):
    """The order of the durable steps: fdatasync before the bitmap, and before the BAT."""
    path = tmp_path / "o.vhd"
    create_dynamic(path, 8 * MiB)
    store = open_image(path)
    events = []
    real_sync, real_pwrite = os.fdatasync, VB._pwrite_all
    monkeypatch.setattr(VB.os, "fdatasync", lambda fd: (events.append("sync"), real_sync(fd))[1])

    def pwrite(fd, data, offset):
        kind = "data"
        if offset < 1536 + 512:
            kind = "bat"
        elif offset == store.free:
            kind = "footer"
        elif (offset - store.free + store.span) % store.span == 0 and len(data) == store.bm_size:
            kind = "bitmap"
        events.append(kind)
        real_pwrite(fd, data, offset)

    monkeypatch.setattr(VB, "_pwrite_all", pwrite)
    store.write(4096, b"\x01" * 4096)
    assert events == ["data"]
    store.sync()
    assert events == ["data", "sync", "bitmap", "footer", "sync", "bat", "sync"]
    events.clear()
    store.write(8192, b"\x02" * 512)  # new bits in an allocated block: data, then bitmap after a sync
    store.sync()
    assert events == ["data", "sync", "bitmap", "sync"]
    events.clear()
    store.write(8192, b"\x03" * 512)  # an overwrite: data and one fdatasync
    store.sync()
    assert events == ["data", "sync"]
    store.close()


# ---------------------------------------------------------------------------------------------- model property
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["write", "read", "sync", "reopen", "unmap"]),
                          st.integers(0, 255), st.integers(1, 40), st.integers(0, 255)), max_size=40),
       st.booleans())
def test_random_io_against_model(tmp_path_factory, ops, differencing):
    tmp = tmp_path_factory.mktemp("prop")
    size = 256 * 512
    base = tmp / "base.vhd"
    create_dynamic(base, size, block_size=8192)  # 16 sectors a block: many blocks, many edges
    model = bytearray(size)
    path = base
    if differencing:
        store = open_image(base)
        store.write(0, bytes([0xEE]) * size)
        model[:] = bytes([0xEE]) * size
        store.close()
        path = tmp / "child.vhd"
        create_differencing(path, base, block_size=4096)
    store = open_image(path)
    try:
        for op, sector, count, value in ops:
            count = min(count, 256 - sector)
            if not count:
                continue
            offset, length = sector * 512, count * 512
            if op == "write":
                store.write(offset, bytes([value]) * length)
                model[offset:offset + length] = bytes([value]) * length
            elif op == "read":
                assert bytes(store.read(offset, length)) == model[offset:offset + length]
            elif op == "unmap":
                store.unmap(offset, length)
                model[offset:offset + length] = bytes(length)
            elif op == "sync":
                store.sync()
            else:
                store.close()
                store = open_image(path)
        assert whole(store) == bytes(model)
    finally:
        store.close()


def test_resize_refused_and_readonly_writes_refused(tmp_path):
    path = tmp_path / "r.vhd"
    create_dynamic(path, 4 * MiB)
    store = open_image(path)
    with pytest.raises(BackstoreError, match="resize"):
        store.resize(8 * MiB)
    store.close()
    store = open_image(path, readonly=True)
    with pytest.raises(BackstoreError, match="read-only"):
        store.write(0, bytes(512))
    store.close()
    store = open_image(path)
    with pytest.raises(BackstoreError, match="whole sectors"):
        store.write(512, bytes(100))
    with pytest.raises(BackstoreError, match="whole sectors"):
        store.read(500, 512)
    store.close()


def test_a_vhd_has_one_writer_and_a_parent_none(tmp_path):
    base = tmp_path / "base.vhd"
    create_dynamic(base, 4 * MiB)
    writer = open_image(base)
    with pytest.raises(BackstoreError, match="in use"):
        open_image(base)
    with pytest.raises(BackstoreError, match="in use"):
        open_image(base, readonly=True)
    writer.close()
    create_differencing(tmp_path / "child.vhd", base)
    child = open_image(tmp_path / "child.vhd")
    with pytest.raises(BackstoreError, match="in use"):
        open_image(base)  # the child reads it
    reader = open_image(base, readonly=True)  # readers share it
    reader.close()
    child.close()
    open_image(base).close()


def test_mapped_reports_unallocated_blocks(tmp_path):
    path = tmp_path / "m.vhd"
    create_dynamic(path, 16 * MiB)
    store = open_image(path)
    store.write(4 * MiB, bytes(512))
    assert store.mapped(0) == (False, 4 * MiB)
    assert store.mapped(4 * MiB) == (True, 2 * MiB)
    assert store.mapped(6 * MiB) == (False, 10 * MiB)
    store.close()


def test_4096_byte_blocks_need_a_size_multiple(tmp_path):
    path = tmp_path / "odd.vhd"
    create_dynamic(path, 4 * MiB + 512)
    with pytest.raises(BackstoreError, match="current_size"):
        VhdBackstore(path, block_size=4096)
    assert VhdBackstore(path, block_size=512).size == 4 * MiB + 512


@pytest.mark.parametrize("remap_step", [0, 1 << 40])
def test_reads_of_blocks_allocated_after_the_mapping(tmp_path, monkeypatch, remap_step):
    """New blocks lie past the file's mapping: read through pread, or after a remap."""
    monkeypatch.setattr(VB, "REMAP_STEP", remap_step)
    path = tmp_path / "grow.vhd"
    create_dynamic(path, 32 * MiB)
    store = open_image(path)
    try:
        for i in range(12):
            store.write(i * 2 * MiB + 4096, bytes([i + 1]) * 65536)
            assert bytes(store.read(i * 2 * MiB + 4096, 65536)) == bytes([i + 1]) * 65536
        store.sync()
        for i in range(12):
            assert bytes(store.read(i * 2 * MiB, 69632)) == bytes(4096) + bytes([i + 1]) * 65536
    finally:
        store.close()


def test_threads_writing_disjoint_ranges(tmp_path):
    """Connections write from their own threads: allocations and bitmap updates stay consistent."""
    import threading

    path = tmp_path / "threads.vhd"
    create_dynamic(path, 64 * MiB, block_size=64 * 1024)
    store = open_image(path)
    errors = []

    def worker(n):
        rng = random.Random(n)
        try:
            for _ in range(300):
                sector = rng.randrange(0, 16 * MiB // 512 - 16)
                offset = n * 16 * MiB + sector * 512
                store.write(offset, bytes([n + 1]) * 4096)
                if rng.random() < 0.05:
                    store.sync()
                got = bytes(store.read(offset, 4096))
                if got != bytes([n + 1]) * 4096:
                    errors.append((n, offset))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store.close()
    again = open_image(path, readonly=True)
    try:
        data = whole(again)
        for n in range(4):
            part = data[n * 16 * MiB:(n + 1) * 16 * MiB]
            assert set(part) <= {0, n + 1} and part.count(n + 1) >= 4096
    finally:
        again.close()


def test_a_read_in_a_block_with_every_sector_present_is_a_slice_with_no_bitmap_look_up(tmp_path, monkeypatch):
    """The boot pattern's path: a 64 KiB read inside a full 2 MiB block costs a table look-up and a slice, as
    a raw LUN's read; a block with sectors missing still reads them through its bitmap (from the parent)."""
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    create_dynamic(base, 8 * MiB)
    b = VhdBackstore(base)
    b.write(0, b"P" * (4 * MiB))
    b.close()
    create_differencing(child, base)
    store = VhdBackstore(child)
    store.write(0, b"C" * (2 * MiB))  # block 0 full, block 1 one page
    store.write(2 * MiB, b"D" * 4096)
    store.close()
    store = VhdBackstore(child)  # its bitmaps from the file
    assert bytes(store.read(65536, 65536)) == b"C" * 65536  # first read: its bitmap loaded, found full
    assert bytes(store.read(2 * MiB, 8192)) == b"D" * 4096 + b"P" * 4096
    looked = []
    real = V.bits_state
    monkeypatch.setattr(V, "bits_state", lambda *a: looked.append(a[1:]) or real(*a))
    got = store.read(128 * 1024, 65536)
    assert isinstance(got, memoryview) and bytes(got) == b"C" * 65536 and looked == []  # no bitmap looked at
    got.release()  # a slice holds the mapping (and its flock) open
    assert bytes(store.read(2 * MiB, 8192)) == b"D" * 4096 + b"P" * 4096 and looked  # the partial block: bitmap
    looked.clear()
    store.write(2 * MiB + 4096, b"E" * (2 * MiB - 4096))  # fills block 1: it becomes a direct block too
    looked.clear()
    assert bytes(store.read(2 * MiB, 8192)) == b"D" * 4096 + b"E" * 4096 and looked == []
    assert bytes(store.read(2 * MiB - 4096, 8192)) == b"C" * 4096 + b"D" * 4096  # across two blocks: the long path
    store.close()
    reopened = VhdBackstore(child, readonly=True)
    assert bytes(reopened.read(2 * MiB, 8192)) == b"D" * 4096 + b"E" * 4096
    reopened.close()
