"""The connection's states and dispatch, bytes in and PDUs out: CmdSN window, NOP, logout, Reject, digests, timers."""

from services.iscsi_target import events as ev
from services.iscsi_target import pdu as P
from services.iscsi_target.access import AccessPolicy
from shared.config.iscsi import AuthConfig
from tests.iscsi.fake_scsi import FakeTarget
from tests.iscsi.initiator import INITIATOR, TARGET, Initiator, logged_in, read10, write10


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
    assert msg.opcode == P.OP_ASYNC and msg.async_event == 1 and msg.async_parameter3 == 3  # log out within 3 s
    ini.conn.timer(5.0)
    assert ini.conn.closing


def test_login_must_complete_in_time():
    ini = Initiator(AccessPolicy(AuthConfig()), now=100.0)
    ini.conn.timer(110.0)
    assert not ini.conn.closing
    ini.conn.timer(131.0)
    assert ini.conn.closing and "login not completed" in ini.conn.close_reason
