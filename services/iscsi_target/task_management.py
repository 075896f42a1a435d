"""Task management (RFC 7143 §11.5, §11.6), a part of `Connection`.

ABORT TASK and ABORT TASK SET drop commands still waiting for Data-Out here (a task that already
completed answers "task does not exist"; one not received yet counts as received and aborted). CLEAR TASK
SET, LOGICAL UNIT RESET, TARGET WARM/COLD RESET and CLEAR ACA also go to the SCSI layer (unit attentions,
reservations); COLD RESET closes the connection after its answer; TASK REASSIGN is not supported at
ErrorRecoveryLevel 0.

`TaskManagement` is a mixin of `Connection` (connection.py): it uses the connection's `session`, `tasks`,
`scsi`, `nexus`, `writer`, `out` and `events`.
"""

from __future__ import annotations

from services.iscsi_target import events as ev
from services.iscsi_target.pdu import decode_lun
from services.iscsi_target.session import sn_le, sn_lt

# TMF functions (§11.5.1) and responses (§11.6.1)
TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_ACA, TMF_CLEAR_TASK_SET = 1, 2, 3, 4
TMF_LUN_RESET, TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET, TMF_TASK_REASSIGN = 5, 6, 7, 8
TMF_COMPLETE, TMF_NO_TASK, TMF_NO_LUN, TMF_NO_REASSIGN, TMF_NOT_SUPPORTED = 0, 1, 2, 4, 5
TMF_REJECTED = 0xFF


class TaskManagement:
    """Connection's part that answers Task Management Requests (see the module docstring)."""

    def _tmf(self, pdu) -> None:
        s = self.session
        if not s.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        function = pdu.flags & 0x7F
        lun = decode_lun(pdu.lun)
        ref_itt = pdu.referenced_itt
        ref_cmdsn = pdu.ref_cmdsn
        response = TMF_NOT_SUPPORTED
        close_after = False
        if self.scsi is None:
            response = TMF_NOT_SUPPORTED
        elif function == TMF_ABORT_TASK:
            task = self.tasks.get(ref_itt)
            if task is not None:
                del self.tasks[ref_itt]
                response = TMF_COMPLETE
            elif sn_le(s.exp_cmdsn, ref_cmdsn) and sn_lt(ref_cmdsn, pdu.cmdsn if not pdu.immediate else s.exp_cmdsn):
                response = TMF_COMPLETE  # not received yet: it counts as received and aborted (§11.5.1)
            else:
                response = TMF_NO_TASK  # completed already, or never existed
        elif function in (TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET, TMF_CLEAR_ACA):
            if lun not in self.scsi.luns:
                response = TMF_NO_LUN
            else:
                if function != TMF_CLEAR_ACA:
                    for itt in [i for i, t in self.tasks.items() if t.lun == lun]:
                        del self.tasks[itt]
                response = TMF_COMPLETE if function == TMF_ABORT_TASK_SET else self._scsi_tmf(function, lun)
        elif function in (TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET):
            self.tasks.clear()
            response = self._scsi_tmf(TMF_TARGET_WARM_RESET, lun)
            close_after = function == TMF_TARGET_COLD_RESET and response == TMF_COMPLETE
        elif function == TMF_TASK_REASSIGN:
            response = TMF_NO_REASSIGN
        self.out += self.writer.tmf_response(pdu.itt, response, self._next_statsn(), *self._cmdsn_words())
        if close_after:
            self._close("TARGET COLD RESET")

    def _scsi_tmf(self, function: int, lun: int) -> int:
        try:
            return self.scsi.task_management(self.nexus, function, lun)
        except Exception as exc:  # noqa: BLE001 - report and answer "rejected" rather than drop the session
            self.events.append(ev.Error(where="task_management", error=repr(exc)))
            return TMF_REJECTED
