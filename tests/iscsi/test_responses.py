"""Running a command and answering it: Data-In with the status, SCSI Response with sense, residuals, counters."""

from services.iscsi_target import events as ev
from services.iscsi_target import pdu as P
from services.iscsi_target.scsi import sense
from tests.iscsi.fake_scsi import FakeLun, FakeTarget
from tests.iscsi.initiator import INITIATOR, TARGET, logged_in, read10, sense_length, sense_of, write10


def test_read_single_data_in_carries_status():
    ini = logged_in()
    lun = ini.registry.entries[TARGET].scsi.luns[0]
    lun.data[512:1024] = b"\xab" * 512
    itt, raw = ini.cmd(read10(1, 1), edtl=512, read=True)
    (din,) = ini.send(raw)
    assert din.opcode == P.OP_DATA_IN and din.itt == itt
    assert din.flags == P.F_FINAL | P.F_STATUS and din.status == 0
    assert din.data == b"\xab" * 512
    assert din.statsn == ini.statsn
    assert din.exp_cmdsn == ini.cmdsn  # advanced past the command


def test_read_split_by_initiator_max_recv_data_segment_length():
    ini = logged_in([("MaxRecvDataSegmentLength", "4096")])
    itt, raw = ini.cmd(read10(0, 20), edtl=20 * 512, read=True)
    pdus = ini.send(raw)
    assert [len(p.data) for p in pdus] == [4096, 4096, 2048]
    assert [p.datasn for p in pdus] == [0, 1, 2]
    assert [p.buffer_offset for p in pdus] == [0, 4096, 8192]
    assert pdus[-1].flags & P.F_STATUS and not pdus[0].flags & P.F_STATUS


def test_read_residuals():
    ini = logged_in()
    _, raw = ini.cmd(read10(0, 1), edtl=200, read=True)
    (din,) = ini.send(raw)
    assert len(din.data) == 200 and din.flags & P.F_OVERFLOW and din.residual == 312
    _, raw = ini.cmd(read10(0, 1), edtl=10000, read=True)
    (din,) = ini.send(raw)
    assert len(din.data) == 512 and din.flags & P.F_UNDERFLOW and din.residual == 10000 - 512
    _, raw = ini.cmd(read10(0, 1), edtl=0, read=True)
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.flags & P.F_OVERFLOW and rsp.residual == 512


def test_check_condition_sends_sense_in_scsi_response():
    ini = logged_in()
    _, raw = ini.cmd(read10(10**6, 1), edtl=512, read=True)
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.status == sense.CHECK_CONDITION
    assert sense_length(rsp) == 18
    assert sense_of(rsp) == (sense.ILLEGAL_REQUEST, *sense.LBA_OUT_OF_RANGE)


def test_write_residuals_move_the_smaller_of_edtl_and_cdb_length():
    ini = logged_in()
    lun = ini.registry.entries[TARGET].scsi.luns[0]
    _, raw = ini.cmd(write10(0, 1), edtl=200, write=True, data=b"b" * 200)  # not whole blocks: refused
    (rsp,) = ini.send(raw)
    assert rsp.status == sense.CHECK_CONDITION and rsp.flags & P.F_OVERFLOW and rsp.residual == 312
    assert sense_of(rsp) == (sense.ILLEGAL_REQUEST, *sense.INVALID_FIELD_IN_INFORMATION_UNIT)
    assert lun.data[:512] == bytes(512)
    _, raw = ini.cmd(write10(0, 1), edtl=1024, write=True, data=b"b" * 1024)  # EDTL > CDB: one block
    (rsp,) = ini.send(raw)
    assert rsp.status == 0 and rsp.flags & P.F_UNDERFLOW and rsp.residual == 512
    assert lun.data[:1024] == b"b" * 512 + bytes(512)
    _, raw = ini.cmd(write10(2, 2), edtl=512, write=True, data=b"c" * 512)  # EDTL < CDB: first block only
    (rsp,) = ini.send(raw)
    assert rsp.status == 0 and rsp.flags & P.F_OVERFLOW and rsp.residual == 512
    assert lun.data[1024:2048] == b"c" * 512 + bytes(512)
    _, raw = ini.cmd(write10(4, 1), write=True)  # EDTL 0: nothing moves, nothing written
    (rsp,) = ini.send(raw)
    assert rsp.status == 0 and rsp.flags & P.F_OVERFLOW and rsp.residual == 512


def test_io_stats_and_first_read_event():
    ini = logged_in()
    for _ in range(3):
        _, raw = ini.cmd(read10(0, 2), edtl=1024, read=True)
        ini.send(raw)
    _, raw = ini.cmd(write10(0, 1), edtl=512, write=True, data=b"q" * 512)
    ini.send(raw)
    st = ini.conn.session.stats[0]
    assert (st.reads, st.writes, st.read_bytes, st.write_bytes) == (3, 1, 3072, 512)
    assert st.latency_ns > 0
    assert ini.events_of(ev.FirstRead) == [ev.FirstRead(ip="127.0.0.1", initiator=INITIATOR, target=TARGET,
                                                       tsih=ini.tsih, lun=0)]


def test_unknown_lun():
    ini = logged_in(scsi=FakeTarget(TARGET, {0: FakeLun()}))
    _, raw = ini.cmd(read10(0, 1), edtl=512, read=True, lun=3)
    (rsp,) = ini.send(raw)
    assert rsp.status == sense.CHECK_CONDITION and sense_of(rsp) == (sense.ILLEGAL_REQUEST, *sense.LUN_NOT_SUPPORTED)


def test_scsi_layer_exception_becomes_check_condition():
    class Broken(FakeTarget):
        def execute(self, nexus, lun, cdb, data_out):
            raise RuntimeError("boom")

    ini = logged_in(scsi=Broken(TARGET))
    _, raw = ini.cmd(read10(0, 1), edtl=512, read=True)
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.status == sense.CHECK_CONDITION
    assert sense_of(rsp) == (sense.HARDWARE_ERROR, *sense.INTERNAL_TARGET_FAILURE)
    assert not ini.conn.closing
    assert any("boom" in e.error for e in ini.events_of(ev.Error))


class StepClock:
    """clock_ns for a connection: each command's start at 0, its end `latencies[i]` ns later, in order."""

    def __init__(self, *latencies):
        self.latencies, self.calls = list(latencies), 0

    def __call__(self):
        self.calls += 1
        return 0 if self.calls % 2 else self.latencies.pop(0)


def test_every_command_counts_once_by_opcode_and_latency_bucket():
    from shared.iscsi_latency import BUCKETS, LATENCY_BOUNDS_NS

    assert LATENCY_BOUNDS_NS[:4] == (50_000, 100_000, 250_000, 500_000) and BUCKETS == len(LATENCY_BOUNDS_NS) + 1
    clock = StepClock(40_000, 50_000, 300_000, 2_000_000_000, 70_000, 1_000, 120_000)
    ini = logged_in(clock_ns=clock)
    for cdb, kw in [(read10(0, 1), dict(edtl=512, read=True)),  # 40 us: <= 50 us
                    (read10(0, 1), dict(edtl=512, read=True)),  # exactly 50 us: still the 50 us bucket (le)
                    (write10(0, 1), dict(edtl=512, write=True, data=b"w" * 512)),  # 300 us: <= 500 us
                    (bytes([0x12, 0, 0, 0, 36, 0]), dict(edtl=36, read=True)),  # 2 s: above every bound
                    (bytes([0x35]) + bytes(9), {}),  # SYNCHRONIZE CACHE 10, 70 us
                    (read10(0, 1), dict(edtl=512, read=True, lun=5)),  # no such LUN: answered, counted as other
                    (write10(0, 1), dict(edtl=200, write=True, data=b"x" * 200))]:  # refused (not whole blocks)
        _, raw = ini.cmd(cdb, **kw)
        ini.send(raw)
    st = ini.conn.session.stats[0]
    assert (st.reads, st.writes, st.others) == (2, 1, 3)  # INQUIRY, SYNCHRONIZE CACHE, the refused WRITE
    want = [0] * BUCKETS
    want[0], want[1], want[2], want[3], want[-1] = 2, 1, 1, 1, 1  # 40+50 us, 70 us, 120 us, 300 us, 2 s
    assert st.buckets == want
    assert st.latency_ns == 40_000 + 50_000 + 300_000 + 2_000_000_000 + 70_000 + 120_000
    assert (st.ops[0x28], st.ops[0x2A], st.ops[0x12], st.ops[0x35], sum(st.ops)) == (2, 2, 1, 1, 6)
    other = ini.conn.session.stats[5]  # the unknown LUN's command: counted under that LUN, 1 us
    assert (other.others, other.ops[0x28], other.buckets[0], sum(other.buckets)) == (1, 1, 1, 1)
    snap = st.snapshot()
    assert snap[:6] == (2, 1, 3, 1024, 512, st.latency_ns) and snap[6] == tuple(want) and len(snap[7]) == 256


def test_plain_reads_of_the_real_scsi_layer_skip_execute_and_answer_the_same():
    """READ(10)/(16) that need none of execute's checks are answered by the fast path (Responses._read_now);
    the first READ of a new nexus (its unit attention), residuals and reads beyond one Data-In still go
    through execute."""
    from services.iscsi_target.scsi import LogicalUnit, RamBackstore, ScsiTarget

    store = RamBackstore(1 << 20)
    store.write(0, bytes(range(256)) * 4096)
    scsi = ScsiTarget(TARGET, {0: LogicalUnit(store, 0)})
    executed = []
    real = scsi.execute
    scsi.execute = lambda nexus, lun, cdb, data_out=None: executed.append(cdb[0]) or real(nexus, lun, cdb, data_out)
    ini = logged_in([("MaxRecvDataSegmentLength", "8192")], scsi=scsi)

    _, raw = ini.cmd(read10(0, 1), edtl=512, read=True)
    (rsp,) = ini.send(raw)
    assert sense_of(rsp) == (sense.UNIT_ATTENTION, 0x29, 0x00) and executed == [0x28]
    itt, raw = ini.cmd(read10(3, 2), edtl=1024, read=True)
    (din,) = ini.send(raw)
    assert executed == [0x28]  # not asked again
    assert din.opcode == P.OP_DATA_IN and din.itt == itt and din.flags == P.F_FINAL | P.F_STATUS
    assert din.status == 0 and din.statsn == rsp.statsn + 1 and din.exp_cmdsn == ini.cmdsn
    assert din.data == bytes(store.read(3 * 512, 1024))
    cdb16 = bytes([0x88, 0]) + (2000).to_bytes(8, "big") + (8).to_bytes(4, "big") + bytes(2)
    _, raw = ini.cmd(cdb16, edtl=4096, read=True)
    (din,) = ini.send(raw)
    assert din.data == bytes(store.read(2000 * 512, 4096)) and executed == [0x28]
    st = ini.conn.session.stats[0]
    assert (st.reads, st.read_bytes, st.ops[0x28], st.ops[0x88], sum(st.buckets)) == (2, 5120, 2, 1, 3)
    assert len(ini.events_of(ev.FirstRead)) == 1
    # a residual: answered from the data read, cut and flagged as the general path does
    _, raw = ini.cmd(read10(0, 1), edtl=200, read=True)
    (din,) = ini.send(raw)
    assert len(din.data) == 200 and din.flags & P.F_OVERFLOW and din.residual == 312 and executed == [0x28]
    # more than one Data-In (MaxRecvDataSegmentLength 8192): the general path's sequence
    _, raw = ini.cmd(read10(0, 32), edtl=16384, read=True)
    pdus = ini.send(raw)
    assert [len(p.data) for p in pdus] == [8192, 8192] and executed == [0x28, 0x28]
    assert b"".join(p.data for p in pdus) == bytes(store.read(0, 16384))
    # past the end: execute's sense
    _, raw = ini.cmd(read10(2048, 1), edtl=512, read=True)
    (rsp,) = ini.send(raw)
    assert sense_of(rsp) == (sense.ILLEGAL_REQUEST, *sense.LBA_OUT_OF_RANGE)
