"""The full feature phase of a connection, bytes in and PDUs out, against a fake SCSI layer."""

from services.iscsi_target import events as ev
from services.iscsi_target import pdu as P
from services.iscsi_target.access import AccessPolicy
from services.iscsi_target.scsi import sense
from services.iscsi_target.task_management import (
    TMF_ABORT_TASK, TMF_COMPLETE, TMF_LUN_RESET, TMF_NO_LUN, TMF_NO_REASSIGN, TMF_NO_TASK, TMF_TARGET_WARM_RESET,
    TMF_TASK_REASSIGN,
)
from shared.config.iscsi import AuthConfig
from tests.iscsi.fake_scsi import FakeLun, FakeTarget
from tests.iscsi.initiator import INITIATOR, TARGET, Initiator, read10, sense_length, sense_of, write10


def logged_in(keys=(), **kw):
    ini = Initiator(AccessPolicy(AuthConfig()), **kw)
    rsp = ini.login(list(keys))
    assert rsp.login_status == 0
    return ini


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


def test_cmdsn_outside_window_is_silently_ignored():
    ini = logged_in()
    _, raw = ini.cmd(b"\x00" * 6, cmdsn=ini.cmdsn + 1000)
    assert ini.send(raw) == []
    _, raw = ini.cmd(b"\x00" * 6, cmdsn=ini.cmdsn - 1)
    assert ini.send(raw) == []
    _, raw = ini.cmd(b"\x00" * 6)
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.status == 0
    assert rsp.max_cmdsn == (rsp.exp_cmdsn + 31) & 0xFFFFFFFF  # MaxCmdSN = ExpCmdSN + window - 1


def test_nop_out_echo_and_target_ping():
    ini = logged_in(now=0.0, nop_interval=5, nop_timeout=2)
    itt, raw = ini.simple(P.OP_NOP_OUT, w0=0xFFFFFFFF, data=b"hello", immediate=True)
    (nop,) = ini.send(raw)
    assert nop.opcode == P.OP_NOP_IN and nop.itt == itt and nop.data == b"hello" and nop.ttt == P.RSVD_TAG
    ini.conn.timer(3.0)
    assert ini.take() == []
    ini.conn.timer(6.0)
    (ping,) = ini.take()
    assert ping.opcode == P.OP_NOP_IN and ping.itt == P.RSVD_TAG and ping.ttt != P.RSVD_TAG
    _, raw = ini.simple(P.OP_NOP_OUT, w0=ping.ttt, itt=0xFFFFFFFF, immediate=True)
    assert ini.send(raw, now=6.5) == []
    ini.conn.timer(12.0)
    (ping2,) = ini.take()
    ini.conn.timer(14.5)
    assert ini.conn.closing and "NOP" in ini.conn.close_reason


def test_task_management():
    scsi = FakeTarget(TARGET)
    ini = logged_in([("InitialR2T", "Yes")], scsi=scsi)
    itt, raw = ini.cmd(write10(0, 2), edtl=1024, write=True)
    ini.send(raw)
    assert itt in ini.conn.tasks
    _, raw = ini.simple(P.OP_TMF_REQ, flags=0x80 | TMF_ABORT_TASK, w0=itt, immediate=True, words_tail=(ini.cmdsn - 1, 0, 0, 0))
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_TMF_RSP and rsp.response == TMF_COMPLETE and not ini.conn.tasks
    _, raw = ini.simple(P.OP_TMF_REQ, flags=0x80 | TMF_ABORT_TASK, w0=0x1234, immediate=True, words_tail=(0, 0, 0, 0))
    (rsp,) = ini.send(raw)
    assert rsp.response == TMF_NO_TASK  # completed long ago
    _, raw = ini.simple(P.OP_TMF_REQ, flags=0x80 | TMF_LUN_RESET, immediate=True)
    (rsp,) = ini.send(raw)
    assert rsp.response == TMF_COMPLETE and scsi.tmf_calls == [(TMF_LUN_RESET, 0)]
    _, raw = ini.simple(P.OP_TMF_REQ, flags=0x80 | TMF_LUN_RESET, immediate=True, lun=P.encode_lun(9))
    (rsp,) = ini.send(raw)
    assert rsp.response == TMF_NO_LUN
    _, raw = ini.simple(P.OP_TMF_REQ, flags=0x80 | TMF_TARGET_WARM_RESET, immediate=True)
    (rsp,) = ini.send(raw)
    assert rsp.response == TMF_COMPLETE and scsi.tmf_calls[-1] == (TMF_TARGET_WARM_RESET, 0)
    _, raw = ini.simple(P.OP_TMF_REQ, flags=0x80 | TMF_TASK_REASSIGN, immediate=True)
    (rsp,) = ini.send(raw)
    assert rsp.response == TMF_NO_REASSIGN


def test_sendtargets_in_discovery_session():
    ini = Initiator(AccessPolicy(AuthConfig()))
    rsp = ini.login(session_type="Discovery")
    assert rsp.login_status == 0
    _, raw = ini.simple(P.OP_TEXT_REQ, w0=0xFFFFFFFF, data=P.encode_text([("SendTargets", "All")]))
    (txt,) = ini.send(raw)
    assert txt.opcode == P.OP_TEXT_RSP and txt.final
    assert P.decode_text(txt.data) == [("TargetName", TARGET), ("TargetAddress", "127.0.0.1:3260,1")]
    # SCSI commands have no place in a discovery session
    _, raw = ini.cmd(b"\x00" * 6)
    (rej,) = ini.send(raw)
    assert rej.opcode == P.OP_REJECT


def test_long_text_answer_is_continued():
    ini = Initiator(AccessPolicy(AuthConfig()))
    for i in range(300):
        name = f"iqn.2026-11.org.test:t{i:04d}"
        ini.registry.entries[name] = ini.registry.entries[TARGET]
    ini.login([("MaxRecvDataSegmentLength", "512")], session_type="Discovery")
    itt, raw = ini.simple(P.OP_TEXT_REQ, w0=0xFFFFFFFF, data=P.encode_text([("SendTargets", "All")]))
    chunks = []
    (txt,) = ini.send(raw)
    while True:
        chunks.append(txt.data)
        assert len(txt.data) <= 512
        if txt.final:
            break
        _, raw = ini.simple(P.OP_TEXT_REQ, w0=txt.ttt, itt=itt)
        (txt,) = ini.send(raw)
    names = [v for k, v in P.decode_text(b"".join(chunks)) if k == "TargetName"]
    assert len(names) == 301


def test_logout_closes_session():
    scsi = FakeTarget(TARGET)
    ini = logged_in(scsi=scsi)
    itt, raw = ini.simple(P.OP_LOGOUT_REQ, flags=0x80, immediate=True)
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_LOGOUT_RSP and rsp.response == 0 and rsp.itt == itt
    assert ini.conn.closing and len(ini.sessions) == 0 and scsi.lost
    assert ini.events[-1] == ev.Logout(ip="127.0.0.1", initiator=INITIATOR, target=TARGET, tsih=ini.tsih,
                                       reason="logout")


def test_logout_for_recovery_is_not_supported():
    ini = logged_in()
    _, raw = ini.simple(P.OP_LOGOUT_REQ, flags=0x80 | 2, immediate=True)
    (rsp,) = ini.send(raw)
    assert rsp.response == 2 and not ini.conn.closing  # recovery: not supported


def test_reject_unknown_opcode_and_snack_keeps_session():
    ini = logged_in()
    (rej,) = ini.send(P.encode_request(0x1C, flags=0x80, itt=5))
    assert rej.opcode == P.OP_REJECT and rej.response == P.REJECT_NOT_SUPPORTED
    assert P.parse_header(rej.data).opcode == 0x1C and P.parse_header(rej.data).itt == 5  # the offending header
    (rej,) = ini.send(P.encode_request(P.OP_SNACK, flags=0x80, itt=6))
    assert rej.opcode == P.OP_REJECT
    _, raw = ini.cmd(b"\x00" * 6)
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_SCSI_RSP


def test_digests_after_login():
    ini = logged_in([("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")])
    assert ini.hd and ini.dd
    _, raw = ini.cmd(read10(0, 1), edtl=512, read=True)
    (din,) = ini.send(raw)
    assert len(din.data) == 512
    bad = bytearray(ini.cmd(write10(0, 1), edtl=512, write=True, data=b"z" * 512)[1])
    bad[-10] ^= 0xFF  # corrupt the data: rejected, connection goes on
    (rej,) = ini.send(bytes(bad))
    assert rej.opcode == P.OP_REJECT and rej.response == P.REJECT_DATA_DIGEST and not ini.conn.closing


def test_target_requested_logout():
    ini = logged_in()
    ini.conn.request_logout(now=1.0, grace=3)
    (msg,) = ini.take()
    assert msg.opcode == P.OP_ASYNC and msg.async_event == 1  # logout requested
    ini.conn.timer(5.0)
    assert ini.conn.closing


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


def test_huge_write_is_refused_before_allocating():
    ini = logged_in()
    itt, raw = ini.cmd(write10(0, 0xFFFF), edtl=0xFFFFFFFF, write=True, data=b"x" * 512, final=False)
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_SCSI_RSP and rsp.status == sense.CHECK_CONDITION
    assert sense_of(rsp) == (sense.ILLEGAL_REQUEST, *sense.INVALID_FIELD_IN_CDB)
    assert not ini.conn.tasks
    assert ini.send(ini.data_out(itt, 0xFFFFFFFF, 0, 512, b"y" * 512)) == []


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


def test_login_must_complete_in_time():
    ini = Initiator(AccessPolicy(AuthConfig()), now=100.0)
    ini.conn.timer(110.0)
    assert not ini.conn.closing
    ini.conn.timer(131.0)
    assert ini.conn.closing and "login not completed" in ini.conn.close_reason
