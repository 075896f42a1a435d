"""ScsiTarget: task management answers, live LUN changes and their unit attentions, nexus loss."""

from __future__ import annotations

from services.iscsi_target.scsi import LogicalUnit, RamBackstore, ScsiTarget

from .helpers import MiB, cdb16, data, key_asc, nexus, ready, ready_target, tur

A, B = nexus(1), nexus(2)


def test_task_management_codes():
    t = ready_target()
    assert t.task_management(A, 1, 0) == 1       # ABORT TASK: nothing is pending in this layer
    assert t.task_management(A, 2, 0) == 0       # ABORT TASK SET
    assert t.task_management(A, 3, 0) == 5       # CLEAR ACA: never in ACA
    assert t.task_management(A, 4, 0) == 0       # CLEAR TASK SET
    assert t.task_management(A, 5, 9) == 2       # LUN RESET of a LUN that does not exist
    assert t.task_management(A, 7, 0) == 0       # TARGET COLD RESET
    assert key_asc(t.execute(A, 0, tur(), None)) == (6, 0x29, 0x01)
    assert t.task_management(A, 9, 0) == 5


def test_added_lun_is_reported_and_others_see_luns_changed():
    t = ready_target()
    t.execute(B, 0, tur(), None)
    t.add_lun(1, LogicalUnit(RamBackstore(MiB), 1))
    assert sorted(t.luns) == [0, 1]
    assert key_asc(t.execute(A, 0, tur(), None)) == (6, 0x3F, 0x0E)
    # REPORT LUNS clears it for the nexus that asks
    rl = data(t.execute(B, 0, cdb16(0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0), None))
    assert len(rl) == 24
    assert t.execute(B, 0, tur(), None).status == 0
    assert key_asc(t.execute(A, 1, tur(), None)) == (6, 0x29, 0x00)


def test_add_lun_with_the_lu_only_and_remove():
    t = ready_target()
    lu = LogicalUnit(RamBackstore(MiB), 3)
    t.add_lun(lu)
    assert t.luns[3] is lu and lu.target_name == t.name
    t.execute(A, 0, tur(), None)
    t.remove_lun(3)
    assert 3 not in t.luns
    assert key_asc(t.execute(A, 0, tur(), None)) == (6, 0x3F, 0x0E)
    assert key_asc(t.execute(A, 3, tur(), None)) == (5, 0x25, 0x00)


def test_nexus_lost_forgets_unit_attentions():
    t = ready_target()
    t.task_management(A, 5, 0)
    t.nexus_lost(A)
    assert key_asc(t.execute(A, 0, tur(), None)) == (6, 0x29, 0x00)  # a new nexus: power on
    assert t.execute(A, 0, tur(), None).status == 0


def test_unit_attentions_come_oldest_first_and_do_not_repeat():
    t = ready_target()
    lu = t.luns[0]
    lu.add_ua(A, (0x2A, 0x09))
    lu.add_ua(A, (0x2A, 0x09))
    lu.add_ua(A, (0x3F, 0x0E))
    assert key_asc(t.execute(A, 0, tur(), None))[1:] == (0x2A, 0x09)
    assert key_asc(t.execute(A, 0, tur(), None))[1:] == (0x3F, 0x0E)
    assert t.execute(A, 0, tur(), None).status == 0


class _FailingStore(RamBackstore):
    """A RAM store whose writes, reads or syncs raise the OSError a disk would."""

    def __init__(self, errno_: int, on: str):
        super().__init__(4 * MiB)
        self.errno_, self.on = errno_, on

    def _fail(self, what):
        if self.on == what:
            raise OSError(self.errno_, "injected")

    def write(self, offset, data):
        self._fail("write")
        super().write(offset, data)

    def read(self, offset, length):
        self._fail("read")
        return super().read(offset, length)

    def sync(self):
        self._fail("sync")


def _execute(store, cdb, data_out=None):
    from services.iscsi_target.scsi import ScsiTarget

    t = ScsiTarget("iqn.2026-11.org.bootfleet.test:scsi", {0: LogicalUnit(store, 0)})
    ready(t, A)
    return t.execute(A, 0, cdb, data_out)


def test_store_errors_fail_the_command_with_sense_never_good():
    import errno

    from .helpers import read10, write10

    full = _execute(_FailingStore(errno.ENOSPC, "write"), write10(0, 1), memoryview(bytes(512)))
    assert full.status == 2 and key_asc(full) == (0x7, 0x27, 0x07)  # SPACE ALLOCATION FAILED WRITE PROTECT
    eio = _execute(_FailingStore(errno.EIO, "write"), write10(0, 1), memoryview(bytes(512)))
    assert eio.status == 2 and key_asc(eio) == (0x3, 0x0C, 0x00)  # MEDIUM ERROR, WRITE ERROR
    sync = _execute(_FailingStore(errno.EIO, "sync"), cdb16(0x35), None)
    assert sync.status == 2 and key_asc(sync) == (0x3, 0x0C, 0x00)
    rd = _execute(_FailingStore(errno.EIO, "read"), read10(0, 1))
    assert rd.status == 2 and key_asc(rd) == (0x3, 0x11, 0x00)  # UNRECOVERED READ ERROR


def test_plain_read_answers_only_what_execute_would_answer_good_with_the_same_data(tmp_path):
    """The transport's READ fast path (ScsiTarget.plain_read): None whenever execute has something to say
    first (a unit attention, a reservation, RDPROTECT, the range, no such LUN, a CD-ROM's own table), else
    exactly execute's data."""
    from services.iscsi_target.scsi.mmc import CdromUnit, open_iso

    from .helpers import pr_out, pr_params, read10, read16
    from .test_mmc import make_iso

    store = RamBackstore(1 * MiB)
    store.write(0, bytes(range(256)) * 4096)
    t = ready_target(store)

    def both(nx, cdb, flags, lba, n):
        fast = t.plain_read(nx, 0, flags, lba, n)
        slow = t.execute(nx, 0, cdb, None)
        return fast, slow

    fast, slow = both(A, read10(3, 5), 0, 3, 5)
    assert slow.status == 0 and bytes(fast) == data(slow) == bytes(store.read(3 * 512, 5 * 512))
    fast, slow = both(A, read16(2040, 8), 0, 2040, 8)
    assert slow.status == 0 and bytes(fast) == data(slow)
    # B has not been seen: its power-on unit attention comes first
    assert t.plain_read(B, 0, 0, 0, 1) is None
    assert key_asc(t.execute(B, 0, read10(0, 1), None)) == (6, 0x29, 0x00)
    assert bytes(t.plain_read(B, 0, 0, 0, 1)) == bytes(store.read(0, 512))
    for flags, lba, n, cdb in [(0x20, 0, 1, read10(0, 1, flags=0x20)),  # RDPROTECT
                               (0, 2048, 1, read10(2048, 1)),            # past the end
                               (0, 2047, 2, read10(2047, 2)),
                               (0, 0, 0, read10(0, 0))]:                 # nothing: GOOD without data
        assert t.plain_read(A, 0, flags, lba, n) is None
        assert not t.execute(A, 0, cdb, None).data
    assert t.plain_read(A, 7, 0, 0, 1) is None  # no such LUN
    # a reservation: every nexus goes through execute's conflict check while it is held
    assert t.execute(A, 0, pr_out(0), pr_params(0, 0xA)).status == 0
    assert t.execute(A, 0, pr_out(1, rtype=3), pr_params(0xA)).status == 0  # exclusive access
    assert t.plain_read(A, 0, 0, 0, 1) is None and t.plain_read(B, 0, 0, 0, 1) is None
    assert t.execute(B, 0, read10(0, 1), None).status == 0x18  # RESERVATION CONFLICT
    assert t.execute(A, 0, read10(0, 1), None).status == 0
    # a unit attention pending for one nexus sends every nexus of that LUN through execute
    t.add_lun(1, LogicalUnit(RamBackstore(1 * MiB), 1))
    assert t.plain_read(A, 0, 0, 0, 1) is None
    # a CD-ROM answers from its own opcode table
    make_iso(tmp_path / "disc.iso")
    cd = CdromUnit(open_iso(tmp_path / "disc.iso"), 0)
    try:
        t2 = ScsiTarget("iqn.2026-11.org.bootfleet.test:cd", {0: cd})
        ready(t2, A)
        assert t2.execute(A, 0, read10(0, 1), None).status == 0
        assert t2.plain_read(A, 0, 0, 0, 1) is None
    finally:
        cd.close()
