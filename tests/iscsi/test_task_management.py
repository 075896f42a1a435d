"""Task management requests against a fake SCSI layer."""

from services.iscsi_target import pdu as P
from services.iscsi_target.task_management import (
    TMF_ABORT_TASK, TMF_COMPLETE, TMF_LUN_RESET, TMF_NO_LUN, TMF_NO_REASSIGN, TMF_NO_TASK, TMF_TARGET_WARM_RESET,
    TMF_TASK_REASSIGN,
)
from tests.iscsi.fake_scsi import FakeTarget
from tests.iscsi.initiator import TARGET, logged_in, write10


def test_task_management():
    scsi = FakeTarget(TARGET)
    ini = logged_in([("InitialR2T", "Yes")], scsi=scsi)
    itt, raw = ini.cmd(write10(0, 2), edtl=1024, write=True)
    ini.send(raw)
    assert itt in ini.conn.tasks
    _, raw = ini.simple(P.OP_TMF_REQ, flags=0x80 | TMF_ABORT_TASK, w0=itt, immediate=True,
                        words_tail=(ini.cmdsn - 1, 0, 0, 0))  # referenced ITT, RefCmdSN
    (rsp,) = ini.send(raw)
    assert rsp.opcode == P.OP_TMF_RSP and rsp.response == TMF_COMPLETE and not ini.conn.tasks
    _, raw = ini.simple(P.OP_TMF_REQ, flags=0x80 | TMF_ABORT_TASK, w0=0x1234, immediate=True,
                        words_tail=(0, 0, 0, 0))
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
