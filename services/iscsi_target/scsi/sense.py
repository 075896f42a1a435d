"""Status codes, sense keys and additional sense codes, and fixed-format sense data (SPC-4 4.5.3).

A command handler that fails raises `ScsiError(key, asc, ascq)`; the target turns it into CHECK CONDITION
with 18 bytes of fixed-format sense. The INFORMATION field carries the miscompare offset of COMPARE AND
WRITE and VERIFY; the sense-key specific field can point at the CDB or parameter byte that was wrong.
"""

from __future__ import annotations

GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28

# sense keys
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# (asc, ascq) pairs
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_OPCODE = (0x20, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
LUN_NOT_SUPPORTED = (0x25, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
SOFTWARE_WRITE_PROTECTED = (0x27, 0x02)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
NOT_READY_INIT_REQUIRED = (0x04, 0x02)
INSUFFICIENT_REGISTRATION_RESOURCES = (0x55, 0x04)
WRITE_ERROR = (0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
MEDIUM_NOT_PRESENT = (0x3A, 0x00)
MEDIUM_NOT_PRESENT_TRAY_OPEN = (0x3A, 0x02)
MEDIUM_REMOVAL_PREVENTED = (0x53, 0x02)
INCOMPATIBLE_MEDIUM = (0x30, 0x00)
INVALID_FIELD_IN_INFORMATION_UNIT = (0x0E, 0x03)  # transport: the CDB's length and the EDTL disagree
DATA_PHASE_ERROR = (0x4B, 0x00)  # transport: a Data-Out sequence it cannot accept
INTERNAL_TARGET_FAILURE = (0x44, 0x00)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)  # DATA PROTECT: an overlay's quota or the store's reserve
# unit attentions
POWER_ON_RESET = (0x29, 0x00)
POWER_ON_OCCURRED = (0x29, 0x01)
BUS_RESET = (0x29, 0x02)
BUS_DEVICE_RESET = (0x29, 0x03)
NEXUS_LOSS = (0x29, 0x07)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
CAPACITY_DATA_CHANGED = (0x2A, 0x09)
REPORTED_LUNS_DATA_CHANGED = (0x3F, 0x0E)
SOFT_THRESHOLD_REACHED = (0x38, 0x07)  # THIN PROVISIONING SOFT THRESHOLD REACHED (an overlay near its quota)
MEDIUM_MAY_HAVE_CHANGED = (0x28, 0x00)  # NOT READY TO READY CHANGE: a new disc
COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (0x2F, 0x00)


def fixed_sense(key: int, asc: int, ascq: int, info: int | None = None, sks: bytes | None = None) -> bytes:
    """18 bytes of fixed-format sense data (response code 0x70, current error)."""
    b = bytearray(18)
    b[0] = 0x70
    b[2] = key & 0x0F
    b[7] = 10
    b[12] = asc
    b[13] = ascq
    if info is not None:
        b[0] |= 0x80  # VALID: the INFORMATION field means something
        b[3:7] = (info & 0xFFFFFFFF).to_bytes(4, "big")
    if sks is not None:
        b[15:18] = sks
    return bytes(b)


def descriptor_sense(key: int, asc: int, ascq: int, info: int | None = None) -> bytes:
    """Descriptor-format sense data (response code 0x72), for REQUEST SENSE with DESC=1."""
    body = b""
    if info is not None:
        body = bytes([0x00, 0x0A, 0x80, 0]) + info.to_bytes(8, "big")
    return bytes([0x72, key & 0x0F, asc, ascq, 0, 0, 0, len(body)]) + body


def field_pointer(byte: int, bit: int | None = None, in_cdb: bool = True) -> bytes:
    """Sense-key specific bytes that name the offending byte (and bit) of the CDB or parameter list."""
    first = 0x80 | (0x40 if in_cdb else 0)
    if bit is not None:
        first |= 0x08 | (bit & 7)
    return bytes([first]) + byte.to_bytes(2, "big")


class ScsiError(Exception):
    """A command ends in CHECK CONDITION with this sense."""

    __slots__ = ("key", "asc", "ascq", "info", "sks")

    def __init__(self, key: int, code: tuple[int, int], info: int | None = None, sks: bytes | None = None):
        super().__init__(f"sense key {key:#x} asc/ascq {code[0]:#04x}/{code[1]:#04x}")
        self.key = key
        self.asc, self.ascq = code
        self.info = info
        self.sks = sks

    def sense(self) -> bytes:
        return fixed_sense(self.key, self.asc, self.ascq, self.info, self.sks)


class ReservationConflict(Exception):
    """A command ends with status RESERVATION CONFLICT (no sense data)."""


def illegal(code: tuple[int, int] = INVALID_FIELD_IN_CDB, sks: bytes | None = None) -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, code, sks=sks)
