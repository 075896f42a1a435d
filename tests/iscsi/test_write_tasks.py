"""Write tasks: immediate and unsolicited data, R2T, Data-Out sequence errors, oversize writes."""

from services.iscsi_target import pdu as P
from services.iscsi_target.scsi import sense
from tests.iscsi.initiator import TARGET, logged_in, sense_of, write10


def test_write_immediate_executes_from_receive_buffer():
    ini = logged_in()
    lun = ini.registry.entries[TARGET].scsi.luns[0]
    _, raw = ini.cmd(write10(2, 1), edtl=512, write=True, data=b"\x5a" * 512)
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.status == 0
    assert lun.data[1024:1536] == b"\x5a" * 512


def test_write_with_r2t_and_unsolicited_data():
    ini = logged_in([("InitialR2T", "No"), ("ImmediateData", "Yes"), ("FirstBurstLength", "1024"),
                     ("MaxBurstLength", "2048")])
    lun = ini.registry.entries[TARGET].scsi.luns[0]
    payload = bytes(range(256)) * 20  # 5120 bytes = 10 blocks
    itt, raw = ini.cmd(write10(0, 10), edtl=5120, write=True, data=payload[:512], final=False)
    assert ini.send(raw) == []
    (r2t,) = ini.send(ini.data_out(itt, 0xFFFFFFFF, 0, 512, payload[512:1024]))
    assert r2t.opcode == P.OP_R2T and r2t.buffer_offset == 1024 and r2t.desired_length == 2048 and r2t.r2tsn == 0
    ttt = r2t.ttt
    assert ini.send(ini.data_out(itt, ttt, 0, 1024, payload[1024:2048], final=False)) == []
    (r2t2,) = ini.send(ini.data_out(itt, ttt, 1, 2048, payload[2048:3072]))
    assert r2t2.r2tsn == 1 and r2t2.buffer_offset == 3072 and r2t2.desired_length == 2048
    (rsp,) = ini.send(ini.data_out(itt, r2t2.ttt, 0, 3072, payload[3072:]))
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.status == 0
    assert bytes(lun.data[:5120]) == payload


def test_write_initial_r2t_yes_starts_with_r2t():
    ini = logged_in([("InitialR2T", "Yes"), ("ImmediateData", "No")])
    itt, raw = ini.cmd(write10(0, 2), edtl=1024, write=True)
    (r2t,) = ini.send(raw)
    assert r2t.opcode == P.OP_R2T and r2t.buffer_offset == 0 and r2t.desired_length == 1024


def test_bad_datasn_fails_the_command_not_the_session():
    ini = logged_in([("InitialR2T", "Yes"), ("MaxRecvDataSegmentLength", "512")])
    lun = ini.registry.entries[TARGET].scsi.luns[0]
    itt, raw = ini.cmd(write10(0, 2), edtl=1024, write=True)
    (r2t,) = ini.send(raw)
    assert ini.send(ini.data_out(itt, r2t.ttt, 0, 0, b"x" * 512, final=False)) == []
    (rsp,) = ini.send(ini.data_out(itt, r2t.ttt, 0, 512, b"x" * 512))  # DataSN 0 again
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.status == sense.CHECK_CONDITION
    assert sense_of(rsp) == (sense.ABORTED_COMMAND, *sense.DATA_PHASE_ERROR)
    assert lun.data[:1024] == bytes(1024) and not ini.conn.closing
    assert ini.send(ini.data_out(itt, r2t.ttt, 2, 1024, b"x" * 512)) == []  # late data is dropped


def test_huge_write_is_refused_before_allocating():
    ini = logged_in()
    itt, raw = ini.cmd(write10(0, 0xFFFF), edtl=0xFFFFFFFF, write=True, data=b"x" * 512, final=False)
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.status == sense.CHECK_CONDITION
    assert sense_of(rsp) == (sense.ILLEGAL_REQUEST, *sense.INVALID_FIELD_IN_CDB)
    assert not ini.conn.tasks
    assert ini.send(ini.data_out(itt, 0xFFFFFFFF, 0, 512, b"y" * 512)) == []
