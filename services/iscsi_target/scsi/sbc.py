"""Block commands (SBC-3): READ/WRITE 6/10/12/16, VERIFY, WRITE AND VERIFY, READ CAPACITY 10/16, GET LBA
STATUS, SYNCHRONIZE CACHE, PRE-FETCH, WRITE SAME (with UNMAP), UNMAP, COMPARE AND WRITE, ORWRITE.

READ and WRITE are the hot path: one struct unpack, two comparisons, one slice of the mmap (reads) or
one pwrite (writes). A write is durable at its response when FUA is set or the unit is write-through
(WCE=0 in the caching page); otherwise at the next SYNCHRONIZE CACHE.
"""

from __future__ import annotations

import struct

from services.iscsi_target.scsi import sense as S
from services.iscsi_target.scsi.cdb import CAW, RW10, RW12, RW16, U16, U32, U64, rw6_fields
from services.iscsi_target.scsi.response import ScsiResponse, good
from services.iscsi_target.scsi.spc import MAX_CAW_BLOCKS, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BYTES

GOOD = ScsiResponse(0, None, [])
_LBA_RANGE = S.ScsiError(S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
_PROTECT = S.ScsiError(S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB, sks=S.field_pointer(1, 7))
_WRITE_PROTECTED = S.ScsiError(S.DATA_PROTECT, S.WRITE_PROTECTED)
_SOFT_PROTECTED = S.ScsiError(S.DATA_PROTECT, S.SOFTWARE_WRITE_PROTECTED)
COMPARE_CHUNK = 4096


def _write_protect(lu):
    return _WRITE_PROTECTED if lu.readonly else _SOFT_PROTECTED


def _fields(cdb):
    op = cdb[0]
    if op in (0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35, 0x41):
        return RW10.unpack_from(cdb)
    if op in (0xA8, 0xAA, 0xAE, 0xAF):
        return RW12.unpack_from(cdb)
    if op in (0x08, 0x0A):
        return rw6_fields(cdb)
    return RW16.unpack_from(cdb)


# ---------------------------------------------------------------------------------------------- READ
def _read(lu, flags, lba, n):
    if flags & 0xE0:  # RDPROTECT: no protection information
        raise _PROTECT
    if lba + n > lu.blocks:
        raise _LBA_RANGE
    if not n:
        return GOOD
    bs = lu.block_size
    return ScsiResponse(0, None, [lu.store.read(lba * bs, n * bs)])


def read10(target, lu, nexus, cdb, data_out, _unpack=RW10.unpack_from):
    return _read(lu, *_unpack(cdb))


def read16(target, lu, nexus, cdb, data_out, _unpack=RW16.unpack_from):
    return _read(lu, *_unpack(cdb))


def read_any(target, lu, nexus, cdb, data_out):
    """READ(6) and READ(12)."""
    return _read(lu, *_fields(cdb))


# ---------------------------------------------------------------------------------------------- WRITE
def _check_write(lu, flags, lba, n, data_out) -> bool:
    """The checks every WRITE-like command makes, in SBC's order; False when there is nothing to write."""
    if flags & 0xE0:  # WRPROTECT
        raise _PROTECT
    if lba + n > lu.blocks:
        raise _LBA_RANGE
    if lu.readonly or lu.swp:
        raise _write_protect(lu)
    if not n:
        return False
    if data_out is None or len(data_out) != n * lu.block_size:
        raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
    return True


def _write(lu, flags, lba, n, data_out):
    if not _check_write(lu, flags, lba, n, data_out):
        return GOOD
    bs = lu.block_size
    store = lu.store
    store.write(lba * bs, data_out)
    if flags & 0x08 and not store.write_through:  # FUA
        store.sync()
    return GOOD


def write10(target, lu, nexus, cdb, data_out, _unpack=RW10.unpack_from):
    flags, lba, n = _unpack(cdb)
    return _write(lu, flags, lba, n, data_out)


def write16(target, lu, nexus, cdb, data_out, _unpack=RW16.unpack_from):
    flags, lba, n = _unpack(cdb)
    return _write(lu, flags, lba, n, data_out)


def write_any(target, lu, nexus, cdb, data_out):
    """WRITE(6) and WRITE(12)."""
    flags, lba, n = _fields(cdb)
    return _write(lu, flags, lba, n, data_out)


def write_and_verify(target, lu, nexus, cdb, data_out):
    flags, lba, n = _fields(cdb)
    if flags & 0x06 == 0x04:  # BYTCHK 10b: reserved
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 2))
    resp = _write(lu, flags & ~0x08, lba, n, data_out)
    if n:
        lu.store.sync()  # verification of the medium: the data is on it
    return resp


# ---------------------------------------------------------------------------------------------- VERIFY, COMPARE
def first_difference(a, b) -> int:
    """Offset of the first byte where a and b differ (they do differ)."""
    a, b = memoryview(a), memoryview(b)
    for off in range(0, len(a), COMPARE_CHUNK):
        if a[off:off + COMPARE_CHUNK] != b[off:off + COMPARE_CHUNK]:
            x, y = bytes(a[off:off + COMPARE_CHUNK]), bytes(b[off:off + COMPARE_CHUNK])
            for i in range(len(x)):
                if x[i] != y[i]:
                    return off + i
    return len(a)


def verify(target, lu, nexus, cdb, data_out):
    flags, lba, n = _fields(cdb)
    if flags & 0xE0:  # VRPROTECT
        raise _PROTECT
    bytchk = (flags >> 1) & 0x03
    if bytchk == 2:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 2))
    if lba + n > lu.blocks:
        raise _LBA_RANGE
    if not n or not bytchk:
        return GOOD
    bs = lu.block_size
    if data_out is None or len(data_out) != (n * bs if bytchk == 1 else bs):
        raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
    medium = lu.store.read(lba * bs, n * bs)
    expected = data_out if bytchk == 1 else bytes(data_out) * n
    if medium != memoryview(expected):
        raise S.ScsiError(S.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, info=first_difference(medium, expected))
    return GOOD


def compare_and_write(target, lu, nexus, cdb, data_out):
    flags, lba, n = CAW.unpack_from(cdb)
    if flags & 0xE0:
        raise _PROTECT
    if n > MAX_CAW_BLOCKS or not n:
        # NLB 0 is refused too: an initiator asking for 256 blocks wraps the 8-bit field to 0 and sends
        # 512 blocks of data; doing nothing would report success for a compare that never happened.
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(13))
    if lba + n > lu.blocks:
        raise _LBA_RANGE
    if lu.readonly or lu.swp:
        raise _write_protect(lu)
    bs = lu.block_size
    size = n * bs
    if data_out is None or len(data_out) != 2 * size:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(13))
    data = memoryview(data_out)
    compare, new = data[:size], data[size:]
    store = lu.store
    with lu.lock:  # atomic against other COMPARE AND WRITEs (VMware's ATS heartbeat)
        current = store.read(lba * bs, size)
        if current != compare:
            raise S.ScsiError(S.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, info=first_difference(current, compare))
        store.write(lba * bs, new)
    if flags & 0x08 and not store.write_through:
        store.sync()
    return GOOD


def orwrite(target, lu, nexus, cdb, data_out):
    flags, lba, n = RW16.unpack_from(cdb)
    if not _check_write(lu, flags, lba, n, data_out):
        return GOOD
    bs = lu.block_size
    store = lu.store
    with lu.lock:
        current = int.from_bytes(store.read(lba * bs, n * bs), "big")
        merged = (current | int.from_bytes(data_out, "big")).to_bytes(n * bs, "big")
        store.write(lba * bs, merged)
    if flags & 0x08 and not store.write_through:
        store.sync()
    return GOOD


# ---------------------------------------------------------------------------------------------- capacity, status
def read_capacity10(target, lu, nexus, cdb, data_out):
    if cdb[8] & 0x01 or U32.unpack_from(cdb, 2)[0]:  # PMI / LBA: obsolete, must be zero
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(2))
    last = lu.blocks - 1
    return good(struct.pack(">II", min(last, 0xFFFFFFFF), lu.block_size))


def read_capacity16(target, lu, nexus, cdb, data_out):
    alloc = U32.unpack_from(cdb, 10)[0]
    b = bytearray(32)
    struct.pack_into(">QI", b, 0, lu.blocks - 1, lu.block_size)
    # byte 13: logical blocks per physical block (exponent); byte 14: LBPME (UNMAP works), LBPRZ (unmapped reads 0)
    b[13] = lu.physical_exponent
    b[14] = 0x80 | 0x40
    return good(bytes(b), alloc)


def get_lba_status(target, lu, nexus, cdb, data_out):
    lba = U64.unpack_from(cdb, 2)[0]
    alloc = U32.unpack_from(cdb, 10)[0]
    if lba >= lu.blocks:
        raise _LBA_RANGE
    bs = lu.block_size
    store = lu.store
    descriptors = []
    room = max(1, (min(alloc, 4096) - 8) // 16)
    offset = lba * bs
    end = lu.blocks * bs
    while offset < end and len(descriptors) < room:
        mapped, run = store.mapped(offset)
        run = max(run, bs)
        count = min(-(-run // bs), (end - offset) // bs, 0xFFFFFFFF)
        descriptors.append(struct.pack(">QIB3x", offset // bs, count, 0 if mapped else 1))
        offset += count * bs
    body = b"".join(descriptors)
    return good(U32.pack(len(body) + 4) + bytes(4) + body, alloc)


def service_action_in_16(target, lu, nexus, cdb, data_out):
    action = cdb[1] & 0x1F
    if action == 0x10:
        return read_capacity16(target, lu, nexus, cdb, data_out)
    if action == 0x12:
        return get_lba_status(target, lu, nexus, cdb, data_out)
    raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 4))


def read_defect_data(target, lu, nexus, cdb, data_out):
    """A virtual medium has no defects: an empty list in the format asked for."""
    flags = cdb[2 if cdb[0] == 0x37 else 1] & 0x1F  # REQ_PLIST, REQ_GLIST, list format
    if cdb[0] == 0x37:
        return good(bytes([0, flags, 0, 0]), U16.unpack_from(cdb, 7)[0])
    return good(bytes([0, flags, 0, 0, 0, 0, 0, 0]), U32.unpack_from(cdb, 6)[0])


# ---------------------------------------------------------------------------------------------- cache
def synchronize_cache(target, lu, nexus, cdb, data_out):
    flags, lba, n = _fields(cdb)
    if lba + n > lu.blocks:
        raise _LBA_RANGE
    lu.store.sync()
    return GOOD


def prefetch(target, lu, nexus, cdb, data_out):
    flags, lba, n = _fields(cdb)
    if lba + n > lu.blocks:
        raise _LBA_RANGE
    return GOOD  # the image is mapped and prefaulted: nothing to fetch


# ---------------------------------------------------------------------------------------------- thin provisioning
def _deallocate(lu, lba: int, n: int) -> None:
    bs = lu.block_size
    lu.store.unmap(lba * bs, n * bs)


def write_same(target, lu, nexus, cdb, data_out):
    sixteen = cdb[0] == 0x93
    flags, lba, n = (RW16 if sixteen else RW10).unpack_from(cdb)
    if flags & 0xE0:
        raise _PROTECT
    if flags & 0x10:  # ANCHOR: anchored blocks are not supported (ANC_SUP = 0)
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 4))
    ndob = sixteen and flags & 0x01
    unmap = flags & 0x08
    bs = lu.block_size
    if lba >= lu.blocks or lba + n > lu.blocks:
        raise _LBA_RANGE
    if not n:
        n = lu.blocks - lba  # to the end of the medium
    if n * bs > MAX_WRITE_SAME_BYTES:
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(7 if not sixteen else 10))
    if lu.readonly or lu.swp:
        raise _write_protect(lu)
    if not n:
        return GOOD
    if ndob:
        pattern = bytes(bs)
    else:
        if data_out is None or len(data_out) != bs:
            raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
        pattern = bytes(data_out)
    if unmap:
        # UNMAP set: deallocate whatever the pattern (as LIO does; libiscsi checks that the blocks then
        # read as zeros, which LBPRZ promises)
        _deallocate(lu, lba, n)
        return GOOD
    store = lu.store
    per = max(1, (1 << 20) // bs)
    chunk = pattern * min(per, n)
    done = 0
    while done < n:
        k = min(per, n - done)
        store.write((lba + done) * bs, memoryview(chunk)[:k * bs])
        done += k
    return GOOD


_UNMAP_DESC = struct.Struct(">QI4x")


def unmap(target, lu, nexus, cdb, data_out):
    if cdb[1] & 0x01:  # ANCHOR
        raise S.illegal(S.INVALID_FIELD_IN_CDB, S.field_pointer(1, 0))
    if lu.readonly or lu.swp:
        raise _write_protect(lu)
    length = U16.unpack_from(cdb, 7)[0]
    if not length:
        return GOOD
    if length < 8:
        raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
    data = bytes(data_out[:length]) if data_out is not None else b""
    if len(data) < length:
        raise S.illegal(S.PARAMETER_LIST_LENGTH_ERROR)
    bd_len = U16.unpack_from(data, 2)[0]
    bd_len = min(bd_len, len(data) - 8) // 16 * 16
    if bd_len // 16 > MAX_UNMAP_DESCRIPTORS:
        raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(2, None, False))
    ranges = []
    for off in range(8, 8 + bd_len, 16):
        lba, n = _UNMAP_DESC.unpack_from(data, off)
        if lba + n > lu.blocks:
            raise _LBA_RANGE
        if n > MAX_UNMAP_BLOCKS:
            raise S.illegal(S.INVALID_FIELD_IN_PARAMETER_LIST, S.field_pointer(off + 8, None, False))
        if n:
            ranges.append((lba, n))
    for lba, n in ranges:
        _deallocate(lu, lba, n)
    return GOOD
