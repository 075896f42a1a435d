"""Primary commands (SPC-4) for a disk: INQUIRY and its VPD pages, REPORT LUNS, TEST UNIT READY,
REQUEST SENSE, MODE SENSE/SELECT (6/10), START STOP UNIT, PREVENT ALLOW, RESERVE/RELEASE, PERSISTENT
RESERVE IN/OUT, REPORT SUPPORTED OPERATION CODES.

Every handler is `handler(target, lu, nexus, cdb, data_out) -> ScsiResponse` and raises ScsiError or
ReservationConflict to fail.
"""

from __future__ import annotations

import struct

from services.iscsi_target.scsi import sense as S
from services.iscsi_target.scsi.cdb import U16, U32
from services.iscsi_target.scsi.response import good

VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)  # SAM-5, iSCSI, SPC-4, SBC-3
VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
MAX_TRANSFER_BYTES = 32 << 20          # per command (UEFI reads 8 MiB at a time)
MAX_WRITE_SAME_BYTES = 1 << 30
MAX_UNMAP_BLOCKS = 1 << 20
MAX_UNMAP_DESCRIPTORS = 256
MAX_CAW_BLOCKS = 128
RELATIVE_PORT = 1


def _ascii(text: str, size: int) -> bytes:
    raw = text.encode("ascii", "replace")[:size]
    return raw.ljust(size, b" ")


def _alloc6(cdb) -> int:
    return cdb[4]


def _alloc10(cdb) -> int:
    return U16.unpack_from(cdb, 7)[0]


# ---------------------------------------------------------------------------------------------- INQUIRY
def standard_inquiry(lu) -> bytes:
    b = bytearray(96)
    b[0] = 0x00 if lu is not None else 0x7F  # direct access block device; 0x7F: no LU at this LUN
    b[2] = 0x06          # SPC-4
    b[3] = 0x12          # HISUP, response data format 2
    b[4] = len(b) - 5
    b[7] = 0x02          # CMDQUE
    if lu is None:
        b[8:36] = b"BOOTFLT " + b"NO LUN".ljust(16) + b"0001"
        return bytes(b)
    b[8:16] = _ascii(lu.vendor, 8)
    b[16:32] = _ascii(lu.product, 16)
    b[32:36] = _ascii(lu.revision, 4)
    for i, desc in enumerate(VERSION_DESCRIPTORS):
        U16.pack_into(b, 58 + 2 * i, desc)
    return bytes(b)


def _designator(code_set: int, kind: int, association: int, value: bytes, piv_iscsi: bool = False) -> bytes:
    first = code_set | (0x50 if piv_iscsi else 0)   # protocol identifier 5 = iSCSI when PIV is set
    second = (0x80 if piv_iscsi else 0) | (association << 4) | kind
    return bytes([first, second, 0, len(value)]) + value


def _name_string(name: str) -> bytes:
    raw = name.encode() + b"\0"
    return raw + b"\0" * (-len(raw) % 4)


def vpd_page(target, lu, page: int) -> bytes:
    if page == 0x00:
        body = bytes(VPD_PAGES)
    elif page == 0x80:
        body = lu.serial.encode("ascii")
    elif page == 0x83:
        tport = f"{target.name},t,0x{RELATIVE_PORT:04x}"
        body = b"".join((
            _designator(1, 3, 0, lu.naa),                                      # NAA, the LU
            _designator(2, 1, 0, _ascii(lu.vendor, 8) + lu.serial.encode()),   # T10 vendor ID, the LU
            _designator(1, 4, 1, struct.pack(">HH", 0, RELATIVE_PORT), True),  # relative target port
            _designator(3, 8, 1, _name_string(tport), True),                   # target port name
            _designator(3, 8, 2, _name_string(target.name), True),             # target device name
        ))
    elif page == 0xB0:
        bs = lu.block_size
        body = bytearray(0x3C)
        body[1] = MAX_CAW_BLOCKS                                     # MAXIMUM COMPARE AND WRITE LENGTH
        U16.pack_into(body, 2, 1 << lu.physical_exponent)           # OPTIMAL TRANSFER LENGTH GRANULARITY
        U32.pack_into(body, 4, MAX_TRANSFER_BYTES // bs)             # MAXIMUM TRANSFER LENGTH
        U32.pack_into(body, 8, (1 << 20) // bs)                      # OPTIMAL TRANSFER LENGTH
        U32.pack_into(body, 12, MAX_TRANSFER_BYTES // bs)            # MAXIMUM PREFETCH LENGTH
        U32.pack_into(body, 16, MAX_UNMAP_BLOCKS)                    # MAXIMUM UNMAP LBA COUNT
        U32.pack_into(body, 20, MAX_UNMAP_DESCRIPTORS)               # MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
        # OPTIMAL UNMAP GRANULARITY: an overlay's granule, so an initiator's TRIMs free whole granules
        U32.pack_into(body, 24, max(1, getattr(lu.store, "granule", bs) // bs) if getattr(lu.store, "thin", False) else 1)
        struct.pack_into(">Q", body, 32, MAX_WRITE_SAME_BYTES // bs)  # MAXIMUM WRITE SAME LENGTH
        body = bytes(body)
    elif page == 0xB1:
        body = bytearray(0x3C)
        U16.pack_into(body, 0, 1)  # non-rotating medium
        body = bytes(body)
    elif page == 0xB2:
        # LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read as zeros); thin provisioned
        body = bytes([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])
    else:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2))
    return bytes([0, page]) + U16.pack(len(body)) + body


def inquiry(target, lu, nexus, cdb, data_out):
    evpd = cdb[1] & 0x01
    if cdb[1] & 0x02:  # CMDDT (obsolete)
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 1))
    alloc = U16.unpack_from(cdb, 3)[0]
    if not evpd:
        if cdb[2]:
            raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2))
        return good(standard_inquiry(lu), alloc)
    if lu is None:
        raise S.illegal(S.LUN_NOT_SUPPORTED)
    return good(vpd_page(target, lu, cdb[2]), alloc)


# ---------------------------------------------------------------------------------------------- REPORT LUNS
def report_luns(target, lu, nexus, cdb, data_out):
    select = cdb[2]
    alloc = U32.unpack_from(cdb, 6)[0]
    if select not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2))
    if alloc < 4:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(6))
    if select in (0x01, 0x10, 0x12):  # only well-known LUNs / administrative: we have none
        ids = []
    else:
        ids = sorted(target.luns)
    body = b"".join(_lun_field(i) for i in ids)
    return good(U32.pack(len(body)) + bytes(4) + body, alloc)


def _lun_field(lun: int) -> bytes:
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)  # flat space addressing


# ---------------------------------------------------------------------------------------------- TUR, REQUEST SENSE
def test_unit_ready(target, lu, nexus, cdb, data_out):
    return good()


def request_sense(target, lu, nexus, cdb, data_out):
    desc = cdb[1] & 0x01
    alloc = _alloc6(cdb)
    if lu is None:
        key, code = S.ILLEGAL_REQUEST, S.LUN_NOT_SUPPORTED
    else:
        pending = lu.take_ua(nexus)
        key, code = (S.UNIT_ATTENTION, pending) if pending else (S.NO_SENSE, (0, 0))
    if desc:
        data = S.descriptor_sense(key, *code)
    else:
        data = S.fixed_sense(key, *code)
    return good(data, alloc)


# ---------------------------------------------------------------------------------------------- MODE SENSE/SELECT
_PC_CURRENT, _PC_CHANGEABLE, _PC_DEFAULT, _PC_SAVED = 0, 1, 2, 3


def _page_rw_recovery(lu, pc):
    return bytes([0x01, 0x0A]) + bytes(10)


def _page_caching(lu, pc):
    b = bytearray(20)
    b[0], b[1] = 0x08, 0x12
    if pc == _PC_CHANGEABLE:
        b[2] = 0x04  # WCE
    elif pc == _PC_DEFAULT:
        b[2] = 0x04 if not getattr(lu.store, "write_through", False) else 0
    else:
        b[2] = 0x04 if lu.wce else 0
    return bytes(b)


def _page_control(lu, pc):
    b = bytearray(12)
    b[0], b[1] = 0x0A, 0x0A
    if pc == _PC_CHANGEABLE:
        b[4] = 0x08  # SWP
        return bytes(b)
    b[3] = 0x10      # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    if pc == _PC_CURRENT and lu.swp:
        b[4] = 0x08
    b[5] = 0x40      # TAS: aborted tasks of other nexuses end with TASK ABORTED
    U16.pack_into(b, 8, 0xFFFF)  # BUSY TIMEOUT PERIOD: unlimited
    return bytes(b)


def _page_informational_exceptions(lu, pc):
    b = bytearray(12)
    b[0], b[1] = 0x1C, 0x0A
    if pc != _PC_CHANGEABLE:
        b[2] = 0x08  # DEXCPT: no informational exception reporting
    return bytes(b)


MODE_PAGES = {0x01: _page_rw_recovery, 0x08: _page_caching, 0x0A: _page_control, 0x1C: _page_informational_exceptions}


def _mode_pages(lu, page: int, subpage: int, pc: int) -> bytes:
    if page == 0x3F:
        if subpage not in (0x00, 0xFF):
            raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(3))
        return b"".join(MODE_PAGES[p](lu, pc) for p in sorted(MODE_PAGES))
    build = MODE_PAGES.get(page)
    if build is None or subpage not in (0x00, 0xFF):
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2 if build is None else 3))
    return build(lu, pc)


def _device_specific(lu) -> int:
    return (0x80 if lu.write_protected else 0) | 0x10  # WP, DPOFUA


def mode_sense(target, lu, nexus, cdb, data_out):
    ten = cdb[0] == 0x5A
    dbd = cdb[1] & 0x08
    llbaa = ten and cdb[1] & 0x10
    pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    alloc = _alloc10(cdb) if ten else _alloc6(cdb)
    if pc == _PC_SAVED:
        raise S.illegal(S.SAVING_PARAMETERS_NOT_SUPPORTED, S.field_pointer(2, 7))
    pages = _mode_pages(lu, page, subpage, pc)
    blocks, bs = lu.blocks, lu.block_size
    if dbd:
        desc = b""
    elif llbaa:
        desc = struct.pack(">Q4xI", blocks, bs)
    else:
        desc = struct.pack(">IxBH", min(blocks, 0xFFFFFFFF), bs >> 16, bs & 0xFFFF)
    if ten:
        total = 8 + len(desc) + len(pages)
        head = struct.pack(">HBBBxH", total - 2, 0, _device_specific(lu), 1 if llbaa else 0, len(desc))
    else:
        total = 4 + len(desc) + len(pages)
        if total > 256:
            raise S.illegal(S.INVALID_FIELD_IN_CDB)
        head = bytes([total - 1, 0, _device_specific(lu), len(desc)])
    return good(head + desc + pages, alloc)


def mode_select(target, lu, nexus, cdb, data_out):
    ten = cdb[0] == 0x55
    if cdb[1] & 0x01:  # SP: we keep no saved pages
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 0))
    if not cdb[1] & 0x10:  # PF: only the page format is understood
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 4))
    length = _alloc10(cdb) if ten else _alloc6(cdb)
    if not length:
        return good()
    data = bytes(data_out or b"")
    if len(data) < length:
        raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
    data = data[:length]
    hlen = 8 if ten else 4
    if len(data) < hlen:
        raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
    bdlen = U16.unpack_from(data, 6)[0] if ten else data[3]
    pos = hlen
    if bdlen:
        if pos + bdlen > len(data):
            raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
        long_lba = ten and data[4] & 1
        size = 16 if long_lba else 8
        if bdlen % size:
            raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(6 if ten else 3, None, False))
        for off in range(pos, pos + bdlen, size):
            bs = U32.unpack_from(data, off + 12)[0] if long_lba else int.from_bytes(data[off + 5:off + 8], "big")
            if bs != lu.block_size:
                raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(off + 5, None, False))
        pos += bdlen
    changes = []
    while pos < len(data):
        if pos + 2 > len(data):
            raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
        code = data[pos] & 0x3F
        if data[pos] & 0x40:  # SPF: subpages; we have none
            raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(pos, 6, False))
        build = MODE_PAGES.get(code)
        if build is None:
            raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(pos, None, False))
        plen = data[pos + 1] + 2
        page = data[pos:pos + plen]
        current = build(lu, _PC_CURRENT)
        mask = build(lu, _PC_CHANGEABLE)
        if len(page) != plen or plen != len(current):
            raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR if len(page) != plen else S.INVALID_FIELD_IN_PARAMETER_LIST,
                            None if len(page) != plen else S.field_pointer(pos + 1, None, False))
        for i in range(2, plen):
            if (page[i] ^ current[i]) & ~mask[i] & 0xFF:
                raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(pos + i, None, False))
        changes.append((code, page))
        pos += plen
    changed = False
    with lu.lock:
        for code, page in changes:
            if code == 0x08 and bool(page[2] & 0x04) != lu.wce:
                lu.set_wce(bool(page[2] & 0x04))
                changed = True
            elif code == 0x0A and bool(page[4] & 0x08) != lu.swp:
                lu.swp = bool(page[4] & 0x08)
                changed = True
    if changed:
        lu.add_ua_all(S.MODE_PARAMETERS_CHANGED, except_nexus=nexus)
    return good()


# ---------------------------------------------------------------------------------------------- START STOP, PREVENT
def start_stop_unit(target, lu, nexus, cdb, data_out):
    # A virtual disk is always spinning: STOP is accepted and ignored, so an OS that stops the disk at
    # shutdown does not leave it NOT READY for the next boot (iPXE never sends START).
    if cdb[4] & 0x02 and not cdb[4] & 0x01:  # LOEJ without START: eject; a fixed disk has nothing to eject
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(4, 1))
    return good()


def prevent_allow(target, lu, nexus, cdb, data_out):
    return good()  # the medium is not removable: nothing to lock


# ---------------------------------------------------------------------------------------------- reservations
def reserve(target, lu, nexus, cdb, data_out):
    if cdb[0] == 0x56 and cdb[1] & 0x02:  # RESERVE(10) 3RDPTY: not supported
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 1))
    lu.res.reserve6(nexus)
    return good()


def release(target, lu, nexus, cdb, data_out):
    if cdb[0] == 0x57 and cdb[1] & 0x02:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 1))
    lu.res.release6(nexus)
    return good()


def persistent_reserve_in(target, lu, nexus, cdb, data_out):
    action = cdb[1] & 0x1F
    alloc = _alloc10(cdb)
    return good(lu.res.pr_in(nexus, action), alloc)


def persistent_reserve_out(target, lu, nexus, cdb, data_out):
    action = cdb[1] & 0x1F
    scope, rtype = cdb[2] >> 4, cdb[2] & 0x0F
    length = U32.unpack_from(cdb, 5)[0]
    if action > 8:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 4))
    params = bytes(data_out[:length]) if data_out is not None else b""
    if len(params) < length:
        raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
    lu.res.pr_out(nexus, action, scope, rtype, params)
    return good()
