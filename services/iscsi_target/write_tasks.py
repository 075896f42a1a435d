"""Write tasks: a WRITE's data still to come (RFC 7143 §10.7, §11.8), a part of `Connection`.

A SCSI Command with W and an Expected Data Transfer Length either brought all its data (immediate data,
at most FirstBurstLength, only when ImmediateData=Yes: executed straight from the receive buffer) or is
parked here as a `WriteTask`. It then collects unsolicited Data-Out (reserved TTT, only when InitialR2T=No,
until the F bit, up to FirstBurstLength) and asks for the rest with one R2T at a time (MaxOutstandingR2T
1), each at most MaxBurstLength. DataSN and buffer offsets must come in order (DataPDUInOrder and
DataSequenceInOrder Yes). A sequence error ends that command with CHECK CONDITION (ABORTED COMMAND, DATA
PHASE ERROR) and drops the rest of its data; the session goes on. When all data is in, the command runs
(`Responses._execute`).

`WriteTasks` is a mixin of `Connection` (connection.py): it uses the connection's `tasks`, `failed_itts`,
`first_burst`, `max_burst`, `initial_r2t`, `immediate_data`, `session`, `writer` and `out`.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.iscsi_target import events as ev
from services.iscsi_target.pdu import (
    F_FINAL, REJECT_INVALID_FIELD, REJECT_PROTOCOL_ERROR, RSVD_TAG, encode_lun,
)
from services.iscsi_target.scsi import sense

MAX_WRITE_BUFFER = 64 << 20  # bytes of Data-Out one command may collect
# ILLEGAL REQUEST, INVALID FIELD IN CDB: a transfer larger than we hold in memory
SENSE_TOO_LARGE = sense.fixed_sense(sense.ILLEGAL_REQUEST, *sense.INVALID_FIELD_IN_CDB)
# ABORTED COMMAND, DATA PHASE ERROR: a Data-Out sequence we cannot accept
SENSE_DATA_PHASE_ERROR = sense.fixed_sense(sense.ABORTED_COMMAND, *sense.DATA_PHASE_ERROR)


@dataclass
class WriteTask:
    """A command waiting for Data-Out."""

    itt: int
    lun: int
    cdb: bytes
    flags: int
    edtl: int
    buf: bytearray
    received: int = 0
    unsolicited: bool = False  # unsolicited Data-Out still to come (command had F=0)
    datasn: int = 0  # next expected DataSN of the current sequence
    seq_end: int = 0  # buffer offset where the current solicited sequence ends
    ttt: int = RSVD_TAG  # the current R2T's tag
    r2tsn: int = 0
    start_ns: int = 0


class WriteTasks:
    """Connection's part that collects Data-Out (see the module docstring)."""

    def _write_command(self, pdu, lun: int, start: int) -> None:
        """A SCSI Command with W and EDTL > 0: run it now if all its data came with it, else park it."""
        flags = pdu.flags
        edtl = pdu.edtl
        data = pdu.data
        imm = len(data)
        if imm > edtl or (imm and not self.immediate_data) or imm > self.first_burst:
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            return
        if imm == edtl:
            self._execute(pdu.itt, lun, pdu.cdb, flags, edtl, data, start)
            return
        if edtl > MAX_WRITE_BUFFER:
            # We would have to hold it all in memory: refuse before allocating (the Block Limits VPD
            # page advertises 32 MiB per command). Data the initiator sends anyway is dropped.
            self.failed_itts.append(pdu.itt)
            self._respond(pdu.itt, sense.CHECK_CONDITION, SENSE_TOO_LARGE, [], 0, 0)
            return
        task = WriteTask(pdu.itt, lun, pdu.cdb, flags, edtl, bytearray(edtl), received=imm, start_ns=start)
        if imm:
            task.buf[:imm] = data
        task.unsolicited = not (flags & F_FINAL)
        if task.unsolicited and self.initial_r2t:
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            return
        self.tasks[pdu.itt] = task
        if not task.unsolicited:
            self._send_r2t(task)

    def _send_r2t(self, task: WriteTask) -> None:
        length = min(self.max_burst, task.edtl - task.received)
        task.ttt = self._new_ttt()
        task.datasn = 0
        task.seq_end = task.received + length
        self.out += self.writer.r2t(task.itt, task.ttt, encode_lun(task.lun), self.statsn, *self._cmdsn_words(),
                                    r2tsn=task.r2tsn, offset=task.received, length=length)
        task.r2tsn += 1

    def _data_out(self, pdu) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None:
            if pdu.ttt == RSVD_TAG or pdu.itt in self.failed_itts:
                return  # data for a command already answered: discard (§10.7)
            self._reject(pdu.bhs, REJECT_INVALID_FIELD)
            return
        data = pdu.data
        n = len(data)
        offset = pdu.buffer_offset
        solicited = pdu.ttt != RSVD_TAG
        if solicited:
            if task.unsolicited or pdu.ttt != task.ttt:
                return self._fail_task(task, f"Data-Out with an unknown TTT 0x{pdu.ttt:08x}")
            limit = task.seq_end
        else:
            if not task.unsolicited:
                return self._fail_task(task, "unsolicited Data-Out after the unsolicited burst")
            limit = min(task.edtl, self.first_burst)
        if pdu.datasn != task.datasn:
            return self._fail_task(task, f"Data-Out DataSN {pdu.datasn}, expected {task.datasn}")
        if offset != task.received or offset + n > limit:
            return self._fail_task(task, f"Data-Out offset {offset}+{n} out of order or beyond the burst")
        task.buf[offset : offset + n] = data
        task.received += n
        task.datasn += 1
        if not pdu.flags & F_FINAL:
            return
        if solicited and task.received != task.seq_end:
            return self._fail_task(task, "Data-Out sequence ended before the R2T's length")
        task.unsolicited = False
        if task.received < task.edtl:
            self._send_r2t(task)
            return
        del self.tasks[task.itt]
        self._execute(task.itt, task.lun, task.cdb, task.flags, task.edtl, memoryview(task.buf), task.start_ns)

    def _fail_task(self, task: WriteTask, reason: str) -> None:
        """A Data-Out sequence error. ErrorRecoveryLevel 0 cannot recover the data, but the session can
        go on: the command ends with CHECK CONDITION (ABORTED COMMAND, DATA PHASE ERROR) and the rest of
        its Data-Out is dropped."""
        del self.tasks[task.itt]
        self.failed_itts.append(task.itt)
        self._respond(task.itt, sense.CHECK_CONDITION, SENSE_DATA_PHASE_ERROR, [], 0, 0)
        stats = self.session.lun_stats(task.lun)
        stats.others += 1
        stats.done(task.cdb[0], self.clock_ns() - task.start_ns)
        self.events.append(ev.Error(where="data-out", error=reason, level="warning"))
