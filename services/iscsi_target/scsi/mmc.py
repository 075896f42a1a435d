"""A CD/DVD-ROM drive (MMC-5, peripheral device type 5) whose disc is an ISO image.

The LU is a `CdromUnit`: removable (RMB in INQUIRY), 2048-byte blocks, read-only. It carries its own
opcode table (the target dispatches through `lu.handlers`), built from MMC's commands and the SPC ones a
drive shares with a disk (REPORT LUNS, reservations):

    TEST UNIT READY, REQUEST SENSE, INQUIRY (VPD 0x00 0x80 0x83), MODE SENSE 6/10 (pages 0x01, 0x2A),
    MODE SELECT 6/10 (header only), START STOP UNIT (load/eject), PREVENT ALLOW MEDIUM REMOVAL,
    READ CAPACITY(10), READ(10), READ(12), GET CONFIGURATION, READ TOC/PMA/ATIP (formats 0, 1, 2),
    READ DISC INFORMATION, READ TRACK INFORMATION, GET EVENT STATUS NOTIFICATION (media class),
    READ DVD STRUCTURE (formats 0 and 1), SET CD SPEED, SYNCHRONIZE CACHE;
    every writing command ends in DATA PROTECT / WRITE PROTECTED.

The disc: one session, one data track (mode 1) from LBA 0 to the image's end, lead-out after it. The
current profile is DVD-ROM (0010h) when the image is larger than an 80-minute CD (360000 blocks, 703 MiB),
else CD-ROM (0008h); both profiles are listed.

Media changes. `change_medium(store)` (the administrator changed the ISO) and a load by START STOP UNIT
queue NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED (28h/00h) for every nexus and a NewMedia event
for GET EVENT STATUS NOTIFICATION; an eject leaves the tray open (NOT READY, MEDIUM NOT PRESENT - TRAY OPEN,
3Ah/02h) with a MediaRemoval event. PREVENT MEDIUM REMOVAL from any nexus refuses an eject by START STOP
UNIT (53h/02h); it does not stop the administrator's change. GET CONFIGURATION and GET EVENT STATUS
NOTIFICATION neither report nor clear a unit attention (MMC-6 4.1.6.1), so the initiator can poll them.
"""

from __future__ import annotations

import os
import struct

from services.iscsi_target.scsi import sbc, spc
from services.iscsi_target.scsi import sense as S
from services.iscsi_target.scsi import target as T
from services.iscsi_target.scsi.backstore import BackstoreError
from services.iscsi_target.scsi.cdb import RW10, RW12, U16, U32
from services.iscsi_target.scsi.lun import LogicalUnit
from services.iscsi_target.scsi.pread_file import PreadFileBackstore
from services.iscsi_target.scsi.response import good

BLOCK = 2048
CD_MAX_BLOCKS = 360000          # an 80-minute CD; a larger image is a DVD
PROFILE_CD_ROM, PROFILE_DVD_ROM = 0x0008, 0x0010
EVENT_NONE, EVENT_NEW_MEDIA, EVENT_MEDIA_REMOVAL = 0, 2, 3
SPEED_KBS = 8448                # 48x CD, what the capabilities page claims
VOLUME_DESCRIPTOR = 16 * BLOCK + 1  # "CD001" (ISO 9660) or "BEA01" (UDF) here
MMC5 = 0x02A0                   # version descriptor


# ---------------------------------------------------------------------------------------------- the disc
def open_iso(path) -> PreadFileBackstore:
    """An ISO image as a read-only medium (pread: an image replaced in place fails a read, not the process)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise BackstoreError(f"{path}: cannot open the ISO image: {exc.strerror}") from exc
    if size < VOLUME_DESCRIPTOR + 5:
        raise BackstoreError(f"{path}: {size} bytes is too small for an ISO 9660 or UDF image")
    store = PreadFileBackstore(path, size - size % 512, readonly=True, create=False)
    try:
        magic = store.read(VOLUME_DESCRIPTOR, 5)
    except OSError as exc:
        store.close()
        raise BackstoreError(f"{path}: cannot read the ISO image: {exc.strerror}") from exc
    if magic not in (b"CD001", b"BEA01"):
        store.close()
        raise BackstoreError(f"{path}: not an ISO 9660 or UDF image (no volume descriptor at byte 32769)")
    return store


class CdromUnit(LogicalUnit):
    """A CD/DVD drive with the disc `medium` (a Backstore; its size is cut to whole 2048-byte blocks)."""

    no_ua = frozenset((0x12, 0xA0, 0x03, 0x46, 0x4A))  # + GET CONFIGURATION, GET EVENT STATUS NOTIFICATION

    def __init__(self, medium, lun_id: int, **kwargs):
        kwargs.setdefault("product", "VIRTUAL CDROM")
        kwargs["readonly"] = True
        super().__init__(medium, lun_id, **kwargs)
        self.wce = False
        self.tray_open = False
        self.prevent: set = set()     # nexuses that sent PREVENT MEDIUM REMOVAL
        self.media_events: dict = {}  # nexus -> pending media event code for GET EVENT STATUS NOTIFICATION
        self._retired = None          # the disc before the last change, closed at the next one
        self._load(medium)

    def _load(self, medium) -> None:
        if medium.size < BLOCK:
            raise BackstoreError("the disc image is smaller than one 2048-byte block")
        self.store = medium
        self.block_size = BLOCK
        self.blocks = medium.size // BLOCK
        self.physical_exponent = 0

    @property
    def present(self) -> bool:
        return not self.tray_open

    @property
    def profile(self) -> int:
        return PROFILE_DVD_ROM if self.blocks > CD_MAX_BLOCKS else PROFILE_CD_ROM

    def _media_event_all(self, code: int) -> None:
        for nexus in list(self.known):
            self.media_events[nexus] = code

    def change_medium(self, medium) -> None:
        """A new disc (the ISO path changed): every nexus sees 28h/00h and a NewMedia event."""
        with self.lock:
            old = self.store
            self._load(medium)
            self.tray_open = False
            self._media_event_all(EVENT_NEW_MEDIA)
        self.add_ua_all(S.MEDIUM_MAY_HAVE_CHANGED)
        # Not closed now: a read still running on the old disc would pread a closed descriptor, whose
        # number the next open may already have reused for another file. The change after this one closes it.
        retired, self._retired = self._retired, (old if old is not medium else None)
        if retired is not None:
            retired.close()

    def eject(self, by=None) -> None:
        with self.lock:
            if self.prevent:
                raise S.illegal(S.MEDIUM_REMOVAL_PREVENTED)
            self.tray_open = True
            self._media_event_all(EVENT_MEDIA_REMOVAL)

    def load(self, by=None) -> None:
        with self.lock:
            if not self.tray_open:
                return
            self.tray_open = False
            self._media_event_all(EVENT_NEW_MEDIA)
        self.add_ua_all(S.MEDIUM_MAY_HAVE_CHANGED, except_nexus=by)

    def take_media_event(self, nexus) -> int:
        with self.lock:
            return self.media_events.pop(nexus, EVENT_NONE)

    def forget(self, nexus) -> None:
        super().forget(nexus)
        with self.lock:
            if nexus not in self.known:
                self.prevent.discard(nexus)
                self.media_events.pop(nexus, None)

    def set_wce(self, enabled: bool) -> None:
        """A read-only disc has no write cache."""

    def close(self) -> None:
        super().close()
        self.store.close()
        if self._retired is not None:
            self._retired.close()
            self._retired = None


# ---------------------------------------------------------------------------------------------- helpers
def _not_ready(lu) -> S.ScsiError:
    return S.ScsiError(S.NOT_READY, S.MEDIUM_NOT_PRESENT_TRAY_OPEN if lu.tray_open else S.MEDIUM_NOT_PRESENT)


def _ready(lu) -> None:
    if not lu.present:
        raise _not_ready(lu)


def _msf(lba: int) -> bytes:
    frames = lba + 150  # the 2-second pregap
    return bytes([0, frames // (60 * 75), (frames // 75) % 60, frames % 75])


def _address(lba: int, msf: bool) -> bytes:
    return _msf(lba) if msf else U32.pack(lba)


_WRITE_PROTECTED = S.ScsiError(S.DATA_PROTECT, S.WRITE_PROTECTED)


def write_protected(target, lu, nexus, cdb, data_out):
    raise _WRITE_PROTECTED


def no_op(target, lu, nexus, cdb, data_out):
    return good()


# ---------------------------------------------------------------------------------------------- SPC, MMC flavour
def test_unit_ready(target, lu, nexus, cdb, data_out):
    _ready(lu)
    return good()


def request_sense(target, lu, nexus, cdb, data_out):
    if lu.ua.get(nexus) or lu.present:
        return spc.request_sense(target, lu, nexus, cdb, data_out)
    err = _not_ready(lu)
    data = S.descriptor_sense(err.key, err.asc, err.ascq) if cdb[1] & 0x01 else err.sense()
    return good(data, cdb[4])


def inquiry(target, lu, nexus, cdb, data_out):
    if cdb[1] & 0x02:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 1))
    alloc = U16.unpack_from(cdb, 3)[0]
    if not cdb[1] & 0x01:
        if cdb[2]:
            raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2))
        b = bytearray(spc.standard_inquiry(lu))
        b[0] = 0x05   # CD/DVD device
        b[1] = 0x80   # RMB: removable medium
        U16.pack_into(b, 58 + 2 * 3, MMC5)  # in place of SBC-3
        return good(bytes(b), alloc)
    page = cdb[2]
    if page == 0x00:
        return good(bytes([0x05, 0x00, 0x00, 3, 0x00, 0x80, 0x83]), alloc)
    if page not in (0x80, 0x83):
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2))
    body = bytearray(spc.vpd_page(target, lu, page))
    body[0] = 0x05
    return good(bytes(body), alloc)


def _page_error_recovery(lu, pc):
    return bytes([0x01, 0x0A]) + bytes(10)


def _page_capabilities(lu, pc):
    """MM Capabilities and Mechanical Status (2Ah), as Linux's sr and Windows' cdrom.sys read it."""
    b = bytearray(22)
    b[0], b[1] = 0x2A, 20
    if pc == 1:  # changeable: nothing
        return bytes(b)
    b[2] = 0x08                 # reads DVD-ROM (CD-ROM is implied)
    b[6] = 0x20 | 0x08 | 0x01   # tray loader, eject, lock
    if lu.prevent:
        b[6] |= 0x02            # locked now
    U16.pack_into(b, 8, SPEED_KBS)   # maximum read speed (obsolete field, still read)
    U16.pack_into(b, 12, 2048)       # buffer size, KB
    U16.pack_into(b, 14, SPEED_KBS)  # current read speed
    return bytes(b)


MODE_PAGES = {0x01: _page_error_recovery, 0x2A: _page_capabilities}


def mode_sense(target, lu, nexus, cdb, data_out):
    ten = cdb[0] == 0x5A
    pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    alloc = U16.unpack_from(cdb, 7)[0] if ten else cdb[4]
    if pc == 3:
        raise S.illegal(S.SAVING_PARAMETERS_NOT_SUPPORTED, S.field_pointer(2, 7))
    if subpage not in (0x00, 0xFF):
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(3))
    if page == 0x3F:
        pages = b"".join(MODE_PAGES[p](lu, pc) for p in sorted(MODE_PAGES))
    elif page in MODE_PAGES:
        pages = MODE_PAGES[page](lu, pc)
    else:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2))
    # no block descriptors (MMC); medium type and device-specific bytes 0
    if ten:
        return good(struct.pack(">HxxxxH", 6 + len(pages), 0) + pages, alloc)
    return good(bytes([3 + len(pages), 0, 0, 0]) + pages, alloc)


def mode_select(target, lu, nexus, cdb, data_out):
    ten = cdb[0] == 0x55
    length = U16.unpack_from(cdb, 7)[0] if ten else cdb[4]
    if cdb[1] & 0x01:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 0))
    if not length:
        return good()
    header = 8 if ten else 4
    data = bytes(data_out or b"")[:length]
    if len(data) < length or length < header:
        raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
    descriptors = U16.unpack_from(data, 6)[0] if ten else data[3]
    if length > header + descriptors:  # a page: none of ours has a changeable field
        raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(header + descriptors, None, False))
    return good()


def start_stop_unit(target, lu, nexus, cdb, data_out):
    if cdb[4] & 0xF0:  # a power condition: nothing to do
        return good()
    if cdb[4] & 0x02:  # LOEJ
        if cdb[4] & 0x01:
            lu.load(by=nexus)
        else:
            lu.eject(by=nexus)
    return good()


def prevent_allow(target, lu, nexus, cdb, data_out):
    with lu.lock:
        if cdb[4] & 0x01:
            lu.prevent.add(nexus)
        else:
            lu.prevent.discard(nexus)
    return good()


# ---------------------------------------------------------------------------------------------- reading
def _read(lu, flags, lba, n):
    _ready(lu)
    try:
        return sbc._read(lu, flags & 0x18, lba, n)  # bits 7-5 are reserved in MMC's READ, not RDPROTECT
    except OSError as exc:
        raise S.ScsiError(S.MEDIUM_ERROR, S.UNRECOVERED_READ_ERROR) from exc


def read10(target, lu, nexus, cdb, data_out, _unpack=RW10.unpack_from):
    return _read(lu, *_unpack(cdb))


def read12(target, lu, nexus, cdb, data_out, _unpack=RW12.unpack_from):
    return _read(lu, *_unpack(cdb))


def read_capacity10(target, lu, nexus, cdb, data_out):
    _ready(lu)
    return good(struct.pack(">II", lu.blocks - 1, BLOCK))


def synchronize_cache(target, lu, nexus, cdb, data_out):
    _ready(lu)
    return good()


# ---------------------------------------------------------------------------------------------- MMC
def _feature(code: int, version: int, persistent: bool, current: bool, body: bytes = b"") -> bytes:
    return U16.pack(code) + bytes([(version << 2) | (0x02 if persistent else 0) | (0x01 if current else 0),
                                   len(body)]) + body


def _features(lu) -> list[tuple[int, bytes]]:
    present = lu.present
    profile = lu.profile if present else 0
    cd, dvd = present and profile == PROFILE_CD_ROM, present and profile == PROFILE_DVD_ROM
    profiles = b"".join(U16.pack(p) + bytes([1 if profile == p else 0, 0]) for p in (PROFILE_DVD_ROM, PROFILE_CD_ROM))
    blocking = 16 if dvd else 1
    return [
        (0x0000, _feature(0x0000, 0, True, True, profiles)),                                 # Profile List
        (0x0001, _feature(0x0001, 2, True, True, U32.pack(0) + bytes([0x01, 0, 0, 0]))),     # Core: DBE
        (0x0002, _feature(0x0002, 1, True, True, bytes(4))),                                 # Morphing: polled
        (0x0003, _feature(0x0003, 0, True, True, bytes([0x29, 0, 0, 0]))),                   # Removable: tray
        (0x0010, _feature(0x0010, 0, False, present, U32.pack(BLOCK) + U16.pack(blocking) + bytes([1, 0]))),
        (0x001E, _feature(0x001E, 2, False, cd, bytes(4))),                                  # CD Read
        (0x001F, _feature(0x001F, 0, False, dvd)),                                           # DVD Read
        (0x0100, _feature(0x0100, 0, True, True)),                                           # Power Management
    ]


def get_configuration(target, lu, nexus, cdb, data_out):
    rt = cdb[1] & 0x03
    start = U16.unpack_from(cdb, 2)[0]
    alloc = U16.unpack_from(cdb, 7)[0]
    if rt == 3:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 0))
    out = []
    for code, desc in _features(lu):
        if rt == 2 and code != start or code < start:
            continue
        if rt == 1 and not desc[2] & 0x01:
            continue
        out.append(desc)
    body = b"".join(out)
    profile = lu.profile if lu.present else 0
    return good(U32.pack(4 + len(body)) + bytes(2) + U16.pack(profile) + body, alloc)


def read_toc(target, lu, nexus, cdb, data_out):
    _ready(lu)
    msf = bool(cdb[1] & 0x02)
    fmt = cdb[2] & 0x0F
    if not fmt and cdb[9] >> 6:  # the SFF-8020 place of the format (Linux's sr asks for sessions there)
        fmt = cdb[9] >> 6
    track = cdb[6]
    alloc = U16.unpack_from(cdb, 7)[0]
    leadout = lu.blocks
    if fmt == 0:
        if track > 1 and track != 0xAA:
            raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(6))
        entries = []
        if track <= 1:
            entries.append(bytes([0, 0x14, 1, 0]) + _address(0, msf))
        entries.append(bytes([0, 0x14, 0xAA, 0]) + _address(leadout, msf))
        body = bytes([1, 1]) + b"".join(entries)
    elif fmt == 1:  # session information: one session, its first track at LBA 0
        body = bytes([1, 1]) + bytes([0, 0x14, 1, 0]) + _address(0, msf)
    elif fmt == 2:  # full TOC: the A0/A1/A2 points and track 1, addresses always MSF
        def point(p, pmsf):
            return bytes([1, 0x14, 0, p, 0, 0, 0, 0]) + pmsf

        body = bytes([1, 1]) + b"".join((
            point(0xA0, bytes([1, 0x00, 0])),   # first track 1; disc type CD-ROM
            point(0xA1, bytes([1, 0, 0])),      # last track 1
            point(0xA2, _msf(leadout)[1:]),     # lead-out
            point(0x01, _msf(0)[1:]),           # track 1
        ))
    else:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2))
    return good(U16.pack(len(body)) + body, alloc)


def read_disc_information(target, lu, nexus, cdb, data_out):
    if cdb[1] & 0x07:  # only the standard disc information
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 0))
    _ready(lu)
    alloc = U16.unpack_from(cdb, 7)[0]
    b = bytearray(34)
    U16.pack_into(b, 0, 32)
    b[2] = 0x0E          # last session complete, disc complete (finalized), not erasable
    b[3] = 1             # first track
    b[4] = b[5] = b[6] = 1  # sessions; first and last track of the last session
    b[7] = 0x20          # URU: unrestricted use
    b[16:24] = b"\xff" * 8  # no next session: lead-in and last lead-out addresses unused
    return good(bytes(b), alloc)


def read_track_information(target, lu, nexus, cdb, data_out):
    _ready(lu)
    kind = cdb[1] & 0x03
    number = U32.unpack_from(cdb, 2)[0]
    alloc = U16.unpack_from(cdb, 7)[0]
    if kind == 0 and number >= lu.blocks or kind in (1, 2) and number != 1 or kind == 3:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2))
    b = bytearray(36)
    U16.pack_into(b, 0, 34)
    b[2], b[3] = 1, 1            # track 1, session 1
    b[5] = 0x04                  # data track, uninterrupted
    b[6] = 0x01                  # data mode 1
    U32.pack_into(b, 24, lu.blocks)       # track size
    U32.pack_into(b, 28, lu.blocks - 1)   # last recorded address
    return good(bytes(b), alloc)


def get_event_status(target, lu, nexus, cdb, data_out):
    if not cdb[1] & 0x01:  # asynchronous notification is not supported: polled only
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 0))
    classes = cdb[4]
    alloc = U16.unpack_from(cdb, 7)[0]
    if not classes & 0x10:
        return good(bytes([0, 2, 0x80, 0x10]), alloc)  # NEA: no event of a class asked for; media supported
    code = lu.take_media_event(nexus) if alloc >= 8 else EVENT_NONE  # keep the event for a read that sees it
    status = (0x02 if lu.present else 0) | (0x01 if lu.tray_open else 0)
    return good(bytes([0, 6, 0x04, 0x10, code, status, 0, 0]), alloc)


def read_dvd_structure(target, lu, nexus, cdb, data_out):
    fmt = cdb[7]
    alloc = U16.unpack_from(cdb, 8)[0]
    if fmt == 0xFF:  # the list of formats this drive returns
        body = b"".join(bytes([f, 0x40]) + U16.pack(n) for f, n in ((0x00, 2052), (0x01, 8), (0xFF, 16)))
        return good(U16.pack(len(body) + 2) + bytes(2) + body, alloc)
    _ready(lu)
    if lu.profile != PROFILE_DVD_ROM:
        raise S.ScsiError(S.ILLEGAL_REQUEST, S.INCOMPATIBLE_MEDIUM)
    if fmt == 0x00:  # physical format: DVD-ROM, single layer, 120 mm, data from 30000h to the end
        b = bytearray(2048)
        b[0] = 0x01                      # book type DVD-ROM, part version 1
        b[1] = 0x02                      # 120 mm, maximum rate 10.08 Mb/s
        b[2] = 0x01                      # one layer, embossed
        U32.pack_into(b, 4, 0x30000)
        U32.pack_into(b, 8, 0x30000 + lu.blocks - 1)
        body = bytes(b)
    elif fmt == 0x01:  # copyright: no protection, every region
        body = bytes(4)
    else:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(7))
    return good(U16.pack(len(body) + 2) + bytes(2) + body, alloc)


# ---------------------------------------------------------------------------------------------- the table
MMC_COMMANDS = {
    0x00: test_unit_ready,
    0x03: request_sense,
    0x12: inquiry,
    0x15: mode_select,
    0x1A: mode_sense,
    0x1B: start_stop_unit,
    0x1E: prevent_allow,
    0x25: read_capacity10,
    0x28: read10,
    0x35: synchronize_cache,
    0x43: read_toc,
    0x46: get_configuration,
    0x4A: get_event_status,
    0x51: read_disc_information,
    0x52: read_track_information,
    0x55: mode_select,
    0x5A: mode_sense,
    0xA8: read12,
    0xAD: read_dvd_structure,
    0xB6: no_op,  # SET STREAMING: one speed
    0xBB: no_op,  # SET CD SPEED: one speed
}
SHARED_WITH_DISKS = (0x16, 0x17, 0x56, 0x57, 0x5E, 0x5F, 0xA0)  # reservations, REPORT LUNS
WRITES = (0x04, 0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x41, 0x93, 0x42, 0x89, 0x8B,
          0x53, 0x54, 0x5B, 0x5D, 0xA1)  # + FORMAT UNIT, RESERVE/CLOSE TRACK, SEND OPC/CUE SHEET, BLANK

_table = [T.HANDLERS[0x01]] * 256  # opcode 0x01 has no handler: INVALID COMMAND OPERATION CODE
for _op in SHARED_WITH_DISKS:
    _table[_op] = T.HANDLERS[_op]
for _op in WRITES:
    _table[_op] = write_protected
for _op, _handler in MMC_COMMANDS.items():
    _table[_op] = _handler
CdromUnit.handlers = tuple(_table)
del _table
