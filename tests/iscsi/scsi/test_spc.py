"""Primary commands, bytes in, bytes out: INQUIRY and VPD, REPORT LUNS, TUR, REQUEST SENSE, MODE SENSE and
SELECT, REPORT SUPPORTED OPERATION CODES, unknown opcodes, unit attentions."""

from __future__ import annotations

import struct

from services.iscsi_target.scsi import LogicalUnit, RamBackstore, ScsiTarget

from .helpers import (ready_target, MiB, TARGET, cdb16, data, inquiry, key_asc, make_target, mode_select6, mode_sense6,
                      mode_sense10, nexus, ready, tur, write10)


def test_first_command_of_a_nexus_reports_power_on_then_good():
    t = make_target()
    nx = nexus()
    r = t.execute(nx, 0, tur(), None)
    assert r.status == 2 and key_asc(r) == (6, 0x29, 0x00)
    assert t.execute(nx, 0, tur(), None).status == 0


def test_inquiry_does_not_consume_the_unit_attention():
    t = make_target()
    nx = nexus()
    assert t.execute(nx, 0, inquiry(), None).status == 0
    assert key_asc(t.execute(nx, 0, tur(), None)) == (6, 0x29, 0x00)


def test_standard_inquiry_fields():
    t = make_target()
    d = data(t.execute(nexus(), 0, inquiry(alloc=260), None))
    assert d[0] == 0x00 and d[2] == 0x06 and d[3] & 0x0F == 2 and d[7] & 0x02
    assert d[4] == len(d) - 5
    assert d[8:16] == b"BOOTFLT " and all(0x20 <= c <= 0x7E for c in d[8:36])
    descriptors = struct.unpack_from(">8H", d, 58)
    assert 0x0460 in descriptors and 0x04C0 in descriptors  # SPC-4, SBC-3


def test_inquiry_is_cut_to_the_allocation_length():
    t = make_target()
    assert len(data(t.execute(nexus(), 0, inquiry(alloc=5), None))) == 5


def test_inquiry_page_code_without_evpd_is_invalid():
    r = make_target().execute(nexus(), 0, inquiry(evpd=0, page=0x80), None)
    assert r.status == 2 and key_asc(r) == (5, 0x24, 0x00)


def test_inquiry_unknown_vpd_page_is_invalid():
    assert key_asc(make_target().execute(nexus(), 0, inquiry(evpd=1, page=0x99), None)) == (5, 0x24, 0x00)


def test_supported_vpd_pages_are_sorted_and_all_answer():
    t = make_target()
    d = data(t.execute(nexus(), 0, inquiry(1, 0x00), None))
    pages = list(d[4:4 + d[3]])
    assert pages == sorted(pages) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    for page in pages:
        body = data(t.execute(nexus(), 0, inquiry(1, page), None))
        assert body[1] == page and struct.unpack_from(">H", body, 2)[0] == len(body) - 4


def _naa(t, lun=0):
    d = data(t.execute(nexus(), lun, inquiry(1, 0x83), None))
    pos = 4
    while pos < len(d):
        kind, length = d[pos + 1] & 0x0F, d[pos + 3]
        if kind == 3 and (d[pos + 1] >> 4) & 3 == 0:
            return d[pos + 4:pos + 4 + length]
        pos += 4 + length
    raise AssertionError("no NAA designator")


def test_naa_and_serial_are_unique_per_lun_and_target_and_stable():
    a = make_target(RamBackstore(MiB), RamBackstore(MiB))
    b = make_target(RamBackstore(MiB), name=TARGET + "b")
    ids = {_naa(a, 0), _naa(a, 1), _naa(b, 0)}
    assert len(ids) == 3 and all(len(i) == 8 and i[0] >> 4 == 3 for i in ids)
    assert _naa(make_target(RamBackstore(MiB)), 0) == _naa(a, 0)  # same target and LUN: same id after restart
    serials = {data(t.execute(nexus(), lun, inquiry(1, 0x80), None))[4:] for t, lun in ((a, 0), (a, 1), (b, 0))}
    assert len(serials) == 3


def test_given_naa_and_serial_are_used():
    lu = LogicalUnit(RamBackstore(MiB), 0, naa=bytes.fromhex("6001405aabbccdd0"), serial="SN123")
    t = ScsiTarget(TARGET, {0: lu})
    assert _naa(t) == bytes.fromhex("6001405aabbccdd0")
    assert data(t.execute(nexus(), 0, inquiry(1, 0x80), None))[4:] == b"SN123"


def test_block_limits_and_provisioning_pages():
    t = make_target()
    bl = data(t.execute(nexus(), 0, inquiry(1, 0xB0), None))
    assert bl[3] == 0x3C and bl[5] == 128  # MAXIMUM COMPARE AND WRITE LENGTH
    max_unmap, max_desc = struct.unpack_from(">II", bl, 20)
    assert 0 < max_unmap <= 1 << 20 and 0 < max_desc <= 1 << 20
    lbp = data(t.execute(nexus(), 0, inquiry(1, 0xB2), None))
    assert lbp[5] & 0xE0 == 0xE0  # LBPU, LBPWS, LBPWS10


def test_inquiry_of_a_missing_lun_says_not_connected():
    d = data(make_target().execute(nexus(), 7, inquiry(), None))
    assert d[0] == 0x7F


def test_other_commands_to_a_missing_lun_fail():
    assert key_asc(make_target().execute(nexus(), 7, tur(), None)) == (5, 0x25, 0x00)


def test_report_luns_lists_every_lun():
    t = make_target(RamBackstore(MiB), RamBackstore(MiB))
    d = data(t.execute(nexus(), 0, cdb16(0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0), None))
    assert struct.unpack_from(">I", d)[0] == 16
    assert d[8:16] == bytes(8) and d[16:24] == bytes([0, 1]) + bytes(6)


def test_report_luns_bad_select_report():
    assert key_asc(make_target().execute(nexus(), 0, cdb16(0xA0, 0, 0x05, 0, 0, 0, 0, 0, 1, 0), None)) == (5, 0x24, 0)


def test_request_sense_reports_then_clears_the_unit_attention():
    t = make_target()
    nx = nexus()
    d = data(t.execute(nx, 0, cdb16(0x03, 0, 0, 0, 18, 0), None))
    assert (d[0], d[2], d[12], d[13]) == (0x70, 6, 0x29, 0)
    d = data(t.execute(nx, 0, cdb16(0x03, 0, 0, 0, 18, 0), None))
    assert (d[2], d[12], d[13]) == (0, 0, 0)
    assert t.execute(nx, 0, tur(), None).status == 0


def test_request_sense_descriptor_format():
    t = make_target()
    d = data(t.execute(nexus(), 0, cdb16(0x03, 1, 0, 0, 252, 0), None))
    assert d[:4] == bytes([0x72, 6, 0x29, 0])


def test_unknown_opcode():
    t = make_target()
    ready(t, nexus())
    assert key_asc(t.execute(nexus(), 0, cdb16(0xE7), None)) == (5, 0x20, 0x00)


def test_short_cdb_is_an_invalid_field_not_a_crash():
    t = make_target()
    ready(t, nexus())
    assert key_asc(t.execute(nexus(), 0, memoryview(b"\x28\0\0"), None)) == (5, 0x24, 0)


def _pages(d, start):
    out = {}
    pos = start
    while pos < len(d):
        out[d[pos] & 0x3F] = d[pos:pos + 2 + d[pos + 1]]
        pos += 2 + d[pos + 1]
    return out


def test_mode_sense6_all_pages_with_block_descriptor():
    t = make_target()
    ready(t, nexus())
    d = data(t.execute(nexus(), 0, mode_sense6(), None))
    assert d[0] == len(d) - 1 and d[3] == 8
    assert struct.unpack_from(">I", d, 4)[0] == 4 * MiB // 512 and int.from_bytes(d[9:12], "big") == 512
    assert d[2] & 0x10 and not d[2] & 0x80  # DPOFUA, not write protected
    assert sorted(_pages(d, 12)) == [0x01, 0x08, 0x0A, 0x1C]
    assert _pages(d, 12)[0x08][2] & 0x04  # write cache enabled


def test_mode_sense10_long_lba_descriptor():
    d = data(ready_target().execute(nexus(), 0, mode_sense10(page=0x08, llbaa=True), None))
    assert struct.unpack_from(">H", d)[0] == len(d) - 2 and d[4] & 1 and struct.unpack_from(">H", d, 6)[0] == 16
    blocks, bs = struct.unpack_from(">Q4xI", d, 8)
    assert (blocks, bs) == (4 * MiB // 512, 512)
    assert d[24] == 0x08


def test_mode_sense_saved_values_not_supported():
    assert key_asc(ready_target().execute(nexus(), 0, mode_sense6(pc=3), None)) == (5, 0x39, 0x00)


def test_mode_sense_unknown_page():
    assert key_asc(ready_target().execute(nexus(), 0, mode_sense6(page=0x19), None)) == (5, 0x24, 0x00)


def test_mode_sense6_residual_cut():
    assert len(data(ready_target().execute(nexus(), 0, mode_sense6(alloc=4), None))) == 4


def _control_page(t, nx, pc=0):
    d = data(t.execute(nx, 0, mode_sense6(page=0x0A, pc=pc, dbd=True), None))
    return bytearray(d[4:])


def test_mode_select_swp_write_protects_and_tells_other_nexuses():
    t = make_target()
    a, b = nexus(1), nexus(2)
    ready(t, a, b)
    assert _control_page(t, a, pc=1)[4] & 0x08  # SWP is changeable
    page = _control_page(t, a)
    page[4] |= 0x08
    params = bytes(4) + bytes(page)
    assert t.execute(a, 0, mode_select6(len(params)), params).status == 0
    r = t.execute(a, 0, write10(0, 1), bytes(512))
    assert key_asc(r) == (7, 0x27, 0x02)
    assert key_asc(t.execute(b, 0, tur(), None)) == (6, 0x2A, 0x01)  # MODE PARAMETERS CHANGED
    assert t.execute(a, 0, tur(), None).status == 0  # not for the nexus that changed them
    page[4] &= ~0x08
    params = bytes(4) + bytes(page)
    assert t.execute(a, 0, mode_select6(len(params)), params).status == 0
    assert t.execute(a, 0, write10(0, 1), bytes(512)).status == 0


def test_mode_select_of_an_unchangeable_field_is_refused():
    t = make_target()
    ready(t, nexus())
    page = _control_page(t, nexus())
    page[3] ^= 0x10  # queue algorithm modifier: not changeable
    params = bytes(4) + bytes(page)
    assert key_asc(t.execute(nexus(), 0, mode_select6(len(params)), params)) == (5, 0x26, 0x00)


def test_mode_select_save_pages_is_refused():
    t = make_target()
    ready(t, nexus())
    assert key_asc(t.execute(nexus(), 0, mode_select6(4, sp=True), bytes(4))) == (5, 0x24, 0x00)


def test_mode_select_wce_off_makes_the_unit_write_through(tmp_path):
    from services.iscsi_target.scsi import FileBackstore

    store = FileBackstore(tmp_path / "d.img", MiB)
    t = make_target(store)
    ready(t, nexus())
    d = data(t.execute(nexus(), 0, mode_sense6(page=0x08, dbd=True), None))
    page = bytearray(d[4:])
    page[2] &= ~0x04
    params = bytes(4) + bytes(page)
    assert t.execute(nexus(), 0, mode_select6(len(params)), params).status == 0
    assert store.write_through
    assert not data(t.execute(nexus(), 0, mode_sense6(page=0x08, dbd=True), None))[6] & 0x04


def test_report_supported_opcodes_all_and_one():
    t = make_target()
    ready(t, nexus())
    d = data(t.execute(nexus(), 0, cdb16(0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0), None))
    length = struct.unpack_from(">I", d)[0]
    descs = [d[i:i + 8] for i in range(4, 4 + length, 8)]
    ops = {(x[0], struct.unpack_from(">H", x, 2)[0]) for x in descs}
    assert (0x28, 0) in ops and (0x9E, 0x10) in ops and (0x89, 0) in ops
    one = data(t.execute(nexus(), 0, cdb16(0xA3, 0x0C, 0x01, 0x28, 0, 0, 0, 0, 1, 0, 0, 0), None))
    assert one[1] & 0x07 == 3 and struct.unpack_from(">H", one, 2)[0] == 10 and one[4] == 0x28
    # READ(10) has no service actions: asking for one by service action is invalid
    r = t.execute(nexus(), 0, cdb16(0xA3, 0x0C, 0x02, 0x28, 0, 0, 0, 0, 1, 0, 0, 0), None)
    assert key_asc(r) == (5, 0x24, 0x00)
    # with RCTD every descriptor carries a 12-byte timeouts descriptor
    d = data(t.execute(nexus(), 0, cdb16(0xA3, 0x0C, 0x80, 0, 0, 0, 0, 0, 0x10, 0, 0, 0), None))
    assert d[4 + 5] & 0x02 and struct.unpack_from(">H", d, 4 + 8)[0] == 0x0A


def test_start_stop_unit_keeps_the_disk_ready():
    t = make_target()
    ready(t, nexus())
    assert t.execute(nexus(), 0, cdb16(0x1B, 0, 0, 0, 0x00, 0), None).status == 0  # STOP
    assert t.execute(nexus(), 0, tur(), None).status == 0
