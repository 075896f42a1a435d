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
