"""One iSCSI connection, sans-IO: bytes in, scatter lists and events out.

Theory of operation
-------------------
The I/O layer feeds whatever one receive returned to `receive(view, now)`. It frames every complete PDU
(`pdu.PduReader`), handles each in order and appends the answers to `self.out` (a list of buffers for
one `sendmsg`); it returns how many bytes it consumed, and the caller keeps the rest. Data segments are
memoryviews of the caller's buffer, valid only during the call: a WRITE whose data came whole in its
command PDU is executed straight from there; data still to come is copied into a per-task buffer.

States: LOGIN (login.LoginMachine answers Login Requests; anything else fails the login) → FULL
(full feature phase) → CLOSING (a logout answered, a login failed or a fatal protocol error: the I/O
layer sends `out` and closes). `timer(now)` drives NOP-In pings to idle initiators and the grace period
of a target-requested logout.

Full feature phase, per opcode:
- SCSI Command: CmdSN window check (session.py), then either executed at once (no Data-Out, or all of
  it immediate) or parked as a write task that collects unsolicited Data-Out (until F) and then asks
  for the rest with one R2T at a time (MaxOutstandingR2T 1), each at most MaxBurstLength.
  A READ's data goes out as Data-In PDUs of at most the initiator's MaxRecvDataSegmentLength with the
  status in the last one (S bit) when there is no sense data; otherwise a SCSI Response follows.
  Residuals: the transport compares what the command moves with the Expected Data Transfer Length.
- Data-Out: DataSN and offsets must be in order (DataPDUInOrder/DataSequenceInOrder Yes); at
  ErrorRecoveryLevel 0 a violation is fatal for the connection.
- NOP-Out: answered with a NOP-In echoing its data; one with our TTT answers our ping.
- Task management: ABORT TASK/ABORT TASK SET drop parked tasks here; LUN RESET, TARGET WARM/COLD
  RESET, CLEAR TASK SET and CLEAR ACA go to the SCSI layer too.
- Text: SendTargets (discovery and normal sessions) and renegotiation of declarative keys; long answers
  are split with the C bit and continued by empty requests carrying our TTT.
- Logout: answered, then the connection closes.
- Anything malformed or unsupported is answered with a Reject carrying the offending header.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from services.iscsi_target import events as ev
from services.iscsi_target.login import LoginMachine, LoginStep
from services.iscsi_target.params import TARGET_MAX_RECV_DATA, Negotiation, NegotiationError
from services.iscsi_target.pdu import (
    F_CONTINUE, F_FINAL, F_OVERFLOW, F_READ, F_STATUS, F_UNDERFLOW, F_WRITE, OP_ASYNC, OP_DATA_IN, OP_DATA_OUT,
    OP_LOGIN_REQ, OP_LOGIN_RSP, OP_LOGOUT_REQ, OP_LOGOUT_RSP, OP_NOP_IN, OP_NOP_OUT, OP_R2T, OP_REJECT, OP_SCSI_CMD,
    OP_SCSI_RSP, OP_SNACK, OP_TEXT_REQ, OP_TEXT_RSP, OP_TMF_REQ, OP_TMF_RSP,
    REJECT_NOT_SUPPORTED, REJECT_PROTOCOL_ERROR, REJECT_INVALID_FIELD, RSVD_TAG, PduError, PduReader, PduWriter,
    decode_lun, decode_text, encode_lun, encode_text,
)
from services.iscsi_target.session import MASK32, Session, SessionTable, sn_le, sn_lt

LOGIN, FULL, CLOSING = "login", "full", "closing"
LOGIN_TIMEOUT = 30.0  # seconds a connection may take to reach full feature phase

# TMF functions (§11.5.1) and responses (§11.6.1)
TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_ACA, TMF_CLEAR_TASK_SET = 1, 2, 3, 4
TMF_LUN_RESET, TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET, TMF_TASK_REASSIGN = 5, 6, 7, 8
TMF_COMPLETE, TMF_NO_TASK, TMF_NO_LUN, TMF_NO_REASSIGN, TMF_NOT_SUPPORTED = 0, 1, 2, 4, 5

STATUS_GOOD = 0x00
STATUS_CHECK_CONDITION = 0x02

# Sense: ILLEGAL REQUEST, INVALID FIELD IN COMMAND INFORMATION UNIT (the CDB's length and EDTL disagree)
SENSE_INVALID_IU = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x0E, 0x03, 0, 0, 0, 0])
# Sense: ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (no such LUN: the SCSI layer is never asked)
# Sense: ABORTED COMMAND, DATA PHASE ERROR (a Data-Out sequence we cannot accept)
SENSE_DATA_PHASE_ERROR = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4B, 0x00, 0, 0, 0, 0])
# Sense: ILLEGAL REQUEST, INVALID FIELD IN CDB
SENSE_INVALID_CDB = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0, 0, 0])
MAX_WRITE_BUFFER = 64 << 20  # bytes of Data-Out one command may collect
READ_OPCODES = frozenset({0x08, 0x28, 0xA8, 0x88})
SENSE_NO_LUN = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x25, 0x00, 0, 0, 0, 0])


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


@dataclass
class PingState:
    ttt: int = 0
    sent_at: float | None = None


@dataclass
class TextState:
    ttt: int = RSVD_TAG
    itt: int = RSVD_TAG
    remaining: bytes = b""
    request: bytearray = field(default_factory=bytearray)


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


# Plain WRITE / WRITE AND VERIFY opcodes -> (offset, size) of their TRANSFER LENGTH field
_WRITE_LENGTH = {0x0A: (4, 1), 0x2A: (7, 2), 0x2E: (7, 2), 0xAA: (6, 4), 0xAE: (6, 4), 0x8A: (10, 4), 0x8E: (10, 4)}


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


def _scsi_nexus(**kwargs):
    from services.iscsi_target.scsi import Nexus  # the SCSI layer's I_T nexus type

    return Nexus(**kwargs)


class _Failed:
    """The answer to a command the SCSI layer raised on: HARDWARE ERROR, INTERNAL TARGET FAILURE."""

    status = STATUS_CHECK_CONDITION
    sense = bytes([0x70, 0, 0x04, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x44, 0x00, 0, 0, 0, 0])
    data: list = []


class Connection:
    """One TCP connection's protocol state. `registry` gives targets and policies (see service.py)."""

    def __init__(self, registry, sessions: SessionTable, *, peer_ip: str, portal: tuple[str, int],
                 now: float, nop_interval: float = 30.0, nop_timeout: float = 15.0, cmd_window: int = 32,
                 clock_ns=time.perf_counter_ns, handle=None, nexus_factory=None):
        self.registry = registry
        self.sessions = sessions
        self.peer_ip = peer_ip
        self.portal = portal
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.cmd_window = cmd_window
        self.clock_ns = clock_ns
        self.handle = handle  # passed to the session so a reinstating login can close us
        self.nexus_factory = nexus_factory or _scsi_nexus
        self.reader = PduReader(8192)
        self.writer = PduWriter()
        self.out: list = []
        self.events: list[tuple[str, dict]] = []
        self.state = LOGIN
        self.close_reason = ""
        self.login = LoginMachine(registry, peer_ip, TARGET_MAX_RECV_DATA)
        self.session: Session | None = None
        self.entry = None  # registry entry of the target (normal sessions)
        self.scsi = None
        self.nexus = None
        self.neg: Negotiation | None = None
        self.statsn = 0
        self.cid = 0
        self.tasks: dict[int, WriteTask] = {}
        self.failed_itts: deque = deque(maxlen=64)  # commands ended by a Data-Out error: drop their data
        self.next_ttt = 1
        self.ping = PingState()
        self.text = TextState()
        self.last_rx = now
        self.started = now
        self.logout_deadline: float | None = None
        self.send_max = 8192  # initiator's MaxRecvDataSegmentLength
        self.max_burst = 262144
        self.first_burst = 65536
        self.bytes_in = 0
        self.bytes_out_pdus = 0

    # ------------------------------------------------------------------ I/O-facing API
    def receive(self, view: memoryview, now: float) -> int:
        """Handle every complete PDU in `view`; return the bytes consumed."""
        if self.state == CLOSING:
            return len(view)
        items, consumed = self.reader.feed(view)
        if consumed or items:
            self.last_rx = now
            self.ping.sent_at = None  # any PDU proves the initiator alive
        for item in items:
            if self.state == CLOSING:
                return len(view)
            if isinstance(item, PduError):
                self._pdu_error(item)
                continue
            try:
                self._dispatch(item, now)
            except PduError as exc:
                self._pdu_error(exc)
        return consumed

    def needed(self, view) -> int:
        return self.reader.needed(view)

    def timer(self, now: float) -> None:
        """Call about once a second: pings idle initiators, enforces ping and logout deadlines."""
        if self.state == LOGIN and now - self.started >= LOGIN_TIMEOUT:
            self._close(f"login not completed within {LOGIN_TIMEOUT:g} s")
            return
        if self.state != FULL:
            return
        if self.logout_deadline is not None and now >= self.logout_deadline:
            self._close("target removed: logout deadline passed")
            return
        if self.ping.sent_at is not None:
            if now - self.ping.sent_at >= self.nop_timeout:
                self._close(f"no answer to NOP-In within {self.nop_timeout:g} s")
            return
        if self.nop_interval and now - self.last_rx >= self.nop_interval:
            self.ping.ttt = self._new_ttt()
            self.ping.sent_at = now
            # A ping from the target: ITT reserved, our TTT, StatSN not advanced (§11.19).
            self.out += self.writer.pack(OP_NOP_IN, F_FINAL, 0, 0, 0, RSVD_TAG, self.ping.ttt, self.statsn,
                                         *self._cmdsn_words(), 0, 0, 0)

    def request_logout(self, now: float, grace: float = 3.0) -> None:
        """Ask the initiator to log out (Async event 1); close after `grace` seconds regardless."""
        if self.state == LOGIN:
            self._close("target removed")
            return
        if self.state != FULL or self.logout_deadline is not None:
            return
        self.logout_deadline = now + grace
        param3 = max(1, int(grace))
        self.out += self.writer.pack(OP_ASYNC, F_FINAL, 0, 0, 0, RSVD_TAG, RSVD_TAG, self._next_statsn(),
                                     *self._cmdsn_words(), (1 << 24), param3, 0)

    def abort(self, reason: str) -> None:
        """Stop at once (reinstated, or the service is stopping); nothing more is sent."""
        self.out.clear()
        self._close(reason)

    def connection_lost(self, reason: str = "connection closed") -> None:
        """The I/O layer lost the socket: release the session and report the logout."""
        if not self.close_reason:
            self.close_reason = reason
        self.state = CLOSING
        self._release_session()

    @property
    def closing(self) -> bool:
        return self.state == CLOSING

    # ------------------------------------------------------------------ helpers
    def _new_ttt(self) -> int:
        ttt = self.next_ttt
        self.next_ttt = (self.next_ttt + 1) & 0x7FFFFFFF or 1
        return ttt

    def _next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = (sn + 1) & MASK32
        return sn

    def _cmdsn_words(self) -> tuple[int, int]:
        s = self.session
        if s is None:
            return 0, 0
        return s.exp_cmdsn, s.max_cmdsn

    def _close(self, reason: str) -> None:
        if self.state == CLOSING:
            return
        self.close_reason = reason
        self.state = CLOSING
        self._release_session()

    def _release_session(self) -> None:
        s = self.session
        if s is None:
            return
        self.session = None
        self.tasks.clear()
        self.sessions.remove(s)
        if self.scsi is not None and self.nexus is not None and not s.replaced:
            try:
                self.scsi.nexus_lost(self.nexus)
            except Exception as exc:  # noqa: BLE001 - the SCSI layer must not take the connection with it
                self.events.append((ev.ERROR, {"where": "nexus_lost", "error": repr(exc)}))
        self.events.append((ev.SESSION_END, {"session": s}))
        self.events.append((ev.LOGOUT, {"ip": self.peer_ip, "initiator": s.initiator, "target": s.target,
                                        "tsih": s.tsih, "reason": self.close_reason}))

    def _reject(self, bhs: bytes, reason: int) -> None:
        self.out += self.writer.pack(OP_REJECT, F_FINAL, reason, 0, 0, RSVD_TAG, 0, self._next_statsn(),
                                     *self._cmdsn_words(), 0, 0, 0, data=bytes(bhs[:48]))

    def _pdu_error(self, exc: PduError) -> None:
        if exc.bhs and self.state == FULL:
            self._reject(exc.bhs, exc.reason)
        if exc.fatal or self.state != FULL:
            self._close(f"protocol error: {exc}")

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, pdu, now: float) -> None:
        op = pdu.opcode
        if self.state == LOGIN:
            if op != OP_LOGIN_REQ:
                self._close(f"{pdu.name} during login")
                return
            self._login(pdu)
            return
        if op == OP_SCSI_CMD:
            self._scsi_command(pdu)
        elif op == OP_DATA_OUT:
            self._data_out(pdu)
        elif op == OP_NOP_OUT:
            self._nop_out(pdu)
        elif op == OP_TMF_REQ:
            self._tmf(pdu)
        elif op == OP_TEXT_REQ:
            self._text(pdu)
        elif op == OP_LOGOUT_REQ:
            self._logout(pdu)
        elif op == OP_LOGIN_REQ:
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)  # a login in full feature phase
        elif op == OP_SNACK:
            self._reject(pdu.bhs, REJECT_NOT_SUPPORTED)  # ErrorRecoveryLevel 0: no SNACK
        else:
            self._reject(pdu.bhs, REJECT_NOT_SUPPORTED)

    # ------------------------------------------------------------------ login
    def _login(self, pdu) -> None:
        step: LoginStep = self.login.handle(pdu)
        m = self.login
        if step.status:
            self._login_response(pdu, step, tsih=0)
            target = m.target_name if m.session_type == "Normal" else "(discovery)"
            self.events.append((ev.LOGIN_FAILED, {"ip": self.peer_ip, "initiator": m.initiator, "target": target,
                                                  "reason": step.reason, "status": f"0x{step.status:04x}"}))
            self._close(f"login failed: {step.reason}")
            return
        if not step.complete:
            self._login_response(pdu, step, tsih=0)
            return
        # Full feature phase starts: register (maybe reinstate) the session.
        target_name = m.target_name if m.session_type == "Normal" else ""
        if m.tsih and self.sessions.by_tsih(m.tsih) is None:
            fail = LoginStep(status=0x020A, reason=f"session TSIH {m.tsih} does not exist", csg=step.csg)
            self._login_response(pdu, fail, tsih=0)
            self.events.append((ev.LOGIN_FAILED, {"ip": self.peer_ip, "initiator": m.initiator,
                                                  "target": target_name, "reason": fail.reason,
                                                  "status": "0x020a"}))
            self._close(f"login failed: {fail.reason}")
            return
        session = Session(m.initiator, m.isid, target_name, m.session_type, self.peer_ip, window=self.cmd_window,
                          exp_cmdsn=pdu.cmdsn, handle=self.handle)
        old = self.sessions.register(session, tsih=m.tsih)
        self.session = session
        self.neg = m.negotiation
        self.cid = m.cid
        if m.session_type == "Normal":
            self.entry = m.entry
            self.scsi = m.entry.scsi
            self.nexus = self.nexus_factory(initiator_port=session.initiator_port, target_port=f"{target_name},t,0x0001",
                               session=session.tsih)
        if old is not None:
            if self.scsi is not None:
                try:
                    self.scsi.nexus_lost(self.nexus)  # the old nexus: same initiator port and target
                except Exception as exc:  # noqa: BLE001
                    self.events.append((ev.ERROR, {"where": "nexus_lost", "error": repr(exc)}))
            if old.handle is not None:
                old.handle.abort("reinstated by a new login with the same ISID")
        self.statsn = pdu.expstatsn  # the initiator's view of our StatSN starts where it says
        self._login_response(pdu, step, tsih=session.tsih)
        # Negotiated settings apply from the first PDU after the final login response (§13.1).
        self.writer.header_digest = self.reader.header_digest = self.neg.header_digest
        self.writer.data_digest = self.reader.data_digest = self.neg.data_digest
        self.reader.max_data = TARGET_MAX_RECV_DATA
        v = self.neg.values
        self.send_max = self.neg.initiator_max_recv
        self.max_burst = int(v["MaxBurstLength"])
        self.first_burst = int(v["FirstBurstLength"])
        self.initial_r2t = bool(v["InitialR2T"])
        self.immediate_data = bool(v["ImmediateData"])
        self.state = FULL
        self.events.append((ev.LOGIN, {"ip": self.peer_ip, "initiator": m.initiator, "target": target_name,
                                       "isid": f"0x{m.isid:012x}", "tsih": session.tsih,
                                       "session_type": m.session_type, "auth": m.auth_method or "None",
                                       "user": m.chap_user, "reinstated": old is not None,
                                       "header_digest": v["HeaderDigest"], "data_digest": v["DataDigest"]}))

    def _login_response(self, pdu, step: LoginStep, tsih: int) -> None:
        flags = (0x80 if step.transit else 0) | (step.csg << 2) | (step.nsg if step.transit else 0)
        data = encode_text(step.keys)
        m = self.login
        isid_tsih = (m.isid << 16) | tsih
        statsn = self._next_statsn() if step.status == 0 else self.statsn
        if self.session is None:
            exp, maxc = pdu.cmdsn, (pdu.cmdsn + self.cmd_window - 1) & MASK32
        else:
            exp, maxc = self._cmdsn_words()
        self.out += self.writer.pack(OP_LOGIN_RSP, flags, 0, 0, isid_tsih, pdu.itt, 0, statsn, exp, maxc,
                                     (step.status << 16), 0, 0, data=data)

    # ------------------------------------------------------------------ SCSI commands
    def _scsi_command(self, pdu) -> None:
        s = self.session
        if not s.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return  # outside the window: silently ignored (§4.2.2.1)
        if self.scsi is None:  # discovery sessions carry no SCSI
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            return
        start = self.clock_ns()
        flags = pdu.flags
        edtl = pdu.edtl
        lun = decode_lun(pdu.lun)
        data = pdu.data
        if pdu.itt in self.tasks:
            self._reject(pdu.bhs, 0x07)  # task in progress: the ITT is already in use
            return
        if flags & F_WRITE and edtl:
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
                self._respond(pdu.itt, STATUS_CHECK_CONDITION, SENSE_INVALID_CDB, [], flags, edtl, 0, 0)
                return
            task = WriteTask(pdu.itt, lun, pdu.cdb, flags, edtl, bytearray(edtl), received=imm, start_ns=start)
            if imm:
                task.buf[:imm] = data
            unsolicited_allowed = not self.initial_r2t
            task.unsolicited = not (flags & F_FINAL)
            if task.unsolicited and not unsolicited_allowed:
                self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
                return
            self.tasks[pdu.itt] = task
            if not task.unsolicited:
                self._send_r2t(task)
            return
        self._execute(pdu.itt, lun, pdu.cdb, flags, edtl, None, start)

    def _send_r2t(self, task: WriteTask) -> None:
        length = min(self.max_burst, task.edtl - task.received)
        task.ttt = self._new_ttt()
        task.datasn = 0
        task.seq_end = task.received + length
        self.out += self.writer.pack(OP_R2T, F_FINAL, 0, 0, encode_lun(task.lun), task.itt, task.ttt,
                                     self.statsn, *self._cmdsn_words(), task.r2tsn, task.received, length)
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
        self._respond(task.itt, STATUS_CHECK_CONDITION, SENSE_DATA_PHASE_ERROR, [], task.flags, task.edtl, 0, 0)
        self.session.lun_stats(task.lun).others += 1
        self.events.append((ev.ERROR, {"where": "data-out", "error": reason, "level": "warning"}))

    def _execute(self, itt: int, lun: int, cdb: bytes, flags: int, edtl: int, data_out, start_ns: int) -> None:
        scsi = self.scsi
        stats = self.session.stats.get(lun) or self.session.lun_stats(lun)
        op = cdb[0]
        if op in READ_OPCODES and data_out is None and lun in scsi.luns:
            # The hot path: a READ moves no Data-Out, so none of the write-length checks below apply.
            resp = self._run_scsi(lun, cdb, None)
            self._answer_data_in(itt, lun, resp, flags, edtl, stats, True)
            stats.latency_ns += self.clock_ns() - start_ns
            return
        if lun not in scsi.luns and op not in (0x12, 0xA0, 0x03):
            # INQUIRY, REPORT LUNS and REQUEST SENSE answer for any LUN; the rest need one that exists.
            self._respond(itt, STATUS_CHECK_CONDITION, SENSE_NO_LUN, [], flags, edtl, 0, 0)
            stats.others += 1
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
                self._respond(itt, STATUS_CHECK_CONDITION, SENSE_INVALID_IU, [], flags, edtl,
                              F_OVERFLOW if over else F_UNDERFLOW, abs(spdtl - got))
                stats.others += 1
                return
            # A plain WRITE moves min(EDTL, its own length) (SAM-5 5.4.2; libiscsi's residual tests).
            if spdtl > got:
                short = spdtl - got
                cdb = fitted
                spdtl = got
            else:
                data_out = data_out[:spdtl]
            if not spdtl:
                self._respond(itt, STATUS_GOOD, None, [], flags, edtl, F_OVERFLOW, short)
                stats.others += 1
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
            self._respond(itt, resp.status, resp.sense, parts, flags, edtl, res_flag, residual, total)
        else:
            self._answer_data_in(itt, lun, resp, flags, edtl, stats, cdb[0] in READ_OPCODES)
        stats.latency_ns += self.clock_ns() - start_ns

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
        if is_read and total and resp.status == STATUS_GOOD:
            stats.reads += 1
            stats.read_bytes += total
            if not self.session.first_read_seen:
                self._first_read(lun)
        else:
            stats.others += 1
        self._respond(itt, resp.status, resp.sense, parts, flags, edtl, res_flag, residual, total)

    def _run_scsi(self, lun: int, cdb: bytes, data_out):
        try:
            return self.scsi.execute(self.nexus, lun, memoryview(cdb), data_out)
        except Exception as exc:  # noqa: BLE001 - a fault in one command must not end the session
            self.events.append((ev.ERROR, {"where": f"execute CDB {bytes(cdb[:1]).hex()}", "error": repr(exc)}))
            return _Failed

    def _first_read(self, lun: int) -> None:
        s = self.session
        s.first_read_seen = True
        self.events.append((ev.FIRST_READ, {"ip": self.peer_ip, "initiator": s.initiator, "target": s.target,
                                            "tsih": s.tsih, "lun": lun}))

    def _respond(self, itt, status, sense, parts, flags, edtl, res_flag, residual, total=0) -> None:
        lun_field = 0
        exp, maxc = self._cmdsn_words()
        out = self.out
        pack = self.writer.pack
        sent = 0  # Data-In PDUs before the SCSI Response: its ExpDataSN
        if total:
            status_in_data = status == STATUS_GOOD and not sense
            if total <= self.send_max and total <= self.max_burst:
                if status_in_data:
                    out += pack(OP_DATA_IN, F_FINAL | F_STATUS | res_flag, 0, status, lun_field, itt, RSVD_TAG,
                                self._next_statsn(), exp, maxc, 0, 0, residual, data=parts, dlen=total)
                    return
                out += pack(OP_DATA_IN, F_FINAL, 0, 0, lun_field, itt, RSVD_TAG, 0, exp, maxc, 0, 0, 0,
                            data=parts, dlen=total)
                sent = 1
            else:
                sent = self._data_in_sequence(itt, parts, total, status_in_data, status, res_flag, residual)
                if status_in_data:
                    return
        sense_data = None
        if sense:
            sense_data = len(sense).to_bytes(2, "big") + bytes(sense)
        out += pack(OP_SCSI_RSP, F_FINAL | res_flag, 0, status, 0, itt, 0, self._next_statsn(), exp, maxc,
                    sent, 0, residual, data=sense_data)

    def _data_in_sequence(self, itt, parts, total, status_in_data, status, res_flag, residual) -> int:
        exp, maxc = self._cmdsn_words()
        pack = self.writer.pack
        offset = 0
        datasn = 0
        step = min(self.send_max, self.max_burst)
        for chunk in _chunks(parts, step):
            n = sum(len(c) for c in chunk)
            last = offset + n >= total
            # F closes each MaxBurstLength sequence as well as the last PDU (§11.7.1).
            burst_end = last or (offset + n) % self.max_burst == 0
            flags = F_FINAL if burst_end else 0
            statsn = 0
            st = 0
            res = 0
            if last and status_in_data:
                flags |= F_STATUS | res_flag
                statsn = self._next_statsn()
                st = status
                res = residual
            self.out += pack(OP_DATA_IN, flags, 0, st, 0, itt, RSVD_TAG, statsn, exp, maxc, datasn, offset, res,
                             data=chunk, dlen=n)
            datasn += 1
            offset += n
        return datasn

    # ------------------------------------------------------------------ NOP
    def _nop_out(self, pdu) -> None:
        if pdu.ttt != RSVD_TAG:
            if pdu.ttt == self.ping.ttt:
                self.ping.sent_at = None  # the answer to our ping
            return
        if pdu.itt == RSVD_TAG:
            if not pdu.immediate:
                self.session.accept_cmdsn(pdu.cmdsn, False)
            return  # a one-way ping from the initiator needs no answer
        if not self.session.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        data = bytes(pdu.data[: self.send_max]) if pdu.data else None
        self.out += self.writer.pack(OP_NOP_IN, F_FINAL, 0, 0, pdu.lun, pdu.itt, RSVD_TAG, self._next_statsn(),
                                     *self._cmdsn_words(), 0, 0, 0, data=data)

    # ------------------------------------------------------------------ task management
    def _tmf(self, pdu) -> None:
        s = self.session
        if not s.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        function = pdu.flags & 0x7F
        lun = decode_lun(pdu.lun)
        ref_itt = pdu.w[0]
        ref_cmdsn = pdu.w[3]
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
        self.out += self.writer.pack(OP_TMF_RSP, F_FINAL, response, 0, 0, pdu.itt, 0, self._next_statsn(),
                                     *self._cmdsn_words(), 0, 0, 0)
        if close_after:
            self._close("TARGET COLD RESET")

    def _scsi_tmf(self, function: int, lun: int) -> int:
        try:
            return self.scsi.task_management(self.nexus, function, lun)
        except Exception as exc:  # noqa: BLE001 - report and answer "rejected" rather than drop the session
            self.events.append((ev.ERROR, {"where": "task_management", "error": repr(exc)}))
            return 0xFF

    # ------------------------------------------------------------------ text
    def _text(self, pdu) -> None:
        s = self.session
        if not s.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        t = self.text
        if pdu.ttt != RSVD_TAG:
            if pdu.ttt != t.ttt or pdu.itt != t.itt:
                self._reject(pdu.bhs, REJECT_INVALID_FIELD)
                return
            self._text_chunk(pdu.itt)
            return
        t.remaining = b""
        t.request += pdu.data
        if len(t.request) > 65536:
            t.request = bytearray()
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            return
        if pdu.flags & F_CONTINUE:
            # more request text follows: answer empty with a TTT so the initiator goes on (§11.10.4)
            t.ttt = self._new_ttt()
            t.itt = pdu.itt
            self.out += self.writer.pack(OP_TEXT_RSP, 0, 0, 0, 0, pdu.itt, t.ttt, self._next_statsn(),
                                         *self._cmdsn_words(), 0, 0, 0)
            return
        pairs = decode_text(t.request)
        t.request = bytearray()
        answer: list = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += self._send_targets(value or "")
        try:
            answer += self.neg.respond([(k, v) for k, v in pairs if k != "SendTargets"], full_feature=True)
        except NegotiationError:
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            return
        self.send_max = self.neg.initiator_max_recv
        t.remaining = encode_text(answer)
        t.itt = pdu.itt
        self._text_chunk(pdu.itt)

    def _text_chunk(self, itt: int) -> None:
        t = self.text
        chunk, t.remaining = t.remaining[: self.send_max], t.remaining[self.send_max :]
        if t.remaining:
            t.ttt = self._new_ttt()
            flags, ttt = F_CONTINUE, t.ttt
        else:
            t.ttt = RSVD_TAG
            flags, ttt = F_FINAL, RSVD_TAG
        self.out += self.writer.pack(OP_TEXT_RSP, flags, 0, 0, 0, itt, ttt, self._next_statsn(),
                                     *self._cmdsn_words(), 0, 0, 0, data=chunk or None)

    def _send_targets(self, value: str) -> list:
        s = self.session
        if s.session_type == "Normal":
            names = [s.target] if value in ("", s.target) else []
            if value == "All":
                names = [s.target]  # in a normal session, only our own target (§12.3)
        elif value == "All":
            names = self.registry.visible_targets(s.initiator, self.peer_ip)
        elif value:
            names = [n for n in self.registry.visible_targets(s.initiator, self.peer_ip) if n == value.lower()]
        else:
            names = []
        ip, port = self.portal
        out = []
        for name in names:
            out.append(("TargetName", name))
            for address in self.registry.target_addresses(ip, port):
                out.append(("TargetAddress", address))
        return out

    # ------------------------------------------------------------------ logout
    def _logout(self, pdu) -> None:
        s = self.session
        if not s.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        reason = pdu.flags & 0x7F
        cid = pdu.w[0] >> 16
        response = 0
        if reason == 1 and cid != self.cid:
            response = 1  # CID not found
        elif reason == 2:
            response = 2  # connection recovery is not supported at ErrorRecoveryLevel 0
        elif reason not in (0, 1):
            self._reject(pdu.bhs, REJECT_INVALID_FIELD)
            return
        self.tasks.clear()
        t2w = int(self.neg.values["DefaultTime2Wait"]) if self.neg else 2
        self.out += self.writer.pack(OP_LOGOUT_RSP, F_FINAL, response, 0, 0, pdu.itt, 0, self._next_statsn(),
                                     *self._cmdsn_words(), 0, (t2w << 16), 0)
        if response == 0:
            self._close("logout")
