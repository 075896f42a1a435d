"""A SCSI command executed and answered (RFC 7143 §11.4, §11.7), a part of `Connection`.

- A READ's data goes out as Data-In PDUs of at most the initiator's MaxRecvDataSegmentLength (F at the end
  of every MaxBurstLength sequence), with the status in the last one (S bit) when there is no sense data:
  the common 64 KiB READ is one Data-In, its data memoryview slices of the image (never copied here).
- A CHECK CONDITION goes in a SCSI Response with its sense data (built by scsi/sense.py).
- Residuals compare what the command moves with the Expected Data Transfer Length (EDTL): a READ returns
  min(EDTL, its data) with O/U set; a plain WRITE moves min(EDTL, its transfer length) in whole blocks
  (else CHECK CONDITION, INVALID FIELD IN COMMAND INFORMATION UNIT); other data-out commands must match.
- Per-LUN counters (session.LunStats: every command answered here counts once, with its opcode and its latency
  bucket) and the session's first READ (an `events.FirstRead`).

`Responses` is a mixin of `Connection` (connection.py): it uses the connection's `scsi`, `nexus`,
`session`, `send_max`, `max_burst`, `writer`, `out`, `events` and `clock_ns`.
"""

from __future__ import annotations

from services.iscsi_target import events as ev
from services.iscsi_target.pdu import F_OVERFLOW, F_READ, F_UNDERFLOW, F_WRITE
from services.iscsi_target.scsi import sense
from services.iscsi_target.scsi.cdb import RW10, RW16
from services.iscsi_target.scsi.response import ScsiResponse
from services.iscsi_target.scsi.sense import CHECK_CONDITION, GOOD

_RW10, _RW16 = RW10.unpack_from, RW16.unpack_from
READ_OPCODES = frozenset({0x08, 0x28, 0xA8, 0x88})
ANY_LUN_OPCODES = frozenset({0x12, 0xA0, 0x03})  # INQUIRY, REPORT LUNS, REQUEST SENSE answer for any LUN
# Plain WRITE / WRITE AND VERIFY opcodes -> (offset, size) of their TRANSFER LENGTH field
_WRITE_LENGTH = {0x0A: (4, 1), 0x2A: (7, 2), 0x2E: (7, 2), 0xAA: (6, 4), 0xAE: (6, 4), 0x8A: (10, 4), 0x8E: (10, 4)}

SENSE_INVALID_IU = sense.fixed_sense(sense.ILLEGAL_REQUEST, *sense.INVALID_FIELD_IN_INFORMATION_UNIT)
SENSE_NO_LUN = sense.fixed_sense(sense.ILLEGAL_REQUEST, *sense.LUN_NOT_SUPPORTED)  # the SCSI layer is not asked
SENSE_INTERNAL_FAILURE = sense.fixed_sense(sense.HARDWARE_ERROR, *sense.INTERNAL_TARGET_FAILURE)


class _Failed:
    """The answer to a command the SCSI layer raised on: HARDWARE ERROR, INTERNAL TARGET FAILURE."""

    status = CHECK_CONDITION
    sense = SENSE_INTERNAL_FAILURE
    data: list = []


def _cut(parts: list, limit: int) -> list:
    """The first `limit` bytes of a list of buffers (slices, no copies)."""
    out = []
    for p in parts:
        if limit <= 0:
            break
        n = len(p)
        if n <= limit:
            out.append(p)
            limit -= n
        else:
            out.append(memoryview(p)[:limit])
            limit = 0
    return out


def _chunks(parts: list, size: int):
    """Split a list of buffers into consecutive lists of at most `size` bytes each."""
    chunk: list = []
    room = size
    for p in parts:
        view = p
        while len(view):
            if len(view) <= room:
                chunk.append(view)
                room -= len(view)
                view = b""
            else:
                mv = memoryview(view)
                chunk.append(mv[:room])
                view = mv[room:]
                room = 0
            if room == 0:
                yield chunk
                chunk, room = [], size
    if chunk:
        yield chunk


def _fit_write(cdb: bytes, spdtl: int, got: int) -> bytes | None:
    """The CDB of a plain WRITE cut down to the `got` bytes the initiator sent (whole blocks), else None."""
    field = _WRITE_LENGTH.get(cdb[0])
    if field is None:
        return None
    offset, size = field
    blocks = int.from_bytes(cdb[offset : offset + size], "big") or (256 if cdb[0] == 0x0A else 0)
    if not blocks or spdtl % blocks:
        return None
    block = spdtl // blocks
    if got > spdtl:
        return cdb  # underflow: the CDB stands, the extra data is ignored
    if got % block:
        return None
    fitted = bytearray(cdb)
    fitted[offset : offset + size] = (got // block).to_bytes(size, "big")
    return bytes(fitted)


class Responses:
    """Connection's part that runs commands and answers them (see the module docstring)."""

    def _execute(self, itt: int, lun: int, cdb: bytes, flags: int, edtl: int, data_out, start_ns: int) -> None:
        scsi = self.scsi
        stats = self.session.stats.get(lun) or self.session.lun_stats(lun)
        op = cdb[0]
        if op in READ_OPCODES and data_out is None and lun in scsi.luns:
            # The hot path: a READ moves no Data-Out, so none of the write-length checks below apply.
            resp = self._run_scsi(lun, cdb, None)
            self._answer_data_in(itt, lun, resp, flags, edtl, stats, True)
            stats.done(op, self.clock_ns() - start_ns)
            return
        if lun not in scsi.luns and op not in ANY_LUN_OPCODES:
            self._respond(itt, CHECK_CONDITION, SENSE_NO_LUN, [], 0, 0)
            stats.others += 1
            stats.done(op, self.clock_ns() - start_ns)
            return
        spdtl = scsi.data_out_length(lun, cdb) if lun in scsi.luns else 0
        got = len(data_out) if data_out is not None else 0
        short = 0  # the CDB wants more than the initiator sent: overflow residual
        if spdtl and spdtl != got:
            fitted = _fit_write(cdb, spdtl, got)
            if fitted is None:
                # Not a plain WRITE, or not whole blocks: refuse it whole rather than write part of it, and
                # say by how much with the residual.
                over = spdtl > got
                self._respond(itt, CHECK_CONDITION, SENSE_INVALID_IU, [], F_OVERFLOW if over else F_UNDERFLOW,
                              abs(spdtl - got))
                stats.others += 1
                stats.done(op, self.clock_ns() - start_ns)
                return
            # A plain WRITE moves min(EDTL, its own length) (SAM-5 5.4.2; libiscsi's residual tests).
            if spdtl > got:
                short = spdtl - got
                cdb = fitted
                spdtl = got
            else:
                data_out = data_out[:spdtl]
            if not spdtl:
                self._respond(itt, GOOD, None, [], F_OVERFLOW, short)
                stats.others += 1
                stats.done(op, self.clock_ns() - start_ns)
                return
        payload = data_out if spdtl else None
        resp = self._run_scsi(lun, cdb, payload)
        if short or (flags & F_WRITE and edtl):
            res_flag = residual = 0
            if short:
                res_flag, residual = F_OVERFLOW, short
            elif spdtl < edtl:
                res_flag, residual = F_UNDERFLOW, edtl - spdtl
            stats.writes += 1
            stats.write_bytes += spdtl
            parts = resp.data or []
            total = sum(len(p) for p in parts) if parts else 0
            self._respond(itt, resp.status, resp.sense, parts, res_flag, residual, total)
        else:
            self._answer_data_in(itt, lun, resp, flags, edtl, stats, op in READ_OPCODES)
        stats.done(op, self.clock_ns() - start_ns)

    def _read_now(self, pdu, lun: int, start_ns: int) -> bool:
        """The boot's command, a plain READ(10)/(16) of exactly EDTL bytes that fits one Data-In: answered
        here without the general path's layers (ScsiTarget.plain_read says when the SCSI layer needs none
        of its checks). False: not such a READ, nothing done."""
        bhs = pdu.bhs
        op = bhs[32]
        if op == 0x28:
            flags, lba, n = _RW10(bhs, 32)
        elif op == 0x88 and not pdu.ahs:
            flags, lba, n = _RW16(bhs, 32)
        else:
            return False
        edtl = pdu.w[0]
        if not pdu.flags & F_READ or edtl > self.send_max or edtl > self.max_burst:
            return False
        data = self.scsi.plain_read(self.nexus, lun, flags, lba, n)
        if data is None:
            return False
        if len(data) != edtl:  # a residual: the general answer
            self._answer_data_in(pdu.itt, lun, ScsiResponse(GOOD, None, [data]), pdu.flags, edtl,
                                 self.session.lun_stats(lun), True)
        else:
            stats = self.session.stats.get(lun) or self.session.lun_stats(lun)
            stats.reads += 1
            stats.read_bytes += edtl
            if not self.session.first_read_seen:
                self._first_read(lun)
            exp, maxc = self._cmdsn_words()
            self.out += self.writer.data_in(pdu.itt, [data], edtl, exp, maxc, status=GOOD, statsn=self._next_statsn())
        self.session.stats[lun].done(op, self.clock_ns() - start_ns)
        return True

    def _answer_data_in(self, itt: int, lun: int, resp, flags: int, edtl: int, stats, is_read: bool) -> None:
        """Answer a command with its Data-In (or none): cut to EDTL with the residual, count reads."""
        parts = resp.data or []
        total = (len(parts[0]) if len(parts) == 1 else sum(len(p) for p in parts)) if parts else 0
        limit = edtl if flags & F_READ else 0
        res_flag = residual = 0
        if total > limit:
            res_flag, residual = F_OVERFLOW, total - limit
            parts = _cut(parts, limit)
            total = limit
        elif total < limit:
            res_flag, residual = F_UNDERFLOW, limit - total
        if is_read and total and resp.status == GOOD:
            stats.reads += 1
            stats.read_bytes += total
            if not self.session.first_read_seen:
                self._first_read(lun)
        else:
            stats.others += 1
        self._respond(itt, resp.status, resp.sense, parts, res_flag, residual, total)

    def _run_scsi(self, lun: int, cdb: bytes, data_out):
        try:
            return self.scsi.execute(self.nexus, lun, memoryview(cdb), data_out)
        except Exception as exc:  # noqa: BLE001 - a fault in one command must not end the session
            self.events.append(ev.Error(where=f"execute CDB {bytes(cdb[:1]).hex()}", error=repr(exc)))
            return _Failed

    def _first_read(self, lun: int) -> None:
        s = self.session
        s.first_read_seen = True
        self.events.append(ev.FirstRead(ip=self.peer_ip, initiator=s.initiator, target=s.target, tsih=s.tsih,
                                        lun=lun))

    def _respond(self, itt, status, sense_data, parts, res_flag, residual, total=0) -> None:
        """The command's Data-In (`total` bytes of `parts`) and status: in the last Data-In when GOOD
        without sense, else in a SCSI Response after the data."""
        exp, maxc = self._cmdsn_words()
        sent = 0  # Data-In PDUs before the SCSI Response: its ExpDataSN
        if total:
            status_in_data = status == GOOD and not sense_data
            if total <= self.send_max and total <= self.max_burst:
                if status_in_data:
                    self.out += self.writer.data_in(itt, parts, total, exp, maxc, status=status,
                                                    statsn=self._next_statsn(), residual_flag=res_flag,
                                                    residual=residual)
                    return
                self.out += self.writer.data_in(itt, parts, total, exp, maxc)
                sent = 1
            else:
                sent = self._data_in_sequence(itt, parts, total, status_in_data, status, res_flag, residual)
                if status_in_data:
                    return
        self.out += self.writer.scsi_response(itt, status, self._next_statsn(), exp, maxc, sense=sense_data,
                                              residual_flag=res_flag, residual=residual, exp_datasn=sent)

    def _data_in_sequence(self, itt, parts, total, status_in_data, status, res_flag, residual) -> int:
        """Data-In PDUs of at most MaxRecvDataSegmentLength; returns how many."""
        exp, maxc = self._cmdsn_words()
        data_in = self.writer.data_in
        offset = 0
        datasn = 0
        step = min(self.send_max, self.max_burst)
        for chunk in _chunks(parts, step):
            n = sum(len(c) for c in chunk)
            last = offset + n >= total
            # F closes each MaxBurstLength sequence as well as the last PDU (§11.7.1).
            final = last or (offset + n) % self.max_burst == 0
            if last and status_in_data:
                self.out += data_in(itt, chunk, n, exp, maxc, datasn=datasn, offset=offset, final=final,
                                    status=status, statsn=self._next_statsn(), residual_flag=res_flag,
                                    residual=residual)
            else:
                self.out += data_in(itt, chunk, n, exp, maxc, datasn=datasn, offset=offset, final=final)
            datasn += 1
            offset += n
        return datasn
