"""Reservations of one logical unit: SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations.

Theory of operation. Both kinds are keyed by I_T nexus (initiator port + target port; the session number
does not matter, so a reconnecting initiator keeps its registration). At most one kind is in force:
RESERVE(6/10) while a persistent reservation exists is a conflict, and so is PERSISTENT RESERVE IN/OUT
while an SPC-2 reservation is held by another nexus.

`check(nexus, access)` runs before every command while any reservation or registration exists. `access`
is the command's class from the SPC-4/SBC-3 conflict tables (table "SBC-3 commands that are allowed in the
presence of various reservations"):
  ALWAYS  INQUIRY, REPORT LUNS, REQUEST SENSE, REPORT SUPPORTED OPCODES, PR IN/OUT, RELEASE ...
  READ    reads the medium (READ, VERIFY, PRE-FETCH): allowed by Write Exclusive types
  WRITE   changes the medium or its state (WRITE*, UNMAP, SYNCHRONIZE CACHE, MODE SELECT ...)
  SENSE   reports state, allowed by Write Exclusive types and under Exclusive Access only for holders
          (MODE SENSE, READ CAPACITY is ALWAYS)
  TUR     TEST UNIT READY: allowed by every persistent type, a conflict under SPC-2 reservations
Under an SPC-2 reservation every class but ALWAYS conflicts for other nexuses. Under a persistent
reservation the holder may do anything; for the others:
  type                     READ   WRITE/SENSE for registrants   for non-registrants
  1 Write Exclusive        yes    WRITE no, SENSE yes           WRITE no, SENSE yes
  3 Exclusive Access       no     no                            no
  5/7 WE Registrants/All   yes    yes                           WRITE no, SENSE yes
  6/8 EA Registrants/All   yes*   yes                           no (reads too)
  (* registrants only)

The unit-attention side effects (RESERVATIONS PREEMPTED/RELEASED, REGISTRATIONS PREEMPTED) go through the
`notify(nexus, code)` callback the logical unit passes in.

APTPL (activate persist through power loss, SPC-4 5.14.5): the APTPL bit of the last REGISTER or REGISTER
AND IGNORE EXISTING KEY decides. While it is set, every change of the registrations or the reservation is
written, before the command completes, to the LU's state file (`persist_to(path)`, written atomically:
shared/atomic_file.py) and read back when the LU opens again (a restart, or a new owner process); when it is
cleared the file is removed. SPC-2 reservations never persist. REPORT CAPABILITIES says PTPL_C (capable) and
PTPL_A (active).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

from services.iscsi_target.scsi import sense as S
from shared.atomic_file import write_atomic

ALWAYS, READ, WRITE, SENSE, TUR = 0, 1, 2, 3, 4

WRITE_EXCLUSIVE = 1
EXCLUSIVE_ACCESS = 3
WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8
TYPES = frozenset((1, 3, 5, 6, 7, 8))
ALL_REGISTRANTS = frozenset((7, 8))
REGISTRANTS = frozenset((5, 6, 7, 8))
EXCLUSIVE = frozenset((3, 6, 8))

# PR OUT service actions
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_IGNORE = 0, 1, 2, 3, 4, 5, 6
# PR IN service actions
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = 0, 1, 2, 3

_PARAMS = struct.Struct(">QQ4xB")  # reservation key, service action reservation key, flags (byte 20)
_TYPE_MASK = 0xEA01  # WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX, EX_AC_AR (SPC-4 table 203)


def session_newer(a: int, b: int) -> bool:
    """Session number a was handed out after b (TSIHs count up 1..65535 and wrap)."""
    return 0 < (a - b) % 0xFFFF < 0x8000


def _conflict():
    return S.ReservationConflict()


class Reservations:
    def __init__(self, notify=None):
        self.lock = threading.Lock()
        self.notify = notify or (lambda nexus, code: None)
        self.spc2 = None            # nexus holding RESERVE(6/10)
        self.keys: dict = {}        # nexus -> registered key
        self.holder = None          # nexus holding the persistent reservation (any registrant for AR types)
        self.type = 0
        self.generation = 0
        self.aptpl = False
        self.path: Path | None = None  # the APTPL state file (persist_to)
        self.nexus_type = None  # builds a nexus from (initiator port, target port) when state is loaded

    # ---------------------------------------------------------------- APTPL
    def persist_to(self, path: Path, nexus_type) -> None:
        """Keep APTPL state in `path`; load what a previous run left there."""
        self.path, self.nexus_type = Path(path), nexus_type
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.path}: unreadable persistent reservation state: {exc}") from None
        with self.lock:
            self.keys = {nexus_type(i, t): int(k) for i, t, k in state["keys"]}
            self.generation = int(state["generation"])
            self.type = int(state.get("type", 0))
            holder = state.get("holder")
            self.holder = nexus_type(*holder) if holder else None
            if self.type in ALL_REGISTRANTS and self.keys:
                self.holder = self.holder if self.holder in self.keys else next(iter(self.keys))
            self.aptpl = True

    def _save(self) -> None:
        """Called under self.lock after any change to registrations or the reservation."""
        if self.path is None:
            return
        if not self.aptpl:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        holder = list(self.holder) if self.holder is not None and self.type else None
        state = {"generation": self.generation, "type": self.type, "holder": holder,
                 "keys": [[n.initiator_port, n.target_port, k] for n, k in self.keys.items()]}
        write_atomic(self.path, json.dumps(state))

    @property
    def active(self) -> bool:
        return self.spc2 is not None or bool(self.keys)

    # ---------------------------------------------------------------- the gate before every command
    def check(self, nexus, access: int) -> None:
        """Raise ReservationConflict if this nexus may not run a command of this access class."""
        if access == ALWAYS:
            return
        spc2 = self.spc2
        if spc2 is not None:
            if spc2 != nexus:
                raise _conflict()
            return
        rtype = self.type
        if not rtype or access == TUR:
            return
        if self._holds(nexus):
            return
        registered = nexus in self.keys
        if rtype in REGISTRANTS and registered:
            return
        if access == READ:
            if rtype in EXCLUSIVE:
                raise _conflict()
            return
        if access == SENSE and rtype not in EXCLUSIVE:
            return
        raise _conflict()

    def _holds(self, nexus) -> bool:
        if self.type in ALL_REGISTRANTS:
            return nexus in self.keys
        return self.holder == nexus

    # ---------------------------------------------------------------- SPC-2
    def reserve6(self, nexus) -> None:
        with self.lock:
            if self.type or (self.spc2 is not None and self.spc2 != nexus):
                raise _conflict()
            if self.keys and self.spc2 is None:
                # registrations without a reservation still bar SPC-2 reservations (SPC-4 5.12.2)
                raise _conflict()
            self.spc2 = nexus  # this session's object: nexus loss of an older session leaves it alone

    def release6(self, nexus) -> None:
        with self.lock:
            if self.type and not self._holds(nexus):
                raise _conflict()
            if self.spc2 == nexus:
                self.spc2 = None

    def drop_spc2(self, nexus=None, session=None) -> None:
        """Resets and nexus loss end an SPC-2 reservation (of this nexus, unless a newer session of it
        took the reservation; or of anyone)."""
        with self.lock:
            holder = self.spc2
            if holder is None:
                return
            if nexus is None or (holder == nexus and (session is None or not session_newer(holder.session, session))):
                self.spc2 = None

    # ---------------------------------------------------------------- PERSISTENT RESERVE IN
    def pr_in(self, nexus, action: int) -> bytes:
        with self.lock:
            if self.spc2 is not None and self.spc2 != nexus:
                raise _conflict()
            if action == READ_KEYS:
                keys = b"".join(k.to_bytes(8, "big") for k in self.keys.values())
                return struct.pack(">II", self.generation, len(keys)) + keys
            if action == READ_RESERVATION:
                if not self.type:
                    return struct.pack(">II", self.generation, 0)
                key = 0 if self.type in ALL_REGISTRANTS else self.keys.get(self.holder, 0)
                return struct.pack(">IIQ4xxBxx", self.generation, 16, key, self.type)
            if action == REPORT_CAPABILITIES:
                # PTPL_C when state can be kept (a state file); TMV: the type mask is valid; PTPL_A when
                # APTPL is in force. No SIP_C, ATP_C (not supported)
                capable = 0x01 if self.path is not None else 0
                return struct.pack(">HBBHH", 8, capable, 0x80 | (0x01 if self.aptpl else 0), _TYPE_MASK, 0)
            if action == READ_FULL_STATUS:
                out = []
                for reg_nexus, key in self.keys.items():
                    holds = self.type and self._holds(reg_nexus)
                    port = reg_nexus.initiator_port.encode()
                    name = port + b"\0" * (4 - len(port) % 4 if len(port) % 4 else 4)
                    tid = bytes([0x40 | 0x05, 0]) + len(name).to_bytes(2, "big") + name  # iSCSI, format 01b
                    out.append(struct.pack(">Q4xBBxxxxxxHI", key, 1 if holds else 0,
                                           self.type if holds else 0, 1, len(tid)) + tid)
                body = b"".join(out)
                return struct.pack(">II", self.generation, len(body)) + body
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 4))

    # ---------------------------------------------------------------- PERSISTENT RESERVE OUT
    def pr_out(self, nexus, action: int, scope: int, rtype: int, params) -> None:
        if len(params) != 24:
            raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
        key, sa_key, flags = _PARAMS.unpack_from(params)
        with self.lock:
            if self.spc2 is not None and self.spc2 != nexus:
                raise _conflict()
            before = (self.generation, self.type, self.holder, self.aptpl)
            try:
                self._pr_out(nexus, action, scope, rtype, key, sa_key, flags)
            finally:
                if (self.generation, self.type, self.holder, self.aptpl) != before:
                    self._save()  # before the command completes: a GOOD status means it is kept

    def _pr_out(self, nexus, action: int, scope: int, rtype: int, key: int, sa_key: int, flags: int) -> None:
        if action in (REGISTER, REGISTER_AND_IGNORE):
            if flags & 0x08:  # SPEC_I_PT: not supported (REPORT CAPABILITIES says so)
                raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(20, 3, False))
            if flags & 0x01 and self.path is None:  # APTPL with nowhere to keep the state
                raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(20, 0, False))
            self._register(nexus, key, sa_key, action == REGISTER_AND_IGNORE)
            self.aptpl = bool(flags & 0x01)  # the last valid REGISTER's APTPL bit decides
            return
        if action not in (RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT):
            raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 4))
        # the APTPL bit of other service actions is ignored (SPC-4 6.16.3)
        mine = self.keys.get(nexus)
        if mine is None or mine != key:
            raise _conflict()
        if action in (RESERVE, PREEMPT, PREEMPT_AND_ABORT, RELEASE):
            if scope != 0:
                raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2, 7))
            if rtype not in TYPES and not (action in (PREEMPT, PREEMPT_AND_ABORT) and not self.type):
                raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2, 3))
        if action == RESERVE:
            self._reserve(nexus, rtype)
        elif action == RELEASE:
            self._release(nexus, rtype)
        elif action == CLEAR:
            for other in self.keys:
                if other != nexus:
                    self.notify(other, S.RESERVATIONS_PREEMPTED)
            self.keys.clear()
            self.holder, self.type = None, 0
            self.generation += 1
        else:
            self._preempt(nexus, sa_key, rtype)

    def _register(self, nexus, key: int, sa_key: int, ignore: bool) -> None:
        mine = self.keys.get(nexus)
        if mine is None:
            if key and not ignore:
                raise _conflict()
            if sa_key:
                self.keys[nexus] = sa_key
                self.generation += 1
            return
        if not ignore and key != mine:
            raise _conflict()
        if sa_key:
            self.keys[nexus] = sa_key
        else:
            self._unregister(nexus)
        self.generation += 1

    def _unregister(self, nexus) -> None:
        del self.keys[nexus]
        if not self.type:
            return
        if self.type in ALL_REGISTRANTS:
            if not self.keys:
                self.holder, self.type = None, 0
            elif self.holder == nexus:
                self.holder = next(iter(self.keys))
            return
        if self.holder == nexus:
            released = self.type
            self.holder, self.type = None, 0
            if released in REGISTRANTS:
                for other in self.keys:
                    self.notify(other, S.RESERVATIONS_RELEASED)

    def _reserve(self, nexus, rtype: int) -> None:
        if self.type:
            if self._holds(nexus) and self.type == rtype:
                return
            raise _conflict()
        self.holder, self.type = nexus, rtype

    def _release(self, nexus, rtype: int) -> None:
        if not self.type or not self._holds(nexus):
            return  # nothing held by this nexus: GOOD, no effect
        if rtype != self.type:
            raise S.ScsiError(S.ILLEGAL_REQUEST, (0x26, 0x04))  # INVALID RELEASE OF PERSISTENT RESERVATION
        released = self.type
        self.holder, self.type = None, 0
        if released in REGISTRANTS:
            for other in self.keys:
                if other != nexus:
                    self.notify(other, S.RESERVATIONS_RELEASED)

    def _preempt(self, nexus, sa_key: int, rtype: int) -> None:
        if not self.type or (self.type in ALL_REGISTRANTS and sa_key):
            if not sa_key:
                raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(8, None, False))
            removed = self._remove_key(nexus, sa_key)
            if not removed:
                raise _conflict()
            self.generation += 1
            return
        if self.type in ALL_REGISTRANTS:  # sa_key == 0: everyone else goes, the reservation is ours
            for other in list(self.keys):
                if other != nexus:
                    del self.keys[other]
                    self.notify(other, S.REGISTRATIONS_PREEMPTED)
            self.holder, self.type = nexus, rtype
            self.generation += 1
            return
        holder_key = self.keys.get(self.holder)
        if sa_key == holder_key:
            self._remove_key(nexus, sa_key)
            self.holder, self.type = nexus, rtype
            self.generation += 1
            return
        if not sa_key:
            raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(8, None, False))
        if not self._remove_key(nexus, sa_key):
            raise _conflict()
        self.generation += 1

    def _remove_key(self, nexus, key: int) -> list:
        gone = [n for n, k in self.keys.items() if k == key and n != nexus]
        for other in gone:
            del self.keys[other]
            self.notify(other, S.REGISTRATIONS_PREEMPTED)
            if self.holder == other:
                self.holder = None
        return gone
