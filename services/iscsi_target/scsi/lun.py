"""A logical unit: its backing store, identity (NAA, serial), mode parameters, unit attentions and
reservations; and the I_T nexus type the transport hands in.

Unit attentions are queued per I_T nexus. A nexus seen for the first time gets POWER ON, RESET, OR BUS
DEVICE RESET OCCURRED (SPC-4 6.x: every I_T nexus starts with one); resets, capacity changes, mode
changes by another nexus, reservation preemption and LUN inventory changes add theirs. The first command
that is not INQUIRY, REPORT LUNS or REQUEST SENSE reports the oldest one and consumes it.
"""

from __future__ import annotations

import hashlib
import operator
import threading

from services.iscsi_target.scsi import sense as S
from services.iscsi_target.scsi.reservations import Reservations, session_newer

MAX_UA_QUEUE = 8  # more than this and the oldest are dropped (an initiator that never looks)


class Nexus(tuple):
    """An I_T nexus: initiator port `<iqn>,i,0x<isid>` and target port `<iqn>,t,0x<tpgt>`.

    Equality and hash use the two ports only (it is the tuple of them, so both run in C on the hot path):
    the session number tells sessions apart, but a new session of the same initiator port is the same
    nexus to SCSI (SAM-5), and keeps its registrations.
    """

    def __new__(cls, initiator_port: str, target_port: str, session: int = 0):
        self = tuple.__new__(cls, (initiator_port, target_port))
        self.session = session
        return self

    initiator_port = property(operator.itemgetter(0))
    target_port = property(operator.itemgetter(1))

    def __repr__(self) -> str:
        return f"Nexus({self[0]!r}, {self[1]!r}, session={self.session})"


def derived_ids(target_name: str, lun_id: int) -> tuple[bytes, str]:
    """A NAA identifier and a serial number unique to (target, LUN): Windows refuses disks that share one."""
    digest = hashlib.sha256(f"bootfleet\0{target_name}\0{lun_id}".encode()).digest()
    naa = bytes([0x30 | (digest[0] & 0x0F)]) + digest[1:8]  # NAA 3: locally assigned, 60 bits
    return naa, digest[8:16].hex()


class LogicalUnit:
    handlers = None  # a 256-entry opcode table of its own (mmc.CdromUnit); None: the target's disk table
    no_ua = frozenset((0x12, 0xA0, 0x03))  # opcodes that neither see nor clear a unit attention
    on_space_error = None  # (exc) -> None: a write refused for space (an overlay's quota), for its event

    def __init__(self, backstore, lun_id: int, naa: bytes | None = None, serial: str | None = None,
                 readonly: bool = False, vendor: str = "BOOTFLT", product: str = "VIRTUAL DISK",
                 target_name: str = "", revision: str = "0001"):
        if not 0 <= lun_id <= 16383:
            raise ValueError(f"lun_id {lun_id} is outside 0..16383")
        if naa is not None and len(naa) not in (8, 16):
            raise ValueError(f"naa must be 8 or 16 bytes, got {len(naa)}")
        self.store = backstore
        self.lun_id = lun_id
        self.block_size = backstore.block_size
        self.blocks = backstore.blocks
        # a block device's physical blocks may be larger (4096 behind 512): READ CAPACITY(16) says how many
        physical = max(getattr(backstore, "physical_block_size", self.block_size), self.block_size)
        self.physical_exponent = (physical // self.block_size).bit_length() - 1
        self.readonly = readonly or backstore.readonly
        self.vendor, self.product, self.revision = vendor, product, revision
        self.target_name = target_name
        self._naa_given, self._serial_given = naa, serial
        self.naa, self.serial = naa, serial
        self._derive()
        # mode parameters (MODE SELECT may change WCE and SWP)
        self.wce = not getattr(backstore, "write_through", False)
        self.swp = False
        self.started = True
        self.lock = threading.RLock()  # unit attentions, COMPARE AND WRITE, mode changes
        self.ua: dict = {}            # nexus -> [(asc, ascq), ...]; empty dict: the fast path
        self.known: dict = {}         # nexus -> session number, for nexuses that got their power-on UA
        self.res = Reservations(self.add_ua)
        backstore.resize_listeners.append(self._resized)

    def _derive(self) -> None:
        naa, serial = derived_ids(self.target_name, self.lun_id)
        self.naa = self._naa_given or naa
        self.serial = self._serial_given or serial

    def attach(self, target_name: str) -> None:
        """The target this LU joins; identifiers not given are derived from its name."""
        if target_name != self.target_name:
            self.target_name = target_name
            self._derive()

    @property
    def write_protected(self) -> bool:
        return self.readonly or self.swp

    @property
    def waits_on_disk(self) -> bool:
        """A writable LU whose flushes wait for the disk (its connections keep a thread: io_loop.py)."""
        return not self.readonly and self.store.waits_on_disk

    # ---------------------------------------------------------------- unit attentions
    def add_ua(self, nexus, code: tuple[int, int]) -> None:
        """Queue a unit attention for one nexus."""
        with self.lock:
            queue = self.ua.setdefault(nexus, [])
            if code not in queue:
                queue.append(code)
                del queue[:-MAX_UA_QUEUE]

    def add_ua_all(self, code: tuple[int, int], except_nexus=None) -> None:
        with self.lock:
            for nexus in list(self.known):
                if nexus != except_nexus:
                    self.add_ua(nexus, code)

    def first_contact(self, nexus) -> None:
        """A command from a nexus not seen before, or from a new session of a known one (same ports)."""
        with self.lock:
            if nexus not in self.known:
                self.add_ua(nexus, S.POWER_ON_RESET)
            self.known[nexus] = nexus.session

    def take_ua(self, nexus):
        """The oldest pending unit attention of this nexus, consumed; None if none."""
        with self.lock:
            queue = self.ua.get(nexus)
            if not queue:
                return None
            code = queue.pop(0)
            if not queue:
                del self.ua[nexus]
            return code

    def forget(self, nexus) -> None:
        """The session is gone: its unit attentions and SPC-2 reservation go with it.

        Unless a newer session of the same ports is already at work here: a closing connection may
        report its loss after the same initiator port has logged in again, and the new session's state
        must survive that late report. (At session reinstatement the transport reports the loss with
        the new session's nexus: that one does clear the old state.)"""
        with self.lock:
            if session_newer(self.known.get(nexus, nexus.session), nexus.session):
                return
            self.known.pop(nexus, None)
            self.ua.pop(nexus, None)
        self.res.drop_spc2(nexus, session=nexus.session)

    def reset(self, code: tuple[int, int], by=None) -> None:
        """LOGICAL UNIT RESET or a target reset: SPC-2 reservation ends, others see `code`."""
        self.res.drop_spc2()
        self.started = True
        self.add_ua_all(code, except_nexus=by)

    def _resized(self, size: int) -> None:
        self.blocks = size // self.block_size
        self.add_ua_all(S.CAPACITY_DATA_CHANGED)

    def resize(self, size: int) -> None:
        """Grow or shrink the medium; every nexus sees CAPACITY DATA HAS CHANGED."""
        self.store.resize(size)

    def set_wce(self, enabled: bool) -> None:
        self.wce = enabled
        if hasattr(self.store, "write_through") and (hasattr(self.store, "fd") or hasattr(self.store, "legs")):
            self.store.write_through = not enabled

    def close(self) -> None:
        try:
            self.store.resize_listeners.remove(self._resized)
        except ValueError:
            pass
