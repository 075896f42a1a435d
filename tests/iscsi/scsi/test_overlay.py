"""The copy-on-write overlay (services/iscsi_target/scsi/overlay.py) against an in-memory model: Hypothesis
drives random writes, reads, UNMAPs, WRITE SAMEs, syncs and reopenings, both on the backstore and as SCSI
commands through a LogicalUnit; threads race partial writes into shared granules; a child process killed
with SIGKILL loses no synced write; the quota refuses before writing anything."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.iscsi_target.scsi.backstore import BackstoreError
from services.iscsi_target.scsi.overlay import BaseImage, Overlay, OverlayError, OverlayFull, open_base
from shared.images import overlay_format as F

from .helpers import (cdb16, data, get_lba_status, nexus, read6, read10, read16, ready_target, rw10, rw16,
                      unmap_cdb, unmap_params, write6, write10, write16)

KiB = 1024
NX = nexus()
ROOT = Path(__file__).resolve().parents[3]


def make_base(path: Path, size: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    content = bytearray(rnd.randbytes(size))
    content[size // 4: size // 4 + 64 * KiB] = bytes(64 * KiB)  # a run of zeros, as in any image
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, 0o444)
    return bytes(content)


def read_all(ov) -> bytes:
    return bytes(ov.read(0, ov.size))


# ---------------------------------------------------------------------------------------------- model test
# sizes: one whole number of 4 KiB granules and one that ends in a partial granule (a VHD's CHS size does)
SIZES = {4096: 256 * KiB, 65536: 512 * KiB + 1536}

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 10**9), st.integers(1, 70 * KiB), st.integers(0, 255)),
    st.tuples(st.just("write512"), st.integers(0, 10**9), st.integers(1, 20), st.integers(0, 255)),
    st.tuples(st.just("read"), st.integers(0, 10**9), st.integers(1, 140 * KiB)),
    st.tuples(st.just("unmap"), st.integers(0, 10**9), st.integers(1, 140 * KiB)),
    st.tuples(st.just("zeros"), st.integers(0, 10**9), st.integers(1, 40)),
    st.tuples(st.just("sync")),
    st.tuples(st.just("reopen")),
)


@pytest.mark.parametrize("granule", [4096, 65536])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=40))
def test_overlay_matches_a_model(tmp_path_factory, granule, ops):
    d = tmp_path_factory.mktemp("ov")
    size = SIZES[granule]
    model = bytearray(make_base(d / "v1.raw", size))
    ov = Overlay(d / "v1.raw", d / "pc.overlay", granule=granule, base_id="t@1")
    try:
        for o in ops:
            kind = o[0]
            if kind == "write":  # any byte offset and length, across granule boundaries
                off = o[1] % size
                n = min(o[2], size - off)
                buf = bytes([o[3]]) * n
                ov.write(off, buf)
                model[off:off + n] = buf
            elif kind == "write512":  # what a 512-byte-sector OS does
                off = (o[1] % (size // 512)) * 512
                n = min(o[2] * 512, size - off)
                buf = bytes([o[3], 255 - o[3]]) * (n // 2)
                ov.write(off, buf)
                model[off:off + n] = buf
            elif kind == "read":
                off = o[1] % size
                n = min(o[2], size - off)
                assert bytes(ov.read(off, n)) == model[off:off + n]
                assert b"".join(bytes(p) for p in ov.readv(off, n)) == model[off:off + n]
            elif kind == "unmap":
                off = (o[1] % (size // 512)) * 512
                n = min(o[2] // 512 * 512 or 512, size - off)
                ov.unmap(off, n)
                model[off:off + n] = bytes(n)  # LBPRZ: unmapped blocks read zeros, not the base
            elif kind == "zeros":
                off = (o[1] % (size // 512)) * 512
                n = min(o[2] * 512, size - off)
                ov.write_zeros(off, n)
                model[off:off + n] = bytes(n)
            elif kind == "sync":
                ov.sync()
            else:
                ov.close()
                ov = Overlay(d / "v1.raw", d / "pc.overlay", base_id="t@1")
            check_accounting(ov)
        assert read_all(ov) == model
        ov.close()
        ov = Overlay(d / "v1.raw", d / "pc.overlay", base_id="t@1")  # close syncs: all of it is back
        assert read_all(ov) == model
        check_accounting(ov)
    finally:
        ov.close()


def check_accounting(ov) -> None:
    """`used` is the allocated granules; the file's real blocks lie within them."""
    g = ov.granule
    assert ov.used == F.count(ov._alloc, 0, ov._granules) * g
    assert ov.allocated <= ov.used + g  # st_blocks: at most the granules counted (plus a partial last one)


# ---------------------------------------------------------------------------------------------- SCSI commands
cmd = st.one_of(
    st.tuples(st.sampled_from(["w6", "w10", "w16"]), st.integers(0, 511), st.integers(1, 24), st.integers(0, 255)),
    st.tuples(st.sampled_from(["r6", "r10", "r16"]), st.integers(0, 511), st.integers(1, 64)),
    st.tuples(st.sampled_from(["ws10", "ws16", "ws10u", "ws16u", "ws16ndob"]), st.integers(0, 511),
              st.integers(1, 40), st.integers(0, 255)),
    st.tuples(st.just("unmap"), st.integers(0, 511), st.integers(1, 40), st.integers(0, 511), st.integers(1, 9)),
    st.tuples(st.just("sync")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmds=st.lists(cmd, min_size=1, max_size=30))
def test_scsi_commands_on_an_overlay_match_a_model(tmp_path_factory, cmds):
    d = tmp_path_factory.mktemp("lun")
    size = 256 * KiB  # 512 blocks of 512 bytes
    model = bytearray(make_base(d / "v1.raw", size))
    ov = Overlay(d / "v1.raw", d / "pc.overlay")
    t = ready_target(ov)
    blocks = size // 512
    try:
        for c in cmds:
            kind = c[0]
            if kind in ("w6", "w10", "w16"):
                lba = c[1]
                n = min(c[2], blocks - lba)
                buf = bytes([c[3]]) * (n * 512)
                cdb = {"w6": write6, "w10": write10, "w16": write16}[kind](lba, n)
                assert t.execute(NX, 0, cdb, buf).status == 0
                model[lba * 512:(lba + n) * 512] = buf
            elif kind in ("r6", "r10", "r16"):
                lba = c[1]
                n = min(c[2], blocks - lba)
                cdb = {"r6": read6, "r10": read10, "r16": read16}[kind](lba, n)
                resp = t.execute(NX, 0, cdb, None)
                assert resp.status == 0 and data(resp) == model[lba * 512:(lba + n) * 512]
            elif kind.startswith("ws"):
                lba = c[1]
                n = min(c[2], blocks - lba)
                unmap = kind.endswith("u") or kind.endswith("ndob")
                flags = (0x08 if unmap else 0) | (0x01 if kind.endswith("ndob") else 0)
                pattern = bytes([c[3]]) * 512 if not kind.endswith("ndob") else None
                cdb = (rw16(0x93, lba, n, flags) if "16" in kind else rw10(0x41, lba, n, flags))
                assert t.execute(NX, 0, cdb, pattern).status == 0
                model[lba * 512:(lba + n) * 512] = bytes(n * 512) if unmap else pattern * n
            elif kind == "unmap":
                ranges = [(c[1], min(c[2], blocks - c[1])), (c[3], min(c[4], blocks - c[3]))]
                params = unmap_params(*ranges)
                assert t.execute(NX, 0, unmap_cdb(len(params)), params).status == 0
                for lba, n in ranges:
                    model[lba * 512:(lba + n) * 512] = bytes(n * 512)
            else:
                assert t.execute(NX, 0, cdb16(0x35), None).status == 0
        resp = t.execute(NX, 0, read16(0, blocks), None)
        assert data(resp) == model
        resp = t.execute(NX, 0, get_lba_status(0), None)
        assert resp.status == 0
    finally:
        ov.close()


# ---------------------------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("granule", [4096, 65536])
def test_concurrent_partial_writes_into_shared_granules_all_land(tmp_path, granule):
    """Threads write disjoint 512-byte sectors of the same unowned granules at once: each one's read-modify-
    write must not put the base back over another's sector (the per-granule stripe lock)."""
    size = 2048 * KiB
    base = make_base(tmp_path / "v1.raw", size)
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", granule=granule)
    model = bytearray(base)
    sectors = list(range(size // 512))
    random.Random(7).shuffle(sectors)
    threads_n = 8
    shares = [sectors[i::threads_n] for i in range(threads_n)]
    start = threading.Barrier(threads_n)

    def worker(i):
        start.wait()
        for s in shares[i]:
            ov.write(s * 512, bytes([i + 1]) * 512)

    for i in range(threads_n):
        for s in shares[i]:
            model[s * 512:(s + 1) * 512] = bytes([i + 1]) * 512
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert read_all(ov) == model
    finally:
        ov.close()


def test_concurrent_overlapping_writes_leave_one_of_them_per_sector(tmp_path):
    """Overlapping writes in flight at once: each 512-byte sector ends up holding one whole write's data."""
    size = 256 * KiB
    make_base(tmp_path / "v1.raw", size)
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay")
    start = threading.Barrier(6)

    def worker(i):
        rnd = random.Random(i)
        start.wait()
        for _ in range(300):
            off = rnd.randrange(0, size // 512 - 20) * 512
            ov.write(off, bytes([i + 1]) * (rnd.randrange(1, 20) * 512))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        content = read_all(ov)
        original = open(tmp_path / "v1.raw", "rb").read()
        for s in range(0, size, 512):
            sector = content[s:s + 512]
            assert sector == original[s:s + 512] or sector == bytes([sector[0]]) * 512
    finally:
        ov.close()


# ---------------------------------------------------------------------------------------------- quota
def test_quota_refuses_before_writing_anything(tmp_path):
    base = make_base(tmp_path / "v1.raw", 256 * KiB)
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", quota=16 * KiB)
    try:
        ov.write(0, b"a" * 12 * KiB)   # 3 granules
        before, used, blocks = read_all(ov), ov.used, ov.allocated
        with pytest.raises(OverlayFull) as exc:
            ov.write(60 * KiB, b"b" * 8 * KiB)  # 2 new granules: 5 > 4
        assert exc.value.reason == "quota" and exc.value.needed == 8 * KiB and exc.value.limit == 16 * KiB
        assert read_all(ov) == before and ov.used == used and ov.allocated == blocks
        ov.write(0, b"c" * 12 * KiB)   # rewriting allocated granules needs no space
        ov.write(100, b"d" * 10)       # nor does a partial write into one
        ov.unmap(0, 8 * KiB)            # gives two back
        ov.write(60 * KiB, b"b" * 8 * KiB)
        assert ov.used == 12 * KiB  # 3 - 2 + 2 granules
        assert bytes(ov.read(60 * KiB, 8 * KiB)) == b"b" * 8 * KiB
        assert bytes(ov.read(0, 8 * KiB)) == bytes(8 * KiB) and bytes(ov.read(8 * KiB, 4 * KiB)) == b"c" * 4 * KiB
        assert bytes(ov.read(200 * KiB, 4 * KiB)) == base[200 * KiB:204 * KiB]
    finally:
        ov.close()


def test_soft_threshold_fires_once_and_rearms_after_unmap(tmp_path):
    make_base(tmp_path / "v1.raw", 256 * KiB)
    seen = []
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", quota=64 * KiB, soft_threshold=32 * KiB,
                 on_threshold=lambda o: seen.append(o.used))
    try:
        ov.write(0, b"a" * 28 * KiB)
        assert not ov.threshold_crossed and seen == []
        ov.write(28 * KiB, b"a" * 8 * KiB)
        assert ov.threshold_crossed and seen == [36 * KiB]
        ov.write(40 * KiB, b"a" * 4 * KiB)
        assert seen == [36 * KiB]        # once per crossing
        ov.unmap(0, 40 * KiB)
        assert not ov.threshold_crossed
        ov.write(0, b"a" * 40 * KiB)
        assert seen == [36 * KiB, 44 * KiB]
    finally:
        ov.close()


def test_space_guard_refusal_is_overlay_full_with_reason_reserve(tmp_path):
    make_base(tmp_path / "v1.raw", 256 * KiB)
    asked = []
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", space_guard=lambda n: asked.append(n) or False)
    try:
        with pytest.raises(OverlayFull) as exc:
            ov.write(512, b"x" * 512)
        # a chunk of the reserve first, then just the granule the write needs
        assert exc.value.reason == "reserve" and asked == [1 << 20, 4096] and ov.used == 0 and ov.allocated == 0
    finally:
        ov.close()


def test_the_reserve_is_claimed_a_chunk_at_a_time_and_exactly_near_its_end(tmp_path):
    make_base(tmp_path / "v1.raw", 4 << 20)
    budget = [(1 << 20) + 8 * KiB]  # a guard with one chunk and two granules left
    asked = []

    def guard(n):
        asked.append(n)
        if n > budget[0]:
            return False
        budget[0] -= n
        return True

    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", space_guard=guard)
    try:
        for g in range(256):  # one chunk: 256 granules, one ask
            ov.write(g * 4 * KiB, b"a" * 4 * KiB)
        assert asked == [1 << 20]
        ov.write(256 * 4 * KiB, b"b" * 8 * KiB)  # the chunk is refused; the two granules are not
        assert asked[1:] == [1 << 20, 8 * KiB] and budget[0] == 0
        with pytest.raises(OverlayFull) as exc:
            ov.write(258 * 4 * KiB, b"c" * 512)
        assert exc.value.reason == "reserve" and ov.used == 258 * 4 * KiB
        assert ov.read(258 * 4 * KiB, 512) == bytes(ov.base.read(258 * 4 * KiB, 512))  # nothing was written
        ov.write(0, b"z" * 4 * KiB)  # a rewrite of an allocated granule needs no space
    finally:
        ov.close()


# ---------------------------------------------------------------------------------------------- durability
def test_sync_makes_data_durable_before_the_bitmap_that_names_it(tmp_path, monkeypatch):
    make_base(tmp_path / "v1.raw", 256 * KiB)
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay")
    calls = []
    real_sync, real_pwrite = os.fdatasync, os.pwrite
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(("fdatasync", fd)), real_sync(fd))[1])
    monkeypatch.setattr(os, "pwrite", lambda fd, b, o: (calls.append(("pwrite", fd)), real_pwrite(fd, b, o))[1])
    try:
        ov.write(4096, b"x" * 4096)
        calls.clear()
        ov.sync()
        assert calls == [("fdatasync", ov._fd), ("pwrite", ov._bm_fd), ("fdatasync", ov._bm_fd)]
        calls.clear()
        ov.write(4096, b"y" * 4096)  # an owned granule: nothing new for the bitmap
        ov.sync()
        assert calls == [("pwrite", ov._fd), ("fdatasync", ov._fd)]
    finally:
        monkeypatch.undo()
        ov.close()


def test_discard_mode_writes_the_bitmap_but_never_fsyncs(tmp_path, monkeypatch):
    make_base(tmp_path / "v1.raw", 256 * KiB)
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", durable=False)
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    try:
        ov.write(0, b"x" * 8192)
        ov.sync()
        assert synced == []
        ov.close()
        monkeypatch.undo()
        ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", durable=False)  # a restarted target
        assert bytes(ov.read(0, 8192)) == b"x" * 8192
    finally:
        monkeypatch.undo()
        ov.close()


def test_unsynced_data_outside_the_bitmap_is_punched_away_at_reopen(tmp_path):
    """What a crash leaves: data in the file the bitmap never named. It reads as the base and costs nothing."""
    base = make_base(tmp_path / "v1.raw", 256 * KiB)
    Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay").close()
    with open(tmp_path / "pc.overlay", "r+b") as f:
        f.seek(64 * KiB)
        f.write(b"z" * 16 * KiB)
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay")
    try:
        assert read_all(ov) == base and ov.used == 0 and ov.allocated == 0
    finally:
        ov.close()


CHILD = r"""
import os, random, sys
sys.path.insert(0, sys.argv[1])
from services.iscsi_target.scsi.backstore import BackstoreError
from services.iscsi_target.scsi.overlay import Overlay
base, path, seed = sys.argv[2], sys.argv[3], int(sys.argv[4])
ov = Overlay(base, path, base_id="crash@1")
rnd = random.Random(seed)
slots = list(range(ov.size // 8192))
rnd.shuffle(slots)            # every write lands in an 8 KiB slot no other write touches
i = 0
out = sys.stdout
while slots:
    slot = slots.pop()
    skip = rnd.randrange(16)
    n = rnd.randint(1, 16 - skip)
    first = slot * 16 + skip
    ov.write(first * 512, (b"%08d" % i) * (64 * n))
    out.write("wrote %d %d %d\n" % (i, first, n)); out.flush()
    if i % 7 == 6 and rnd.random() < 0.5:
        ov.sync()
        out.write("synced %d\n" % i); out.flush()
    i += 1
"""


def test_kill_9_loses_no_synced_write(tmp_path, procs):
    """A child writes (partial granules and whole ones) and syncs; SIGKILL by its PID mid-stream; the reopened
    overlay holds every write acknowledged by a sync, and every other sector is either the base's or a whole
    write of its own."""
    size = 8 * 1024 * KiB
    base = make_base(tmp_path / "v1.raw", size)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(tmp_path / "v1.raw"),
                             str(tmp_path / "pc.overlay"), "5"], stdout=subprocess.PIPE, text=True)
    procs.procs.append(proc)
    writes, synced_upto = {}, -1
    for line in proc.stdout:
        parts = line.split()
        if parts[0] == "wrote":
            writes[int(parts[1])] = (int(parts[2]), int(parts[3]))
        else:
            synced_upto = int(parts[1])
        if synced_upto >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for line in proc.stdout:  # whatever it printed before it died
        parts = line.split()
        if parts[0] == "wrote":
            writes[int(parts[1])] = (int(parts[2]), int(parts[3]))
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", base_id="crash@1")
    try:
        content = read_all(ov)
        for i, (first, n) in writes.items():
            got = content[first * 512:(first + n) * 512]
            if i <= synced_upto:
                assert got == (b"%08d" % i) * (64 * n), f"synced write {i} lost"
        written = set()
        for i, (first, n) in writes.items():
            written.update(range(first, first + n))
        for s in range(size // 512):
            if s not in written:
                sector = content[s * 512:(s + 1) * 512]
                # an unlogged write (the one in flight at the kill) may be there; else the base
                assert sector == base[s * 512:(s + 1) * 512] or sector == sector[:8] * 64
    finally:
        ov.close()


class PowerLossDisk:
    """Records every pwrite, pwritev, punched hole and fdatasync of two files (wrapping os and the overlay's
    hole punch) with the model's state at that moment. `states()` then gives, for a power loss after each
    call in turn, what the files hold: everything up to each file's last fdatasync, plus a random subset
    of the 512-byte sectors written after it (a write may be torn)."""

    def __init__(self, monkeypatch, fds, model, rnd: random.Random):
        import services.iscsi_target.scsi.overlay as mod
        self.fds, self.model, self.rnd = set(fds), model, rnd
        self.start = {fd: bytes(os.pread(fd, os.fstat(fd).st_size, 0)) for fd in fds}
        self.trace = []  # (op, fd, offset, data, model state when the call was made)
        real_pwrite, real_pwritev, real_sync, real_punch = os.pwrite, os.pwritev, os.fdatasync, mod._punch

        def record(op, fd, off=0, data=b""):
            if fd in self.fds:
                self.trace.append((op, fd, off, data, self.model()))

        def pwrite(fd, data, off):
            n = real_pwrite(fd, data, off)
            record("w", fd, off, bytes(data[:n]))
            return n

        def pwritev(fd, bufs, off):
            n = real_pwritev(fd, bufs, off)
            record("w", fd, off, b"".join(bytes(b) for b in bufs)[:n])
            return n

        def fdatasync(fd):
            real_sync(fd)
            record("s", fd)

        def punch(fd, off, length):
            real_punch(fd, off, length)
            record("w", fd, off, bytes(length))

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(mod, "_punch", punch)

    @staticmethod
    def _apply(buf: bytearray, off: int, data: bytes) -> None:
        if off + len(data) > len(buf):
            buf.extend(bytes(off + len(data) - len(buf)))
        buf[off:off + len(data)] = data

    def states(self, final_model):
        """(files after the loss: fd -> bytes, the model then) for a loss before call k, k = 0..len."""
        for k in range(len(self.trace) + 1):
            model = self.trace[k][4] if k < len(self.trace) else final_model
            durable = {fd: bytearray(b) for fd, b in self.start.items()}
            pending = {fd: [] for fd in self.fds}
            for op, fd, off, data, _ in self.trace[:k]:
                if op == "s":
                    for o, d in pending[fd]:
                        self._apply(durable[fd], o, d)
                    pending[fd] = []
                else:
                    pending[fd].append((off, data))
            for fd in self.fds:
                for off, data in pending[fd]:
                    for x in range(0, len(data), 512):
                        if self.rnd.random() < 0.5:
                            self._apply(durable[fd], off + x, data[x:x + 512])
            yield {fd: bytes(b) for fd, b in durable.items()}, model


pl_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 255), st.integers(1, 24)),
    st.tuples(st.just("unmap"), st.integers(0, 255), st.integers(1, 40)),
    st.tuples(st.just("sync")),
)


@pytest.mark.parametrize("granule", [4096, 65536])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(pl_op, min_size=1, max_size=24), seed=st.integers(0, 1000))
def test_power_loss_keeps_every_synced_write(tmp_path_factory, monkeypatch, granule, ops, seed):
    """A simulated power loss after every single write or flush of the run in turn (inside sync() too):
    reopened, every sector holds what it held at the last completed sync, or one of the values written
    to it since; nothing else."""
    d = tmp_path_factory.mktemp("pl")
    size = 128 * KiB
    base = make_base(d / "v1.raw", size)
    ov = Overlay(d / "v1.raw", d / "pc.overlay", granule=granule)
    sectors = size // 512
    state = {"acked": [base[s * 512:(s + 1) * 512] for s in range(sectors)], "since": [set() for _ in range(sectors)]}
    current = list(state["acked"])

    def model():
        return state["acked"], [set(x) for x in state["since"]]

    with monkeypatch.context() as mp:
        disk = PowerLossDisk(mp, (ov._fd, ov._bm_fd), model, random.Random(seed))
        for i, o in enumerate(ops):
            if o[0] == "write":
                first, n = o[1], min(o[2], sectors - o[1])
                fill = (b"%06d" % i).ljust(8, b"w") * 64
                for x in range(first, first + n):
                    state["since"][x].add(fill)
                    current[x] = fill
                ov.write(first * 512, fill * n)
            elif o[0] == "unmap":
                first, n = o[1], min(o[2], sectors - o[1])
                for x in range(first, first + n):
                    state["since"][x].add(bytes(512))
                    current[x] = bytes(512)
                ov.unmap(first * 512, n * 512)
            else:
                ov.sync()
                state["acked"], state["since"] = list(current), [set() for _ in range(sectors)]
    data_fd, bm_fd = ov._fd, ov._bm_fd
    ov.close()
    for files, (acked, since) in disk.states(model()):
        (d / "lost.overlay").write_bytes(files[data_fd])
        (d / "lost.bitmap").write_bytes(files[bm_fd])
        ov2 = Overlay(d / "v1.raw", d / "lost.overlay")
        try:
            content = read_all(ov2)
        finally:
            ov2.close()
        for x in range(sectors):
            got = content[x * 512:(x + 1) * 512]
            assert got == acked[x] or got in since[x], f"sector {x}: {got[:8]!r}"


# ---------------------------------------------------------------------------------------------- the base, misc
def test_every_overlay_on_a_version_reads_one_mapping(tmp_path):
    make_base(tmp_path / "v1.raw", 256 * KiB)
    a = Overlay(tmp_path / "v1.raw", tmp_path / "a.overlay")
    b = Overlay(tmp_path / "v1.raw", tmp_path / "b.overlay")
    try:
        assert a.base is b.base and a.base.refs == 2
        a.write(0, b"a" * 4096)
        assert bytes(b.read(0, 4096)) != b"a" * 4096
        view = b.read(8192, 4096)
        assert isinstance(view, memoryview) and view.obj is b.base.map  # no copy: a slice of the mapping
        view.release()
    finally:
        a.close()
        assert b.base.refs == 1
        b.close()


def test_overlay_refuses_the_wrong_base_and_resizing(tmp_path):
    make_base(tmp_path / "v1.raw", 256 * KiB)
    make_base(tmp_path / "v2.raw", 128 * KiB, seed=2)
    Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", base_id="img@1").close()
    with pytest.raises(OverlayError, match="sits on 'img@1', not 'img@2'"):
        Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay", base_id="img@2")
    with pytest.raises(OverlayError, match="262144-byte disk, the base .* is 131072 bytes"):
        Overlay(tmp_path / "v2.raw", tmp_path / "pc.overlay")
    with pytest.raises(OverlayError, match="does not exist"):
        Overlay(tmp_path / "v1.raw", tmp_path / "new.overlay", create=False)
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay")
    try:
        with pytest.raises(BackstoreError, match="cannot be resized"):
            ov.resize(512 * KiB)
    finally:
        ov.close()


def test_a_base_image_alone_is_a_read_only_backstore(tmp_path):
    content = make_base(tmp_path / "v1.raw", 256 * KiB)
    base = BaseImage(tmp_path / "v1.raw")
    t = ready_target(base)
    try:
        assert data(t.execute(NX, 0, read10(8, 8), None)) == content[4096:8192]
        resp = t.execute(NX, 0, write10(0, 1), b"x" * 512)
        assert resp.status == 2 and resp.sense[2] & 0x0F == 0x7  # DATA PROTECT
    finally:
        base.close()


def test_get_lba_status_of_an_overlay(tmp_path):
    make_base(tmp_path / "v1.raw", 256 * KiB)
    ov = Overlay(tmp_path / "v1.raw", tmp_path / "pc.overlay")
    try:
        ov.unmap(64 * KiB, 32 * KiB)
        ov.write(128 * KiB, b"w" * 4096)
        assert ov.mapped(0) == (True, 64 * KiB)
        assert ov.mapped(64 * KiB) == (False, 32 * KiB)
        assert ov.mapped(128 * KiB) == (True, 4096)
        assert ov.mapped(128 * KiB + 4096)[0] is True
    finally:
        ov.close()


def test_open_base_shares_and_releases(tmp_path):
    make_base(tmp_path / "v1.raw", 64 * KiB)
    a = open_base(tmp_path / "v1.raw")
    b = open_base(tmp_path / "v1.raw")
    assert a is b and a.refs == 2
    a.close()
    b.close()
    c = open_base(tmp_path / "v1.raw")
    assert c is not a
    c.close()
