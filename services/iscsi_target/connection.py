"""One iSCSI connection, sans-IO: bytes in, scatter lists and events out. States and dispatch.

Theory of operation
-------------------
The I/O layer (io_loop.py) feeds whatever one receive returned to `receive(view, now)`. It frames every
complete PDU (`pdu.PduReader`), handles each in order and queues the answers (a list of buffers for one
`sendmsg`, read with `take_output()`); it returns how many bytes it consumed, and the caller keeps the
rest. Data segments are memoryviews of the caller's buffer, valid only during the call: a WRITE whose
data came whole in its command PDU is executed straight from there; data still to come is copied into a
per-task buffer. Events (events.py) are read with `take_events()`.

States: LOGIN (login.LoginMachine answers Login Requests; anything else fails the login) → FULL
(full feature phase) → CLOSING (a logout answered, a login failed or a fatal protocol error: the I/O
layer sends the output and closes). `timer(now)` drives NOP-In pings to idle initiators and the grace
period of a target-requested logout.

`Connection` is one object; its jobs live in one module each, as parts (mixins) that share its state:
- here: states, dispatch, login completion, NOP, logout, Reject, closing;
- write_tasks.py: WRITE data still to come: immediate and unsolicited Data-Out, one R2T at a time;
- responses.py: a command executed and answered: Data-In (status in the last one), SCSI Response with
  sense, residuals against the Expected Data Transfer Length;
- task_management.py: ABORT TASK/TASK SET, LUN and target resets, CLEAR TASK SET/ACA;
- text.py: Text requests: SendTargets and renegotiation, long answers continued with the C bit.
Anything malformed or unsupported is answered with a Reject carrying the offending header.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from services.iscsi_target import events as ev
from services.iscsi_target.login import INVALID_DURING_LOGIN, SESSION_DOES_NOT_EXIST, LoginStep, LoginMachine
from services.iscsi_target.params import TARGET_MAX_RECV_DATA, Negotiation
from services.iscsi_target.pdu import (
    F_WRITE, OP_DATA_OUT, OP_LOGIN_REQ, OP_LOGOUT_REQ, OP_NOP_OUT, OP_SCSI_CMD, OP_SNACK, OP_TEXT_REQ,
    OP_TMF_REQ, REJECT_INVALID_FIELD, REJECT_NOT_SUPPORTED, REJECT_PROTOCOL_ERROR, REJECT_TASK_IN_PROGRESS, RSVD_TAG,
    PduError, PduReader, PduWriter, decode_lun, encode_text,
)
from services.iscsi_target.responses import Responses
from services.iscsi_target.session import MASK32, Session, SessionTable
from services.iscsi_target.task_management import TaskManagement
from services.iscsi_target.text import TextRequests, TextState
from services.iscsi_target.write_tasks import WriteTask, WriteTasks

LOGIN, FULL, CLOSING = "login", "full", "closing"
LOGIN_TIMEOUT = 30.0  # seconds a connection may take to reach full feature phase
ASYNC_LOGOUT_REQUEST = 1  # AsyncEvent (§11.9.1): the target asks for a logout

# Logout reason codes (§11.14.1) and responses (§11.15.1)
LOGOUT_SESSION, LOGOUT_CONNECTION, LOGOUT_RECOVERY = 0, 1, 2
LOGOUT_OK, LOGOUT_CID_NOT_FOUND, LOGOUT_RECOVERY_UNSUPPORTED = 0, 1, 2


@dataclass
class PingState:
    ttt: int = 0
    sent_at: float | None = None


def _scsi_nexus(**kwargs):
    from services.iscsi_target.scsi import Nexus  # the SCSI layer's I_T nexus type

    return Nexus(**kwargs)


class Connection(WriteTasks, Responses, TaskManagement, TextRequests):
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
        self.out: list = []  # buffers for the next sendmsg: take_output()
        self.events: list[ev.Event] = []  # take_events()
        self.state = LOGIN
        self.close_reason = ""
        self.login = LoginMachine(registry, peer_ip, TARGET_MAX_RECV_DATA, sessions=sessions)
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
        self.initial_r2t = True
        self.immediate_data = True

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
                self._dispatch(item)
            except PduError as exc:
                self._pdu_error(exc)
        return consumed

    def needed(self, view) -> int:
        return self.reader.needed(view)

    def take_output(self) -> list:
        """The buffers queued since the last call, for one scatter-gather send."""
        out = self.out
        if out:
            self.out = []
        return out

    def take_events(self) -> list[ev.Event]:
        """The events since the last call (events.py)."""
        events = self.events
        if events:
            self.events = []
        return events

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
            self.out += self.writer.nop_in(RSVD_TAG, self.ping.ttt, self.statsn, *self._cmdsn_words())

    def request_logout(self, now: float, grace: float = 3.0) -> None:
        """Ask the initiator to log out (Async event 1); close after `grace` seconds regardless."""
        if self.state == LOGIN:
            self._close("target removed")
            return
        if self.state != FULL or self.logout_deadline is not None:
            return
        self.logout_deadline = now + grace
        self.out += self.writer.async_message(ASYNC_LOGOUT_REQUEST, self._next_statsn(), *self._cmdsn_words(),
                                              parameter3=max(1, int(grace)))

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
                self.events.append(ev.Error(where="nexus_lost", error=repr(exc)))
        self.events.append(ev.SessionEnd(session=s))
        self.events.append(ev.Logout(ip=self.peer_ip, initiator=s.initiator, target=s.target, tsih=s.tsih,
                                     reason=self.close_reason))

    def _reject(self, bhs: bytes, reason: int) -> None:
        self.out += self.writer.reject(reason, bhs, self._next_statsn(), *self._cmdsn_words())

    def _pdu_error(self, exc: PduError) -> None:
        if exc.bhs and self.state == FULL:
            self._reject(exc.bhs, exc.reason)
        if exc.fatal or self.state != FULL:
            self._close(f"protocol error: {exc}")

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, pdu) -> None:
        op = pdu.opcode
        if self.state == LOGIN:
            if op != OP_LOGIN_REQ:
                if self.login.first:  # before the login started: terminate at once (RFC 7143 §6.1.x, 3720 §5.3)
                    self._close(f"{pdu.name} during login")
                    return
                # once it started: a Login reject "invalid during login", then the connection closes
                step = LoginStep(status=INVALID_DURING_LOGIN, reason=f"{pdu.name} during login", csg=self.login.stage)
                self._login_response(pdu, step, tsih=0)
                self._login_failed(self.login.target_name or "(discovery)", step)
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
            self._login_failed(target, step)
            return
        if not step.complete:
            self._login_response(pdu, step, tsih=0)
            return
        # Full feature phase starts: register (maybe reinstate) the session.
        target_name = m.target_name if m.session_type == "Normal" else ""
        if m.tsih and self.sessions.by_tsih(m.tsih) is None:
            fail = LoginStep(status=SESSION_DOES_NOT_EXIST, reason=f"session TSIH {m.tsih} does not exist",
                             csg=step.csg)
            self._login_response(pdu, fail, tsih=0)
            self._login_failed(target_name, fail)
            return
        pc = getattr(m.entry, "pc", None) if m.session_type == "Normal" else None
        if pc is not None:  # a PC on an image: its power-on reset and its disk, before the login completes
            same_isid = self.sessions.find(m.initiator, m.isid, target_name)
            refused = pc.login(self.handle, replaces=same_isid.handle if same_isid is not None else None)
            if refused:
                fail = LoginStep(status=refused[0], reason=refused[1], csg=step.csg)
                self._login_response(pdu, fail, tsih=0)
                self._login_failed(target_name, fail)
                return
        session = Session(m.initiator, m.isid, target_name, m.session_type, self.peer_ip, window=self.cmd_window,
                          exp_cmdsn=pdu.cmdsn, handle=self.handle, cid=m.cid)
        old = self.sessions.register(session, tsih=m.tsih)
        self.session = session
        self.neg = m.negotiation
        self.cid = m.cid
        if m.session_type == "Normal":
            self.entry = m.entry
            self.scsi = m.entry.scsi
            self.nexus = self.nexus_factory(initiator_port=session.initiator_port,
                                            target_port=f"{target_name},t,0x0001", session=session.tsih)
        if old is not None:
            if self.scsi is not None:
                try:
                    self.scsi.nexus_lost(self.nexus)  # the old nexus: same initiator port and target
                except Exception as exc:  # noqa: BLE001
                    self.events.append(ev.Error(where="nexus_lost", error=repr(exc)))
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
        self.events.append(ev.Login(ip=self.peer_ip, initiator=m.initiator, target=target_name,
                                    isid=f"0x{m.isid:012x}", tsih=session.tsih, session_type=m.session_type,
                                    auth=m.auth_method or "None", user=m.chap_user, reinstated=old is not None,
                                    header_digest=v["HeaderDigest"], data_digest=v["DataDigest"]))

    def _login_failed(self, target: str, step: LoginStep) -> None:
        self.events.append(ev.LoginFailed(ip=self.peer_ip, initiator=self.login.initiator, target=target,
                                          reason=step.reason, status=f"0x{step.status:04x}"))
        self._close(f"login failed: {step.reason}")

    def _login_response(self, pdu, step: LoginStep, tsih: int) -> None:
        statsn = self._next_statsn() if step.status == 0 else self.statsn
        if self.session is None:
            exp, maxc = pdu.cmdsn, (pdu.cmdsn + self.cmd_window - 1) & MASK32
        else:
            exp, maxc = self._cmdsn_words()
        self.out += self.writer.login_response(pdu.itt, self.login.isid, tsih, statsn, exp, maxc,
                                               transit=step.transit, csg=step.csg, nsg=step.nsg,
                                               status=step.status, data=encode_text(step.keys))

    # ------------------------------------------------------------------ SCSI commands
    def _scsi_command(self, pdu) -> None:
        if not self.session.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return  # outside the window: silently ignored (§4.2.2.1)
        if self.scsi is None:  # discovery sessions carry no SCSI
            self._reject(pdu.bhs, REJECT_PROTOCOL_ERROR)
            return
        start = self.clock_ns()
        if pdu.itt in self.tasks:
            self._reject(pdu.bhs, REJECT_TASK_IN_PROGRESS)  # the ITT is already in use
            return
        lun = decode_lun(pdu.lun)
        if pdu.flags & F_WRITE and pdu.edtl:
            self._write_command(pdu, lun, start)  # write_tasks.py
            return
        if not self._read_now(pdu, lun, start):  # responses.py
            self._execute(pdu.itt, lun, pdu.cdb, pdu.flags, pdu.edtl, None, start)

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
        self.out += self.writer.nop_in(pdu.itt, RSVD_TAG, self._next_statsn(), *self._cmdsn_words(), lun=pdu.lun,
                                       data=data)

    # ------------------------------------------------------------------ logout
    def _logout(self, pdu) -> None:
        if not self.session.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        reason = pdu.flags & 0x7F
        response = LOGOUT_OK
        if reason == LOGOUT_CONNECTION and pdu.cid != self.cid:
            response = LOGOUT_CID_NOT_FOUND
        elif reason == LOGOUT_RECOVERY:
            response = LOGOUT_RECOVERY_UNSUPPORTED  # no connection recovery at ErrorRecoveryLevel 0
        elif reason not in (LOGOUT_SESSION, LOGOUT_CONNECTION):
            self._reject(pdu.bhs, REJECT_INVALID_FIELD)
            return
        self.tasks.clear()
        t2w = int(self.neg.values["DefaultTime2Wait"]) if self.neg else 2
        self.out += self.writer.logout_response(pdu.itt, response, self._next_statsn(), *self._cmdsn_words(),
                                                time2wait=t2w)
        if response == LOGOUT_OK:
            self._close("logout")
