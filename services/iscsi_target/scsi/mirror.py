"""RAID-1: one backing store over two legs of the same size.

Theory of operation. A write goes to every leg that is in sync and is acknowledged when each has it (or
has failed and been dropped): one leg after the other on the caller's thread while a leg's write is quick
(a copy into the page cache), both at once (leg 0 on a helper thread) once each leg's average write time
reaches PARALLEL_NS (the legs wait for their devices: O_DIRECT, write-through, a slow disk); unmaps and
syncs (SYNCHRONIZE CACHE: fdatasync of each leg) likewise, each with averages of their own.

Reads, while both legs are in sync: a read that continues a leg's last one stays on that leg (its readahead);
else a leg whose pages of the read are in the page cache (legs are two files, each with pages of its own:
after a restart, a resync or memory pressure one leg's cache can be warm and the other's cold); else, when
neither has them, the leg whose reads from the disk have been faster (an average of each leg's uncached read
times, each leg still given one uncached read in COLD_PROBE so that its average follows a disk that got
faster), alternating while the two are within 25%: two equal disks share the load, an SSD beside a spinning
disk takes the reads. Legs that keep nothing in the page cache (block devices opened O_DIRECT) have no
readahead for a stream to keep and no cache to ask: every read is chosen as an uncached one. Other legs that
cannot tell (buffered block devices) alternate. A leg whose read, write or sync raises (an OSError: EIO,
ENOSPC, EBADF; or a ScsiError from a device backstore), or whose file is found removed or replaced on a sync,
is dropped: the mirror records the drop in its state file (fsync'd, before the failing write is acknowledged,
so a restart never serves the stale leg), calls `on_leg_failed(index, name, reason)` and serves from the other
leg. The last leg in sync is never dropped: its errors fail the command (MEDIUM ERROR).

Writes hold a range lock while they run: two overlapping writes never interleave their leg writes (the
legs would end up disagreeing) and the resync's chunk copy waits for overlapping writes and they for it.

`resync(index, leg=None, progress=...)` rebuilds a dropped leg (optionally a new Backstore in its place)
while the LUN serves: it copies the in-sync leg chunk by chunk; the watermark is the end of the copied
region. A write below the watermark goes to both legs; one at or above it goes to the good leg only and
the copy brings it over later (the chunk being copied is locked against writes, so no write slips between
the copy's read and its write). When the copy reaches the end the leg is synced and in sync again.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from services.iscsi_target.scsi import sense as S
from services.iscsi_target.scsi.backstore import Backstore, BackstoreError

IN_SYNC, FAILED, RESYNCING = "in_sync", "failed", "resyncing"
RESYNC_CHUNK = 1 << 20
COLD_PROBE = 16      # one uncached read in this many goes to the slower leg, to keep its average current
COLD_WEIGHT = 0.125  # weight of a new uncached read time in a leg's average
# legs whose writes (unmaps, syncs) take this long are written both at once: a round trip to a helper thread
# costs 80-95 us on these VMs (waking an idle vCPU), more than a 64 KiB copy into the page cache (13 us)
PARALLEL_NS = 250_000
LEG_ERRORS = (OSError, S.ScsiError, ValueError)  # ValueError: an fd closed under a write


class ResyncError(BackstoreError):
    """The resync stopped: a leg failed while copying (the message says which and why)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return str(exc) or type(exc).__name__


class MirrorBackstore(Backstore):
    def __init__(self, legs, names=None, on_leg_failed=None, state_file=None, write_through: bool = False,
                 failed=()):
        """legs: two Backstores (one may be None: missing, so failed); failed: indexes known stale."""
        if len(legs) != 2:
            raise BackstoreError(f"a mirror needs two legs, got {len(legs)}")
        present = [leg for leg in legs if leg is not None]
        if not present:
            raise BackstoreError("a mirror needs at least one leg it can open")
        first = present[0]
        for leg in present[1:]:
            if (leg.size, leg.block_size) != (first.size, first.block_size):
                raise BackstoreError(f"mirror legs differ: {first.size} bytes of {first.block_size}-byte blocks "
                                     f"against {leg.size} of {leg.block_size}")
        super().__init__(first.size, first.block_size)
        self.legs = list(legs)
        self.names = list(names or [getattr(leg, "path", f"leg {i}") for i, leg in enumerate(legs)])
        self.on_leg_failed = on_leg_failed
        self.on_resync_done = None  # called with (index, name) when a resync completes
        self.state_file = os.fspath(state_file) if state_file else None
        self._write_through = write_through
        self.readonly = any(leg.readonly for leg in present)
        self.thin = all(leg.thin for leg in present)
        self.state = [IN_SYNC if leg is not None else FAILED for leg in legs]
        for i in failed:
            self.state[i] = FAILED
        for name, state in self._load_state().items():
            if name in self.names and state == FAILED:
                self.state[self.names.index(name)] = FAILED
        if self.state == [FAILED, FAILED]:
            raise BackstoreError(f"mirror {self.names}: both legs are recorded as failed; nothing to serve")
        for leg in present:
            if hasattr(leg, "fd"):  # the mirror's write_through is its legs'
                leg.write_through = write_through
        self._save_state()
        self._cond = threading.Condition(threading.Lock())
        self._writes: dict[int, tuple[int, int]] = {}  # in-flight writes: token -> [start, end)
        self._tokens = itertools.count()
        self._copy: tuple[int, int] | None = None     # the range the resync is copying right now
        self._waiting = 0                             # threads waiting on _cond (writes and the resync)
        self.watermark = 0                            # resync: bytes below this are on both legs
        self._rr = itertools.count()
        self._read_ends = [-1, -1]                    # where each leg's last read ended
        self._cold_ns = [0.0, 0.0]                    # each leg's average uncached read time (0: none yet)
        self._cold_reads = 0
        self._write_ns = [0.0, 0.0]                   # each leg's average write, unmap and sync times
        self._unmap_ns = [0.0, 0.0]
        self._sync_ns = [0.0, 0.0]
        self._helper: ThreadPoolExecutor | None = None  # writes leg 0 while the caller writes leg 1
        self._legs_changed()

    # ---------------------------------------------------------------- state
    @property
    def write_through(self) -> bool:
        return self._write_through

    @write_through.setter
    def write_through(self, value: bool) -> None:
        """MODE SELECT of WCE reaches the legs: they are what syncs."""
        self._write_through = value
        for leg in self.legs:
            if leg is not None and hasattr(leg, "fd"):
                leg.write_through = value

    @property
    def degraded(self) -> bool:
        return self.state != [IN_SYNC, IN_SYNC]

    def status(self) -> list[dict]:
        return [{"leg": i, "name": self.names[i], "state": s} for i, s in enumerate(self.state)]

    def _load_state(self) -> dict:
        if not self.state_file:
            return {}
        try:
            with open(self.state_file) as f:
                return json.load(f).get("legs", {})
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise BackstoreError(f"{self.state_file}: mirror state unreadable: {exc}") from exc

    def _save_state(self) -> None:
        """Durable before a write only one leg has is acknowledged: a restart must not serve the stale leg."""
        if not self.state_file:
            return
        legs = {name: (FAILED if s != IN_SYNC else IN_SYNC) for name, s in zip(self.names, self.state)}
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"legs": legs}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)
        fd = os.open(os.path.dirname(self.state_file) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _drop(self, i: int, leg, exc: BaseException) -> None:
        """Leg i failed: drop it, unless it is the last one in sync (then the command fails)."""
        with self._cond:
            if self.legs[i] is not leg or self.state[i] == FAILED:
                return  # already dropped (or replaced by a resync): a stale report
            other = self.state[1 - i]
            if self.state[i] == IN_SYNC and other != IN_SYNC:
                raise S.ScsiError(S.MEDIUM_ERROR, S.WRITE_ERROR if isinstance(exc, _WriteFailure)
                                  else S.UNRECOVERED_READ_ERROR)
            self.state[i] = FAILED
            self._save_state()
            self._cond.notify_all()
        reason = _reason(exc.__cause__ if isinstance(exc, _WriteFailure) and exc.__cause__ else exc)
        if self.on_leg_failed is not None:
            self.on_leg_failed(i, self.names[i], reason)

    # ---------------------------------------------------------------- I/O
    def _begin(self, start: int, end: int):
        """Register a write over [start, end) once nothing overlapping runs; the legs it goes to."""
        with self._cond:
            if self._copy is not None or self._writes:  # the fast path: nothing else in flight
                self._wait_clear(start, end)
            token = next(self._tokens)
            self._writes[token] = (start, end)
            state = self.state
            if state[0] == IN_SYNC and state[1] == IN_SYNC:
                return token, ((0, self.legs[0]), (1, self.legs[1]))
            targets = tuple((i, self.legs[i]) for i in (0, 1)
                            if state[i] == IN_SYNC or (state[i] == RESYNCING and start < self.watermark))
        return token, targets

    def _wait_clear(self, start: int, end: int) -> None:
        while True:
            copy = self._copy
            if (copy is not None and start < copy[1] and copy[0] < end) or \
                    any(start < e and s < end for s, e in self._writes.values()):
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
                continue
            return

    def _end(self, token: int) -> None:
        with self._cond:
            del self._writes[token]
            if self._waiting:
                self._cond.notify_all()

    def _failed(self, i: int, leg, exc: BaseException) -> None:
        failure = _WriteFailure(_reason(exc))
        failure.__cause__ = exc
        self._drop(i, leg, failure)  # raises MEDIUM ERROR if it was the last leg in sync

    def write(self, offset: int, data) -> None:
        self._change(offset, offset + len(data), lambda leg: leg.write(offset, data), self._write_ns)

    def unmap(self, offset: int, length: int) -> None:
        self._change(offset, offset + length, lambda leg: leg.unmap(offset, length), self._unmap_ns)

    def _change(self, start: int, end: int, op, avg) -> None:
        """A write or an unmap of [start, end): on every leg it goes to, under the range lock."""
        token, targets = self._begin(start, end)
        try:
            failures = self._on_legs(targets, op, avg)
            for i, leg, exc in failures:
                self._failed(i, leg, exc)  # the last leg in sync: MEDIUM ERROR
            if len(failures) == len(targets):
                raise S.ScsiError(S.MEDIUM_ERROR, S.WRITE_ERROR)
        finally:
            self._end(token)

    def _on_legs(self, targets, op, avg) -> list:
        """op(leg) on each of `targets`, each timed into `avg`: one after the other, or, once each leg's
        average reaches PARALLEL_NS (legs that wait for their devices: O_DIRECT, write-through, a slow disk),
        both at once with leg 0 on a helper thread, so that it takes the slower leg's time, not the sum (md
        writes its legs so). The failures, as (index, leg, exception)."""
        failures = []
        if len(targets) == 2 and min(avg) >= PARALLEL_NS:
            (i, first), (j, second) = targets
            if self._helper is None:
                self._helper = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mirror-leg")
            pending = self._helper.submit(_timed, avg, i, first, op)
            try:
                _timed(avg, j, second, op)
            except LEG_ERRORS as exc:
                failures.append((j, second, exc))
            try:
                pending.result()
            except LEG_ERRORS as exc:
                failures.insert(0, (i, first, exc))
            return failures
        for i, leg in targets:
            try:
                _timed(avg, i, leg, op)
            except LEG_ERRORS as exc:
                failures.append((i, leg, exc))
        return failures

    def read(self, offset: int, length: int):
        while True:
            state = self.state
            if state[0] == IN_SYNC and state[1] == IN_SYNC:
                if self._uncached:  # every read reaches a device: timed, shared while the legs are alike
                    return self._read_cold(offset, length)
                ends = self._read_ends
                if ends[0] == offset:  # a read that continues a leg's last one stays on that leg
                    i = 0
                elif ends[1] == offset:
                    i = 1
                else:
                    i = next(self._rr) & 1
                    warm = self._warm_reads
                    if warm is not None:  # legs that can tell what they have cached (file legs)
                        data = warm[i](offset, length)  # the alternate leg's trusted pages first
                        if data is None:
                            data = warm[1 - i](offset, length)
                            i = 1 - i
                        if data is not None:
                            ends[i] = offset + length
                            return data
                        i = self._cached_leg(offset, length, i)
                        if i is None:  # neither leg has the pages: from the disk, timed
                            return self._read_cold(offset, length)
                ends[i] = offset + length
            else:
                i = 0 if state[0] == IN_SYNC else 1
            leg = self.legs[i]
            try:
                return leg.read(offset, length)
            except LEG_ERRORS as exc:
                self._drop(i, leg, exc)  # the last leg in sync: MEDIUM ERROR; else try the other

    def _cached_leg(self, offset: int, length: int, i: int):
        """Neither leg trusts the read's region: ask each (mincore) whether it has the pages; None: neither."""
        if self.legs[i].cached(offset, length):
            return i
        if self.legs[1 - i].cached(offset, length):
            return 1 - i
        return None

    def _legs_changed(self) -> None:
        readers = [getattr(leg, "read_warm", None) for leg in self.legs]
        self._warm_reads = readers if all(readers) else None
        # legs that keep nothing in the page cache (O_DIRECT devices): no readahead for a stream to keep
        self._uncached = all(getattr(leg, "direct", False) for leg in self.legs)

    def _read_cold(self, offset: int, length: int):
        """A read neither leg has in its cache: from the faster leg (the module's docstring)."""
        avg = self._cold_ns
        n = self._cold_reads = self._cold_reads + 1
        if not avg[0] or not avg[1]:  # a leg not timed yet: time it
            i = 0 if not avg[0] else 1
        elif max(avg) <= 1.25 * min(avg):  # alike: share
            i = n & 1
        else:
            fast = 0 if avg[0] < avg[1] else 1
            i = 1 - fast if n % COLD_PROBE == 0 else fast
        self._read_ends[i] = offset + length
        leg = self.legs[i]
        started = time.perf_counter_ns()
        try:
            data = leg.read(offset, length)
        except LEG_ERRORS as exc:
            self._drop(i, leg, exc)  # the last leg in sync: MEDIUM ERROR; else the other serves it
            return self.read(offset, length)
        took = time.perf_counter_ns() - started
        avg[i] = took if not avg[i] else avg[i] + COLD_WEIGHT * (took - avg[i])
        return data

    def sync(self) -> None:
        targets = [(i, leg) for i, leg in enumerate(self.legs) if leg is not None and self.state[i] != FAILED]
        for i, leg, exc in self._on_legs(targets, _sync_leg, self._sync_ns):
            failure = _WriteFailure(_reason(exc))
            failure.__cause__ = exc
            self._drop(i, leg, failure)

    def check(self) -> None:
        """Drop legs whose file was removed or replaced (also done on every sync)."""
        self.sync()

    def mapped(self, offset: int) -> tuple[bool, int]:
        i = 0 if self.state[0] == IN_SYNC else 1
        return self.legs[i].mapped(offset)

    def resize(self, size: int) -> None:
        raise BackstoreError("a mirror cannot be resized while it serves")

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown(wait=True)
        for leg in self.legs:
            if leg is not None:
                leg.close()

    # ---------------------------------------------------------------- resync
    def resync(self, index: int, leg: Backstore | None = None, progress=None, chunk: int = RESYNC_CHUNK) -> None:
        """Rebuild leg `index` from the other while serving; `progress(done_bytes, total_bytes)` per chunk."""
        src = 1 - index
        chunk = max(self.block_size, chunk - chunk % self.block_size)
        with self._cond:
            if self.state[index] == IN_SYNC:
                raise ResyncError(f"{self.names[index]}: already in sync")
            if self.state[index] == RESYNCING:
                raise ResyncError(f"{self.names[index]}: a resync is already running")
            if self.state[src] != IN_SYNC:
                raise ResyncError(f"{self.names[src]}: not in sync; nothing to copy from")
            old = self.legs[index]
            if leg is not None:
                if (leg.size, leg.block_size) != (self.size, self.block_size):
                    raise ResyncError(f"{self.names[index]}: the new leg has {leg.size} bytes of "
                                      f"{leg.block_size}-byte blocks; the mirror {self.size} of {self.block_size}")
                if hasattr(leg, "fd"):
                    leg.write_through = self.write_through
                self.legs[index] = leg
                self._legs_changed()
            elif old is None:
                raise ResyncError(f"{self.names[index]}: the leg is missing; give a new one to resync onto")
            target = self.legs[index]
            self.watermark = 0
            self.state[index] = RESYNCING
        if leg is not None and old is not None and old is not leg:
            try:
                old.close()
            except (OSError, BufferError, ValueError):
                pass
        pos = 0
        try:
            while pos < self.size:
                n = min(chunk, self.size - pos)
                with self._cond:
                    if self.legs[index] is not target or self.state[index] != RESYNCING:
                        raise ResyncError(f"{self.names[index]}: dropped during the resync")
                    if self.state[src] != IN_SYNC:
                        raise ResyncError(f"{self.names[src]}: failed during the resync")
                    self._copy = (pos, pos + n)
                    while any(pos + n > s and e > pos for s, e in self._writes.values()):
                        self._waiting += 1
                        try:
                            self._cond.wait()
                        finally:
                            self._waiting -= 1
                try:
                    source = self.legs[src]
                    try:
                        data = source.read(pos, n)
                    except LEG_ERRORS as exc:
                        self._drop(src, source, exc)  # the last leg in sync: raises MEDIUM ERROR
                        raise ResyncError(f"{self.names[src]}: read failed during the resync: {_reason(exc)}") from exc
                    try:
                        target.write(pos, data)
                    except LEG_ERRORS as exc:
                        failure = _WriteFailure(_reason(exc))
                        failure.__cause__ = exc
                        self._drop(index, target, failure)
                        raise ResyncError(f"{self.names[index]}: write failed during the resync: "
                                          f"{_reason(exc)}") from exc
                    with self._cond:
                        self.watermark = pos + n
                finally:
                    with self._cond:
                        self._copy = None
                        self._cond.notify_all()
                pos += n
                if progress is not None:
                    progress(pos, self.size)
            try:
                target.sync()
            except LEG_ERRORS as exc:
                failure = _WriteFailure(_reason(exc))
                failure.__cause__ = exc
                self._drop(index, target, failure)
                raise ResyncError(f"{self.names[index]}: sync failed at the end of the resync: {_reason(exc)}") from exc
            with self._cond:
                if self.legs[index] is not target or self.state[index] != RESYNCING:
                    raise ResyncError(f"{self.names[index]}: dropped during the resync")
                self.state[index] = IN_SYNC
                self._save_state()
        except S.ScsiError as exc:
            raise ResyncError(f"{self.names[src]}: the last leg in sync failed during the resync") from exc
        finally:
            with self._cond:
                if self.state[index] == RESYNCING:
                    self.state[index] = FAILED
                self._cond.notify_all()
        if self.on_resync_done is not None:
            self.on_resync_done(index, self.names[index])


def _timed(avg: list, i: int, leg, op) -> None:
    """op(leg), its time folded into leg i's average in `avg`."""
    started = time.perf_counter_ns()
    op(leg)
    took = time.perf_counter_ns() - started
    avg[i] = took if not avg[i] else avg[i] + COLD_WEIGHT * (took - avg[i])


def _sync_leg(leg) -> None:
    why = leg.gone() if hasattr(leg, "gone") else None
    if why:
        raise OSError(0, why)
    leg.sync()


class _WriteFailure(Exception):
    """A leg failed a write or a sync (so the last leg's error is a WRITE ERROR, not a read error)."""
