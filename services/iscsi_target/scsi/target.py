"""ScsiTarget: the SCSI target device of one iSCSI target name, with its logical units.

Theory of operation. `execute` runs one command to completion on the caller's thread (one thread per
connection): it finds the LU, reports a pending unit attention (except to INQUIRY, REPORT LUNS and
REQUEST SENSE), checks reservations when any exist, then calls the handler the opcode indexes in a
256-entry table. Handlers raise ScsiError / ReservationConflict to fail; nothing else is caught here
except a malformed (short) CDB. Reads and writes take no lock: they are pread/pwrite-like on the store.
The LU lock guards unit attentions, COMPARE AND WRITE and mode changes; the reservation lock guards
reservations.

`data_out_length` tells the transport how many Data-Out bytes a CDB moves, so it can collect them (or
refuse a mismatch) before `execute`.
"""

from __future__ import annotations

import errno
import struct
import threading

from services.iscsi_target.scsi import reservations as R
from services.iscsi_target.scsi import sbc, spc
from services.iscsi_target.scsi import sense as S
from services.iscsi_target.scsi.backstore import BackstoreError
from services.iscsi_target.scsi.cdb import U16, U32
from services.iscsi_target.scsi.response import ScsiResponse, good

# iSCSI task management (RFC 7143 11.5.1) function codes and responses
TMF_ABORT_TASK, TMF_ABORT_TASK_SET, TMF_CLEAR_ACA, TMF_CLEAR_TASK_SET = 1, 2, 3, 4
TMF_LUN_RESET, TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET = 5, 6, 7
TMF_COMPLETE, TMF_NO_TASK, TMF_NO_LUN, TMF_NOT_SUPPORTED = 0, 1, 2, 5

_ALWAYS, _READ, _WRITE, _SENSE, _TUR = R.ALWAYS, R.READ, R.WRITE, R.SENSE, R.TUR
_F, _G = 0xFF, 0x1F  # "field used" and the GROUP NUMBER bits in usage maps


def _usage(*b):
    return bytes(b)


# opcode: (handler, access class, service action or None, CDB usage map)
COMMANDS = {
    0x00: (spc.test_unit_ready, _TUR, None, _usage(0x00, 0, 0, 0, 0, 0)),
    0x03: (spc.request_sense, _ALWAYS, None, _usage(0x03, 0x01, 0, 0, _F, 0)),
    0x08: (sbc.read_any, _READ, None, _usage(0x08, 0x1F, _F, _F, _F, 0)),
    0x0A: (sbc.write_any, _WRITE, None, _usage(0x0A, 0x1F, _F, _F, _F, 0)),
    0x12: (spc.inquiry, _ALWAYS, None, _usage(0x12, 0x01, _F, _F, _F, 0)),
    0x15: (spc.mode_select, _WRITE, None, _usage(0x15, 0x11, 0, 0, _F, 0)),
    0x16: (spc.reserve, _ALWAYS, None, _usage(0x16, 0, 0, 0, 0, 0)),
    0x17: (spc.release, _ALWAYS, None, _usage(0x17, 0, 0, 0, 0, 0)),
    0x1A: (spc.mode_sense, _SENSE, None, _usage(0x1A, 0x08, _F, _F, _F, 0)),
    0x1B: (spc.start_stop_unit, _WRITE, None, _usage(0x1B, 0x01, 0, 0x0F, 0xF7, 0)),
    0x1E: (spc.prevent_allow, _ALWAYS, None, _usage(0x1E, 0, 0, 0, 0x03, 0)),
    0x25: (sbc.read_capacity10, _SENSE, None, _usage(0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    0x28: (sbc.read10, _READ, None, _usage(0x28, 0x1C, _F, _F, _F, _F, _G, _F, _F, 0)),
    0x2A: (sbc.write10, _WRITE, None, _usage(0x2A, 0x1C, _F, _F, _F, _F, _G, _F, _F, 0)),
    0x2E: (sbc.write_and_verify, _WRITE, None, _usage(0x2E, 0x12, _F, _F, _F, _F, _G, _F, _F, 0)),
    0x2F: (sbc.verify, _READ, None, _usage(0x2F, 0x16, _F, _F, _F, _F, _G, _F, _F, 0)),
    0x34: (sbc.prefetch, _READ, None, _usage(0x34, 0x02, _F, _F, _F, _F, _G, _F, _F, 0)),
    0x35: (sbc.synchronize_cache, _WRITE, None, _usage(0x35, 0x06, _F, _F, _F, _F, _G, _F, _F, 0)),
    0x37: (sbc.read_defect_data, _SENSE, None, _usage(0x37, 0, 0x1F, 0, 0, 0, 0, _F, _F, 0)),
    0x41: (sbc.write_same, _WRITE, None, _usage(0x41, 0x08, _F, _F, _F, _F, _G, _F, _F, 0)),
    0x42: (sbc.unmap, _WRITE, None, _usage(0x42, 0, 0, 0, 0, 0, _G, _F, _F, 0)),
    0x55: (spc.mode_select, _WRITE, None, _usage(0x55, 0x11, 0, 0, 0, 0, 0, _F, _F, 0)),
    0x56: (spc.reserve, _ALWAYS, None, _usage(0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    0x57: (spc.release, _ALWAYS, None, _usage(0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    0x5A: (spc.mode_sense, _SENSE, None, _usage(0x5A, 0x18, _F, _F, 0, 0, 0, _F, _F, 0)),
    0x5E: (spc.persistent_reserve_in, _ALWAYS, (0, 1, 2, 3),
           _usage(0x5E, 0x1F, 0, 0, 0, 0, 0, _F, _F, 0)),
    0x5F: (spc.persistent_reserve_out, _ALWAYS, (0, 1, 2, 3, 4, 5, 6),
           _usage(0x5F, 0x1F, _F, 0, 0, _F, _F, _F, _F, 0)),
    0x88: (sbc.read16, _READ, None, _usage(0x88, 0x1C, *[_F] * 12, _G, 0)),
    0x89: (sbc.compare_and_write, _WRITE, None, _usage(0x89, 0x18, *[_F] * 8, 0, 0, 0, _F, _G, 0)),
    0x8A: (sbc.write16, _WRITE, None, _usage(0x8A, 0x18, *[_F] * 12, _G, 0)),
    0x8B: (sbc.orwrite, _WRITE, None, _usage(0x8B, 0x18, *[_F] * 12, _G, 0)),
    0x8E: (sbc.write_and_verify, _WRITE, None, _usage(0x8E, 0x12, *[_F] * 12, _G, 0)),
    0x8F: (sbc.verify, _READ, None, _usage(0x8F, 0x16, *[_F] * 12, _G, 0)),
    0x90: (sbc.prefetch, _READ, None, _usage(0x90, 0x02, *[_F] * 12, _G, 0)),
    0x91: (sbc.synchronize_cache, _WRITE, None, _usage(0x91, 0x06, *[_F] * 12, _G, 0)),
    0x93: (sbc.write_same, _WRITE, None, _usage(0x93, 0x09, *[_F] * 12, _G, 0)),
    0x9E: (sbc.service_action_in_16, _SENSE, (0x10, 0x12), _usage(0x9E, 0x1F, *[_F] * 12, 0, 0)),
    0xA0: (spc.report_luns, _ALWAYS, None, _usage(0xA0, 0, _F, 0, 0, 0, _F, _F, _F, _F, 0, 0)),
    0xA3: (None, _ALWAYS, (0x0C,), _usage(0xA3, 0x1F, 0x87, _F, _F, _F, _F, _F, _F, _F, 0, 0)),
    0xA8: (sbc.read_any, _READ, None, _usage(0xA8, 0x1C, *[_F] * 8, _G, 0)),
    0xAA: (sbc.write_any, _WRITE, None, _usage(0xAA, 0x18, *[_F] * 8, _G, 0)),
    0xAE: (sbc.write_and_verify, _WRITE, None, _usage(0xAE, 0x12, *[_F] * 8, _G, 0)),
    0xB7: (sbc.read_defect_data, _SENSE, None, _usage(0xB7, 0x1F, 0, 0, 0, 0, _F, _F, _F, _F, 0, 0)),
    0xAF: (sbc.verify, _READ, None, _usage(0xAF, 0x16, *[_F] * 8, _G, 0)),
}
NO_UA = frozenset((0x12, 0xA0, 0x03))  # INQUIRY, REPORT LUNS, REQUEST SENSE neither see nor clear UAs


def _invalid_opcode(target, lu, nexus, cdb, data_out):
    raise S.ScsiError(S.ILLEGAL_REQUEST, S.INVALID_OPCODE, sks=S.field_pointer(0))


def _maintenance_in(target, lu, nexus, cdb, data_out):
    if cdb[1] & 0x1F == 0x0C:
        return report_supported_opcodes(target, lu, nexus, cdb, data_out)
    raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 4))


HANDLERS = [_invalid_opcode] * 256
ACCESS = [R.WRITE] * 256
for _op, (_handler, _access, _sas, _map) in COMMANDS.items():
    HANDLERS[_op] = _handler or _maintenance_in
    ACCESS[_op] = _access
HANDLERS = tuple(HANDLERS)
ACCESS = tuple(ACCESS)

_TIMEOUTS = bytes([0x00, 0x0A]) + bytes(10)  # command timeouts descriptor: nominal/recommended unspecified


def report_supported_opcodes(target, lu, nexus, cdb, data_out):
    rctd = cdb[2] & 0x80
    options = cdb[2] & 0x07
    op, sa = cdb[3], U16.unpack_from(cdb, 4)[0]
    alloc = U32.unpack_from(cdb, 6)[0]
    timeouts = _TIMEOUTS if rctd else b""
    if options == 0:
        out = []
        for code in sorted(COMMANDS):
            _, _, sas, usage = COMMANDS[code]
            flags = 0x02 if rctd else 0
            for action in (sas or (None,)):
                out.append(struct.pack(">BxHxBH", code, action or 0, flags | (1 if action is not None else 0),
                                       len(usage)) + timeouts)
        body = b"".join(out)
        return good(U32.pack(len(body)) + body, alloc)
    if options not in (1, 2, 3):
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2, 2))
    entry = COMMANDS.get(op)
    if entry is not None:
        sas = entry[2]
        if options == 1 and sas:
            raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(3))
        if options == 2 and not sas:
            raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(3))
        if sas and sa not in sas:
            entry = None
        elif not sas and options == 3 and sa:
            entry = None
    if entry is None:
        return good(bytes([0, 0x01, 0, 0]), alloc)  # SUPPORT 001b: not supported
    usage = bytearray(entry[3])
    if entry[2]:
        usage[1] = (usage[1] & 0xE0) | 0x1F if len(usage) > 1 else 0
    ctdp = 0x80 if rctd else 0
    return good(bytes([0, ctdp | 0x03]) + U16.pack(len(usage)) + bytes(usage) + timeouts, alloc)


# commands that change the medium: on a write-protected unit they fail before any data is looked at
MEDIUM_WRITES = frozenset((0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x41, 0x93, 0x42, 0x89, 0x8B))


def _data_out_length(lu, cdb) -> int:
    op = cdb[0]
    bs = lu.block_size
    if op in MEDIUM_WRITES and (lu.readonly or lu.swp):
        # The command ends in WRITE PROTECTED whatever data comes: ask for none, so the transport
        # does not refuse a mismatch first (an UNMAP-only WRITE SAME may carry no data at all).
        return 0
    if op in (0x2A, 0x2E):
        return U16.unpack_from(cdb, 7)[0] * bs
    if op in (0x8A, 0x8E, 0x8B):
        return U32.unpack_from(cdb, 10)[0] * bs
    if op in (0xAA, 0xAE):
        return U32.unpack_from(cdb, 6)[0] * bs
    if op == 0x0A:
        return (cdb[4] or 256) * bs
    if op in (0x2F, 0xAF, 0x8F):  # VERIFY: data only with BYTCHK
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk == 1:
            n = U16.unpack_from(cdb, 7)[0] if op == 0x2F else U32.unpack_from(cdb, 6 if op == 0xAF else 10)[0]
            return n * bs
        return bs if bytchk == 3 else 0
    if op == 0x41:
        return bs
    if op == 0x93:
        return 0 if cdb[1] & 0x01 else bs  # NDOB
    if op == 0x89:
        return 2 * cdb[13] * bs
    if op == 0x42:
        return U16.unpack_from(cdb, 7)[0]
    if op == 0x15:
        return cdb[4]
    if op == 0x55:
        return U16.unpack_from(cdb, 7)[0]
    if op == 0x5F:
        return U32.unpack_from(cdb, 5)[0]
    return 0


class ScsiTarget:
    def __init__(self, name: str, luns: dict | None = None):
        self.name = name
        self.luns: dict = {}
        self._lock = threading.Lock()  # LUN inventory changes
        for lun_id, lu in (luns or {}).items():
            if lu.lun_id != lun_id:
                raise ValueError(f"LUN {lun_id}: its LogicalUnit says lun_id {lu.lun_id}")
            lu.attach(name)
            self.luns[lun_id] = lu

    # ---------------------------------------------------------------- commands
    def data_out_length(self, lun: int, cdb) -> int:
        lu = self.luns.get(lun)
        if lu is None:
            return 0
        try:
            return _data_out_length(lu, cdb)
        except (struct.error, IndexError):
            return 0

    def plain_read(self, nexus, lun: int, flags: int, lba: int, n: int):
        """The data of a READ(10)/(16) that `execute` would answer GOOD with its handler alone: a disk LUN
        this nexus has been seen on, no unit attention pending on it, no reservation, no RDPROTECT, whole
        blocks in range. None for anything else (and for a store error): `execute` then answers it."""
        lu = self.luns.get(lun)
        if (lu is None or lu.ua or lu.handlers is not None or flags & 0xE0 or not n or lba + n > lu.blocks
                or lu.known.get(nexus) != nexus.session):
            return None
        res = lu.res
        if res.keys or res.spc2 is not None:
            return None
        bs = lu.block_size
        try:
            return lu.store.read(lba * bs, n * bs)
        except (BackstoreError, OSError):
            return None

    def execute(self, nexus, lun: int, cdb, data_out=None) -> ScsiResponse:
        lu = self.luns.get(lun)
        op = cdb[0]
        try:
            if lu is None:
                if op in (0x12, 0xA0, 0x03):
                    return HANDLERS[op](self, None, nexus, cdb, data_out)
                raise S.illegal(S.LUN_NOT_SUPPORTED)
            if lu.known.get(nexus) != nexus.session:
                lu.first_contact(nexus)
            if lu.ua and op not in lu.no_ua and nexus in lu.ua:
                code = lu.take_ua(nexus)
                if code is not None:
                    return ScsiResponse(S.CHECK_CONDITION, S.fixed_sense(S.UNIT_ATTENTION, *code))
            if op == 0xA0 and lu.ua:
                self._clear_luns_changed(lu, nexus)
            res = lu.res
            if res.keys or res.spc2 is not None:
                res.check(nexus, ACCESS[op])
            return (lu.handlers or HANDLERS)[op](self, lu, nexus, cdb, data_out)
        except S.ScsiError as exc:
            return ScsiResponse(S.CHECK_CONDITION, exc.sense())
        except S.ReservationConflict:
            return ScsiResponse(S.RESERVATION_CONFLICT)
        except BackstoreError as exc:
            # A store that says which sense it means (an overlay out of space: DATA PROTECT 27h/07h, raised
            # before anything was written, so nothing is acknowledged that was not stored); others are faults.
            key = getattr(exc, "sense_key", None)
            if key is None:
                raise
            if lu.on_space_error is not None:
                lu.on_space_error(exc)
            return ScsiResponse(S.CHECK_CONDITION, S.fixed_sense(key, *exc.asc_ascq))
        except (struct.error, IndexError):  # a CDB shorter than its opcode needs
            return ScsiResponse(S.CHECK_CONDITION, S.fixed_sense(S.ILLEGAL_REQUEST, *S.INVALID_FIELD_IN_CDB))
        except OSError as exc:
            return ScsiResponse(S.CHECK_CONDITION, S.fixed_sense(*_os_error_sense(op, exc)))

    @staticmethod
    def _clear_luns_changed(lu, nexus) -> None:
        with lu.lock:
            queue = lu.ua.get(nexus)
            if queue and S.REPORTED_LUNS_DATA_CHANGED in queue:
                queue.remove(S.REPORTED_LUNS_DATA_CHANGED)
                if not queue:
                    del lu.ua[nexus]

    # ---------------------------------------------------------------- task management
    def task_management(self, nexus, function: int, lun: int, referenced_task=None) -> int:
        if function == TMF_ABORT_TASK:
            return TMF_NO_TASK  # commands run to completion inside execute: none is ever pending here
        if function in (TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET, TMF_CLEAR_ACA):
            lu = self.luns.get(lun)
            if lu is None:
                return TMF_NO_LUN
            if function == TMF_CLEAR_ACA:
                return TMF_NOT_SUPPORTED  # NACA is never accepted, so there is no ACA to clear
            if function == TMF_LUN_RESET:
                lu.reset(S.BUS_DEVICE_RESET)  # every nexus, the issuer too (SAM-5 5.10.7)
            return TMF_COMPLETE
        if function in (TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET):
            code = S.BUS_RESET if function == TMF_TARGET_WARM_RESET else S.POWER_ON_OCCURRED
            for lu in list(self.luns.values()):
                lu.reset(code)
            return TMF_COMPLETE
        return TMF_NOT_SUPPORTED

    def nexus_lost(self, nexus) -> None:
        for lu in list(self.luns.values()):
            lu.forget(nexus)

    # ---------------------------------------------------------------- live reconfiguration
    def add_lun(self, lu_or_id, lu=None) -> None:
        """add_lun(lu) or add_lun(lun_id, lu): every nexus sees REPORTED LUNS DATA HAS CHANGED."""
        if lu is None:
            lu = lu_or_id
        elif lu.lun_id != lu_or_id:
            raise ValueError(f"LUN {lu_or_id}: its LogicalUnit says lun_id {lu.lun_id}")
        lu.attach(self.name)
        with self._lock:
            others = [u for u in self.luns.values() if u is not lu]
            old = self.luns.get(lu.lun_id)
            luns = dict(self.luns)
            luns[lu.lun_id] = lu
            self.luns = luns  # one assignment: commands in flight see the old or the new dict
            nexuses = {}
            for other in others:
                nexuses.update(other.known)
            # nexuses already logged in know the target: tell them (and the new LU starts with them seen)
            with lu.lock:
                for nexus, session in nexuses.items():
                    lu.known[nexus] = session
                    lu.add_ua(nexus, S.POWER_ON_RESET)
        if old is not None and old is not lu:
            old.close()
        for other in others:
            if other is not old:
                other.add_ua_all(S.REPORTED_LUNS_DATA_CHANGED)

    def remove_lun(self, lun_id: int) -> None:
        with self._lock:
            luns = dict(self.luns)
            lu = luns.pop(lun_id, None)
            self.luns = luns
        if lu is None:
            return
        for other in list(self.luns.values()):
            other.add_ua_all(S.REPORTED_LUNS_DATA_CHANGED)
        lu.close()


# Commands that store data: an I/O error in one is a WRITE ERROR, in any other an UNRECOVERED READ ERROR.
_STORING = frozenset({0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x41, 0x93, 0x89, 0x42, 0x35, 0x91})


def _os_error_sense(op: int, exc: OSError) -> tuple[int, int, int]:
    """The sense for a store's OSError: the command fails (never acknowledged) with what the initiator can act
    on. A full file system is thin provisioning's SPACE ALLOCATION FAILED; anything else a medium error."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (S.DATA_PROTECT, *S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    return (S.MEDIUM_ERROR, *(S.WRITE_ERROR if op in _STORING else S.UNRECOVERED_READ_ERROR))
