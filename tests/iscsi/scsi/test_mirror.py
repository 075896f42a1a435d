"""RAID-1 (scsi/mirror.py): a leg failing under concurrent load — a leg on a small tmpfs that fills up, a leg
file removed, injected I/O errors — is dropped with its callback while the LUN keeps serving; a resync
rebuilds it while writers keep writing; afterwards every acknowledged write reads back from both legs."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import threading
import time
from array import array

import pytest

from services.iscsi_target.scsi import RamBackstore
from services.iscsi_target.scsi import sense as S
from services.iscsi_target.scsi.backstore import BackstoreError
from services.iscsi_target.scsi.mirror import FAILED, IN_SYNC, MirrorBackstore, ResyncError
from services.iscsi_target.scsi.pread_file import PreadFileBackstore

from support import wait_for

from .helpers import MiB, data, key_asc, nexus, read10, ready_target, write10

BS = 512
SIZE = 8 * MiB
NX = nexus()


class FaultyLeg:
    """A leg wrapper that raises EIO on demand (reads, writes or syncs)."""

    def __init__(self, inner):
        self.inner = inner
        self.fail_reads = self.fail_writes = self.fail_sync = False
        self.fail_after_writes = None  # fail every write once this many more have succeeded
        self.size, self.block_size, self.readonly, self.thin = inner.size, inner.block_size, False, inner.thin
        self.write_through = False

    def read(self, offset, length):
        if self.fail_reads:
            raise OSError(errno.EIO, "injected read error")
        return self.inner.read(offset, length)

    def write(self, offset, data):
        if self.fail_after_writes is not None:
            if self.fail_after_writes <= 0:
                self.fail_writes = True
            self.fail_after_writes -= 1
        if self.fail_writes:
            raise OSError(errno.EIO, "injected write error")
        self.inner.write(offset, data)

    def sync(self):
        if self.fail_sync:
            raise OSError(errno.EIO, "injected sync error")
        self.inner.sync()

    def unmap(self, offset, length):
        self.write(offset, bytes(length))

    def mapped(self, offset):
        return self.inner.mapped(offset)

    def close(self):
        self.inner.close()


class Load:
    """Writer threads on disjoint blocks (thread t owns blocks b with b % threads == t), each write's
    content unique; `acked` keeps the last acknowledged content of every block."""

    def __init__(self, mirror, threads=4, blocks_per_write=(1, 16), sync_every=25, seed=1):
        self.mirror, self.threads, self.span, self.sync_every = mirror, threads, blocks_per_write, sync_every
        self.acked: dict[int, bytes] = {}
        self.errors: list = []
        self.count = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(t, seed + t), daemon=True) for t in range(threads)]

    def _run(self, t, seed):
        rnd = random.Random(seed)
        nblocks = self.mirror.blocks
        serial = 0
        while not self.stop.is_set():
            n = rnd.randint(*self.span)
            start = rnd.randrange(0, nblocks - n * self.threads) // self.threads * self.threads + t
            lbas = [start + k * self.threads for k in range(n)]
            blocks = {}
            for lba in lbas:  # one write per block (they are not contiguous), each acknowledged alone
                serial += 1
                payload = (f"t{t} lba{lba} #{serial} ".encode() * 40)[:BS]
                try:
                    self.mirror.write(lba * BS, payload)
                except Exception as exc:  # noqa: BLE001 - a refused write is not acknowledged
                    self.errors.append(exc)
                    continue
                blocks[lba] = payload
            with self._lock:
                self.acked.update(blocks)
                self.count += 1
                if self.count % self.sync_every == 0:
                    try:
                        self.mirror.sync()
                    except Exception as exc:  # noqa: BLE001
                        self.errors.append(exc)

    def __enter__(self):
        for w in self._workers:
            w.start()
        return self

    def wait_writes(self, n, timeout=30.0):
        import time
        deadline = time.monotonic() + timeout
        start = self.count
        while self.count < start + n:
            assert time.monotonic() < deadline, f"the writers made {self.count - start} of {n} writes"
            self.stop.wait(0.01)

    def __exit__(self, *exc):
        self.stop.set()
        for w in self._workers:
            w.join(10)


def check_both_legs(mirror, acked, legs=None):
    legs = legs or mirror.legs
    assert mirror.state == [IN_SYNC, IN_SYNC]
    for lba, payload in acked.items():
        for i, leg in enumerate(legs):
            got = bytes(leg.read(lba * BS, BS))
            assert got == payload, f"leg {i} block {lba}: {got[:24]!r} is not the acknowledged {payload[:24]!r}"


def events():
    dropped = []
    return dropped, lambda i, name, reason: dropped.append((i, name, reason))


# ---------------------------------------------------------------------------------------------- basics
def test_writes_reach_both_legs_and_reads_alternate():
    a, b = RamBackstore(MiB), RamBackstore(MiB)
    m = MirrorBackstore([a, b])
    m.write(4096, b"x" * 512)
    assert bytes(a.read(4096, 512)) == bytes(b.read(4096, 512)) == b"x" * 512
    seen = []
    a.read = lambda o, n, r=a.read: (seen.append("a"), r(o, n))[1]
    b.read = lambda o, n, r=b.read: (seen.append("b"), r(o, n))[1]
    for _ in range(4):
        assert bytes(m.read(4096, 512)) == b"x" * 512
    assert sorted(seen) == ["a", "a", "b", "b"]


def test_a_sequential_stream_stays_on_one_leg_random_reads_spread():
    a, b = RamBackstore(MiB), RamBackstore(MiB)
    m = MirrorBackstore([a, b])
    seen = []
    a.read = lambda o, n, r=a.read: (seen.append("a"), r(o, n))[1]
    b.read = lambda o, n, r=b.read: (seen.append("b"), r(o, n))[1]
    for k in range(8):
        m.read(k * 4096, 4096)
    assert len(set(seen)) == 1  # one stream, one leg
    seen.clear()
    for off in (900 * 512, 100 * 512, 1500 * 512, 40 * 512):
        m.read(off, 512)
    assert sorted(seen) == ["a", "a", "b", "b"]


class _Clock:
    """The mirror's clock in the tests of its leg choice: a leg's read advances it by the leg's delay, so the
    times it measures are exactly the legs' (a sleeping leg's are the machine's: 1 ms asleep is 1.0-1.5 ms)."""

    def __init__(self):
        self.ns = 1

    def perf_counter_ns(self):
        return self.ns


class _ColdLeg(RamBackstore):
    """A leg that never has a read's pages cached and takes `delay` seconds of `clock` a read (a disk of that
    speed)."""

    def __init__(self, size, delay, clock):
        super().__init__(size)
        self.delay, self.reads, self.clock = delay, 0, clock

    def read_warm(self, offset, length):
        return None

    def cached(self, offset, length):
        return False

    def read(self, offset, length):
        self.reads += 1
        self.clock.ns += int(self.delay * 1e9)
        return super().read(offset, length)


def test_a_read_goes_to_the_leg_that_has_its_pages_cached(tmp_path):
    legs = [PreadFileBackstore(tmp_path / f"leg{i}.img", SIZE) for i in (0, 1)]
    served = []
    for i, leg in enumerate(legs):  # which leg answers: from its trusted pages, or through read()
        leg.read_warm = lambda o, n, r=leg.read_warm, i=i: (lambda d: (d is not None and served.append(i), d)[1])(r(o, n))
        leg.read = lambda o, n, r=leg.read, i=i: (served.append(i), r(o, n))[1]
    m = MirrorBackstore(legs)
    content = random.Random(3).randbytes(SIZE // 2)
    m.write(0, content)
    offsets = [random.Random(7).randrange(0, SIZE // 2 - 4096) // 512 * 512 for _ in range(40)]
    for off in offsets:  # both warm: slices of a mapping, whichever leg (no pread, no disk)
        assert isinstance(m.read(off, 4096), memoryview)
    assert len(served) == 40
    legs[0]._warm[:] = array("d", bytes(8 * len(legs[0]._warm)))  # leg 0's cache went cold (a restart,
    legs[0]._resident = lambda offset, length: False              # a resync): it trusts nothing, has nothing
    legs[1]._warm[:] = array("d", bytes(8 * len(legs[1]._warm)))  # leg 1 is asked again: mincore
    served.clear()
    for off in offsets:
        assert bytes(m.read(off, 4096)) == content[off:off + 4096]
    assert served == [1] * 40
    for leg in legs:
        leg.close()


def test_uncached_reads_go_to_the_faster_leg_which_the_slower_is_still_timed_against(monkeypatch):
    from services.iscsi_target.scsi import mirror

    clock = _Clock()
    monkeypatch.setattr(mirror, "time", clock)
    fast, slow = _ColdLeg(MiB, 0.00001, clock), _ColdLeg(MiB, 0.003, clock)
    m = MirrorBackstore([slow, fast])
    for k in range(96):
        m.read((k * 7919 * 512) % (MiB - 4096) // 512 * 512, 4096)  # no stream: each read on its own
    assert fast.reads >= 80 and 3 <= slow.reads <= 12  # the slow leg: its first read and 1 in COLD_PROBE
    a, b = _ColdLeg(MiB, 0.001, clock), _ColdLeg(MiB, 0.001, clock)  # two alike: the reads are shared
    m = MirrorBackstore([a, b])
    for k in range(40):
        m.read((k * 7919 * 512) % (MiB - 4096) // 512 * 512, 4096)
    assert a.reads >= 12 and b.reads >= 12


class _DirectLeg(_ColdLeg):
    """A device opened O_DIRECT: nothing of it in the page cache, so no mincore and no trusted regions."""

    direct = True
    read_warm = cached = None


def test_legs_opened_o_direct_share_even_a_sequential_stream(monkeypatch):
    """No readahead to keep: a stream alternates between alike devices (each serves half) and goes to the
    faster of two unlike ones; buffered legs keep a stream on one leg (the test above)."""
    from services.iscsi_target.scsi import mirror

    clock = _Clock()
    monkeypatch.setattr(mirror, "time", clock)
    a, b = _DirectLeg(MiB, 0.001, clock), _DirectLeg(MiB, 0.001, clock)
    m = MirrorBackstore([a, b])
    for k in range(64):
        assert bytes(m.read(k * 4096, 4096)) == bytes(4096)
    assert a.reads == b.reads == 32
    fast, slow = _DirectLeg(MiB, 0.0001, clock), _DirectLeg(MiB, 0.002, clock)
    m = MirrorBackstore([slow, fast])
    for k in range(64):
        m.read(k * 4096, 4096)
    assert fast.reads >= 56 and slow.reads <= 8


class _SlowLeg(FaultyLeg):
    """A leg whose writes and syncs take `delay` seconds; with `meet` set, each returns only once the other
    leg's has reached the same barrier: it passes only when the two legs are written (synced) at once."""

    def __init__(self, inner, delay=0.002):
        super().__init__(inner)
        self.delay, self.meet, self.threads = delay, None, []

    def _wait(self):
        self.threads.append(threading.current_thread().name)
        if self.meet is not None:
            self.meet.wait()
        time.sleep(self.delay)

    def write(self, offset, data):
        self._wait()
        super().write(offset, data)

    def sync(self):
        self._wait()
        super().sync()


def test_legs_whose_writes_wait_for_a_device_are_written_both_at_once():
    a, b = _SlowLeg(RamBackstore(MiB)), _SlowLeg(RamBackstore(MiB))
    m = MirrorBackstore([a, b])
    m.write(0, b"1" * 512)  # both legs timed: slower than PARALLEL_NS
    a.meet = b.meet = threading.Barrier(2, timeout=5)  # written in turn, a write would break the barrier
    for k in range(1, 20):
        m.write(k * 512, bytes([k]) * 512)
    for leg in (a, b):
        assert bytes(leg.inner.read(0, 20 * 512)) == b"1" * 512 + b"".join(bytes([k]) * 512 for k in range(1, 20))
    assert a.threads[-1].startswith("mirror-leg") and b.threads[-1] == threading.current_thread().name
    a.meet = b.meet = None
    m.sync()  # SYNCHRONIZE CACHE likewise, on averages of its own
    a.meet = b.meet = threading.Barrier(2, timeout=5)
    for _ in range(5):
        m.sync()
    assert m.state == [IN_SYNC, IN_SYNC]
    m.close()


def test_quick_legs_are_written_in_turn_on_the_callers_thread():
    """A copy into the page cache costs less than a handoff to another thread."""
    a, b = _SlowLeg(RamBackstore(MiB), delay=0), _SlowLeg(RamBackstore(MiB), delay=0)
    m = MirrorBackstore([a, b])
    for k in range(50):
        m.write(k * 512, b"q" * 512)
    me = threading.current_thread().name
    assert set(a.threads) == set(b.threads) == {me} and m._helper is None


def test_a_leg_failing_in_a_write_to_both_at_once_is_dropped_and_the_last_fails_the_command():
    a, b = _SlowLeg(RamBackstore(MiB)), _SlowLeg(RamBackstore(MiB))
    dropped, cb = events()
    m = MirrorBackstore([a, b], names=["a", "b"], on_leg_failed=cb)
    t = ready_target(m)
    assert t.execute(NX, 0, write10(0, 1), b"1" * 512).status == 0
    a.fail_writes = True  # leg 0: the one the helper thread writes
    assert t.execute(NX, 0, write10(1, 1), b"2" * 512).status == 0
    assert m.state == [FAILED, IN_SYNC] and dropped == [(0, "a", "injected write error (errno 5)")]
    assert bytes(b.inner.read(512, 512)) == b"2" * 512 and bytes(m.read(512, 512)) == b"2" * 512
    b.fail_writes = True
    assert key_asc(t.execute(NX, 0, write10(2, 1), b"3" * 512)) == (S.MEDIUM_ERROR, 0x0C, 0x00)
    assert m.state == [FAILED, IN_SYNC]
    a2, b2 = _SlowLeg(RamBackstore(MiB)), _SlowLeg(RamBackstore(MiB))
    m2 = MirrorBackstore([a2, b2])
    m2.write(0, b"1" * 512)
    a2.fail_writes = b2.fail_writes = True  # both at once: one dropped, the other the last (MEDIUM ERROR)
    with pytest.raises(S.ScsiError):
        m2.write(512, b"x" * 512)
    assert sorted(m2.state) == [FAILED, IN_SYNC]
    m.close()
    m2.close()


def test_legs_of_different_sizes_are_refused():
    with pytest.raises(BackstoreError, match="legs differ"):
        MirrorBackstore([RamBackstore(MiB), RamBackstore(2 * MiB)])


def test_a_read_error_drops_the_leg_and_the_other_answers():
    a, b = FaultyLeg(RamBackstore(MiB)), RamBackstore(MiB)
    dropped, cb = events()
    m = MirrorBackstore([a, b], names=["a", "b"], on_leg_failed=cb)
    m.write(0, b"y" * 512)
    a.fail_reads = True
    for _ in range(3):
        assert bytes(m.read(0, 512)) == b"y" * 512
    assert m.state == [FAILED, IN_SYNC] and dropped == [(0, "a", "injected read error (errno 5)")]


def test_the_last_leg_is_never_dropped_its_errors_fail_the_command():
    a, b = FaultyLeg(RamBackstore(MiB)), FaultyLeg(RamBackstore(MiB))
    m = MirrorBackstore([a, b])
    t = ready_target(m)
    a.fail_writes = True
    assert t.execute(NX, 0, write10(0, 1), b"z" * 512).status == 0  # a dropped, b has it
    b.fail_writes = True
    r = t.execute(NX, 0, write10(0, 1), b"w" * 512)
    assert key_asc(r) == (S.MEDIUM_ERROR, 0x0C, 0x00)
    b.fail_writes, b.fail_reads = False, True
    assert key_asc(t.execute(NX, 0, read10(0, 1), None)) == (S.MEDIUM_ERROR, 0x11, 0x00)
    assert m.state == [FAILED, IN_SYNC]


def test_through_the_scsi_layer_with_file_legs(tmp_path):
    legs = [PreadFileBackstore(tmp_path / f"leg{i}.img", MiB) for i in (0, 1)]
    t = ready_target(MirrorBackstore(legs))
    assert t.execute(NX, 0, write10(5, 2, flags=0x08), b"\x5a" * 1024).status == 0
    assert data(t.execute(NX, 0, read10(5, 2), None)) == b"\x5a" * 1024
    for i in (0, 1):
        with open(tmp_path / f"leg{i}.img", "rb") as f:
            assert f.read()[5 * 512:7 * 512] == b"\x5a" * 1024


def test_a_dropped_leg_is_remembered_across_a_restart(tmp_path):
    state = tmp_path / "mirror.state"
    legs = [FaultyLeg(RamBackstore(MiB)), RamBackstore(MiB)]
    m = MirrorBackstore(legs, names=["a", "b"], state_file=state)
    legs[0].fail_writes = True
    m.write(0, b"q" * 512)
    assert m.state == [FAILED, IN_SYNC]
    again = MirrorBackstore([RamBackstore(MiB), RamBackstore(MiB)], names=["a", "b"], state_file=state)
    assert again.state == [FAILED, IN_SYNC]  # the stale leg is not served after a restart
    again.resync(0)
    assert MirrorBackstore([RamBackstore(MiB), RamBackstore(MiB)], names=["a", "b"],
                           state_file=state).state == [IN_SYNC, IN_SYNC]


def test_resync_reports_progress_and_refuses_a_leg_in_sync():
    a, b = FaultyLeg(RamBackstore(4 * MiB)), RamBackstore(4 * MiB)
    m = MirrorBackstore([a, b])
    with pytest.raises(ResyncError, match="already in sync"):
        m.resync(0)
    b.write(0, b"p" * 512)  # behind the mirror's back: only b has it, as after a drop
    a.fail_writes = True
    m.write(MiB, b"r" * 512)
    a.fail_writes = False
    steps = []
    m.resync(0, progress=lambda done, total: steps.append((done, total)), chunk=MiB)
    assert steps == [(MiB, 4 * MiB), (2 * MiB, 4 * MiB), (3 * MiB, 4 * MiB), (4 * MiB, 4 * MiB)]
    assert bytes(a.read(0, 512)) == b"p" * 512 and bytes(a.read(MiB, 512)) == b"r" * 512


def test_a_leg_failing_during_its_resync_stops_it():
    a, b = FaultyLeg(RamBackstore(4 * MiB)), RamBackstore(4 * MiB)
    m = MirrorBackstore([a, b])
    a.fail_writes = True
    m.write(0, b"1" * 512)
    a.fail_writes, a.fail_after_writes = False, 2
    with pytest.raises(ResyncError, match="write failed during the resync"):
        m.resync(0, chunk=MiB)
    assert m.state == [FAILED, IN_SYNC]


# ---------------------------------------------------------------------------------------------- under load
def _resync_under_load(m, load, index, leg=None):
    progress = []
    load.wait_writes(20)
    m.resync(index, leg=leg, progress=lambda d, t: progress.append(d), chunk=256 << 10)
    load.wait_writes(20)  # writes after the resync reach both legs too
    assert progress[-1] == m.size and progress == sorted(progress)


def test_injected_write_errors_under_load_then_resync(tmp_path):
    legs = [PreadFileBackstore(tmp_path / "a.img", SIZE), FaultyLeg(PreadFileBackstore(tmp_path / "b.img", SIZE))]
    dropped, cb = events()
    m = MirrorBackstore(legs, names=["a", "b"], on_leg_failed=cb)
    with Load(m) as load:
        load.wait_writes(30)
        legs[1].fail_writes = True
        load.wait_writes(30)
        assert m.state == [IN_SYNC, FAILED] and dropped[0][:2] == (1, "b")
        legs[1].fail_writes = False
        _resync_under_load(m, load, 1)
    assert not load.errors, load.errors[:3]
    assert len(dropped) == 1
    check_both_legs(m, load.acked)


def test_injected_read_errors_under_load(tmp_path):
    legs = [FaultyLeg(PreadFileBackstore(tmp_path / "a.img", SIZE)), PreadFileBackstore(tmp_path / "b.img", SIZE)]
    m = MirrorBackstore(legs)
    with Load(m) as load:
        load.wait_writes(20)
        legs[0].fail_reads = True
        for _ in range(50):  # reads keep being answered from b
            with load._lock:
                sample = list(load.acked.items())[:20]
            for lba, payload in sample:
                got = bytes(m.read(lba * BS, BS))
                # another write to the block may be in flight; it must be this one or a newer one by its owner
                assert got == payload or got.startswith(payload[:4])
        assert m.state == [FAILED, IN_SYNC]
        legs[0].fail_reads = False
        _resync_under_load(m, load, 0)
    assert not load.errors
    check_both_legs(m, load.acked)


def test_leg_file_removed_under_load_then_resync_onto_a_new_file(tmp_path):
    path = tmp_path / "b.img"
    legs = [PreadFileBackstore(tmp_path / "a.img", SIZE), PreadFileBackstore(path, SIZE)]
    dropped, cb = events()
    m = MirrorBackstore(legs, names=["a", str(path)], on_leg_failed=cb)
    with Load(m, sync_every=5) as load:  # initiators sync often (FUA, SYNCHRONIZE CACHE): that is when it is seen
        load.wait_writes(20)
        os.unlink(path)
        load.wait_writes(30)
        assert m.state == [IN_SYNC, FAILED] and dropped == [(1, str(path), "the file was removed (errno 0)")]
        _resync_under_load(m, load, 1, leg=PreadFileBackstore(path, SIZE))
    assert not load.errors
    check_both_legs(m, load.acked)
    with open(path, "rb") as f:  # the new file holds it, not just the object
        disk = f.read()
    for lba, payload in load.acked.items():
        assert disk[lba * BS:(lba + 1) * BS] == payload


@pytest.fixture
def small_tmpfs(tmp_path):
    assert shutil.which("mount") and shutil.which("umount"), "mount/umount missing"
    point = tmp_path / "tmpfs"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "bootfleet-test", str(point)], check=True)
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)]).returncode:  # a leg left open by a failed test
            subprocess.run(["umount", "-l", str(point)], check=True)


def test_leg_on_a_tmpfs_that_fills_up_under_load_then_resync(tmp_path, small_tmpfs):
    full = small_tmpfs / "b.img"
    legs = [PreadFileBackstore(tmp_path / "a.img", SIZE), PreadFileBackstore(full, SIZE, sparse=True)]
    dropped, cb = events()
    m = MirrorBackstore(legs, names=["a", "b"], on_leg_failed=cb)
    try:
        with Load(m, blocks_per_write=(8, 32)) as load:
            load.wait_writes(3000, timeout=60)  # 8 MiB of writes spread over the LUN: the 2 MiB tmpfs fills
            assert m.state == [IN_SYNC, FAILED], "the tmpfs leg should have filled up"
            assert dropped[0][:2] == (1, "b") and "No space left on device" in dropped[0][2]
            subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
            _resync_under_load(m, load, 1)
        assert not load.errors
        check_both_legs(m, load.acked)
    finally:
        m.close()  # before the fixture unmounts the tmpfs


def test_a_write_in_flight_on_the_good_leg_when_the_copy_reaches_it_is_not_lost():
    """The race the chunk lock closes: a write already past its leg choice (good leg only, below no
    watermark yet) is still writing when the resync copies its chunk; the copy must wait for it."""
    good, stale = RamBackstore(MiB), FaultyLeg(RamBackstore(MiB))
    m = MirrorBackstore([good, stale])
    stale.fail_writes = True
    m.write(0, b"o" * 512)  # the stale leg is dropped
    stale.fail_writes = False
    inside, release = threading.Event(), threading.Event()
    real = good.write

    def slow_write(offset, data):
        inside.set()
        release.wait(10)
        real(offset, data)

    good.write = slow_write
    writer = threading.Thread(target=m.write, args=(0, b"N" * 512))
    writer.start()
    assert inside.wait(10)
    good.write = real
    resync = threading.Thread(target=m.resync, args=(1,), kwargs={"chunk": 64 << 10})
    resync.start()
    wait_for(lambda: m._copy is not None or not resync.is_alive(), what="the resync to reach chunk 0")
    release.set()
    writer.join(10)
    resync.join(10)
    assert m.state == [IN_SYNC, IN_SYNC]
    assert bytes(stale.read(0, 512)) == b"N" * 512


def _count_mincore(monkeypatch, pread_file):
    calls, real = [], pread_file._mincore
    monkeypatch.setattr(pread_file, "_mincore",
                        lambda addr, length, vec: calls.append(length) or real(addr, length, vec))
    return calls


def test_a_file_leg_reads_cached_pages_from_its_mapping_and_the_rest_with_pread(tmp_path, monkeypatch):
    from services.iscsi_target.scsi import pread_file

    region = 1 << pread_file.REGION_SHIFT
    leg = PreadFileBackstore(tmp_path / "leg.img", 2 * region)
    leg.write(0, b"c" * 4096)
    calls = _count_mincore(monkeypatch, pread_file)
    assert isinstance(leg.read(0, 4096), memoryview)  # just written: in the page cache, no fault possible
    assert calls == [region]  # asked for the whole region at once
    assert isinstance(leg.read(65536, 65536), memoryview) and calls == [region]  # trusted: no system call
    later = pread_file._monotonic() + pread_file.WARM_FOR + 1
    monkeypatch.setattr(pread_file, "_monotonic", lambda: later)  # the region's trust has run out
    monkeypatch.setattr(pread_file, "_mincore", lambda addr, length, vec: calls.append(length) or -1)
    got = leg.read(0, 4096)  # residency unknown: pread, whose failure is an OSError
    assert isinstance(got, bytes) and got == b"c" * 4096 and calls == [region, region]
    os.truncate(tmp_path / "leg.img", 2048)  # the file shrank under the leg
    with pytest.raises(OSError, match="short read"):
        leg.read(0, 4096)
    leg.close()


def test_a_file_leg_trusts_only_regions_found_all_resident_and_forgets_what_it_unmaps(tmp_path, monkeypatch):
    from services.iscsi_target.scsi import pread_file

    region = 1 << pread_file.REGION_SHIFT
    sparse = PreadFileBackstore(tmp_path / "sparse.img", 2 * region, sparse=True)
    sparse.write(0, b"s" * 4096)
    calls = _count_mincore(monkeypatch, pread_file)
    assert isinstance(sparse.read(0, 4096), memoryview)  # its pages are cached, the region's holes are not
    assert isinstance(sparse.read(0, 4096), memoryview) and len(calls) == 2  # so the region is asked each time
    hole = sparse.read(region + 8192, 4096)  # a hole: nothing cached to slice, pread
    assert isinstance(hole, bytes) and hole == bytes(4096)
    sparse.close()

    leg = PreadFileBackstore(tmp_path / "leg.img", 2 * region)
    leg.write(region, b"u" * region)
    calls.clear()
    assert bytes(leg.read(region, 4096)) == b"u" * 4096 and calls == [region]
    leg.unmap(region, 8192)  # punched out of the page cache: the region must be asked again
    got = leg.read(region, 4096)
    assert bytes(got) == bytes(4096) and calls == [region, region]
    assert bytes(leg.read(region + 8192, 4096)) == b"u" * 4096
    leg.close()


def test_wce_off_by_mode_select_makes_both_file_legs_write_through(tmp_path):
    legs = [PreadFileBackstore(tmp_path / f"{i}.img", MiB) for i in (0, 1)]
    m = MirrorBackstore(legs)
    t = ready_target(m)
    page = bytes([0x08, 0x12]) + bytes(18)  # caching page with WCE=0
    params = bytes([0, 0, 0, 0]) + page
    assert t.execute(NX, 0, memoryview(bytes([0x15, 0x10, 0, 0, len(params), 0]).ljust(16, b"\0")), params).status == 0
    assert m.write_through and all(leg.write_through for leg in legs)


class GatedLeg(FaultyLeg):
    """A leg whose next write stops at a gate until the test opens it."""

    def __init__(self, inner):
        super().__init__(inner)
        self.inside, self.gate, self.armed = threading.Event(), threading.Event(), False

    def write(self, offset, data):
        if self.armed:
            self.armed = False
            self.inside.set()
            assert self.gate.wait(10)
        super().write(offset, data)


def test_a_write_into_the_chunk_being_copied_waits_for_the_copy():
    good, stale = FaultyLeg(RamBackstore(MiB)), GatedLeg(RamBackstore(MiB))
    good.read = lambda offset, length: bytes(good.inner.read(offset, length))  # a copy, as pread gives
    m = MirrorBackstore([good, stale])
    stale.fail_writes = True
    m.write(0, b"o" * 512)
    stale.fail_writes = False
    stale.armed = True  # the resync's first chunk write stops after it read the good leg
    resync = threading.Thread(target=m.resync, args=(1,), kwargs={"chunk": 64 << 10})
    resync.start()
    assert stale.inside.wait(10)
    writer = threading.Thread(target=m.write, args=(512, b"W" * 512))
    writer.start()
    wait_for(lambda: m._waiting or not writer.is_alive(), what="the write to wait or finish")
    stale.gate.set()
    writer.join(10)
    resync.join(10)
    assert m.state == [IN_SYNC, IN_SYNC]
    assert bytes(stale.read(512, 512)) == b"W" * 512  # lost if the write had gone to the good leg alone


def test_overlapping_writes_do_not_interleave_their_legs():
    a, b = RamBackstore(MiB), GatedLeg(RamBackstore(MiB))
    m = MirrorBackstore([a, b])
    b.armed = True  # the first write stops between its two legs
    first = threading.Thread(target=m.write, args=(0, b"1" * 1024))
    first.start()
    assert b.inside.wait(10)
    second = threading.Thread(target=m.write, args=(512, b"2" * 1024))
    second.start()
    wait_for(lambda: m._waiting or not second.is_alive(), what="the second write to wait or finish")
    b.gate.set()
    first.join(10)
    second.join(10)
    assert bytes(a.read(0, 2048)) == bytes(b.read(0, 2048)) == b"1" * 512 + b"2" * 1024 + bytes(512)
