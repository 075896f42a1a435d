"""The CD/DVD drive (scsi/mmc.py), bytes in and bytes out: INQUIRY, GET CONFIGURATION and its profiles, READ
TOC formats 0/1/2, READ DISC/TRACK INFORMATION, GET EVENT STATUS NOTIFICATION, MODE SENSE 2Ah, PREVENT
ALLOW, START STOP UNIT (eject/load), READ(10)/(12), READ CAPACITY, writes refused, and a media change
(unit attention 28h/00h, then the new disc)."""

from __future__ import annotations

import struct

import pytest

from services.iscsi_target.scsi import BackstoreError, ScsiTarget
from services.iscsi_target.scsi.mmc import CdromUnit, open_iso

from .helpers import TARGET, cdb16, data, inquiry, key_asc, nexus, read10, rw12, tur, write10

BLOCK = 2048
NX, NX2 = nexus(1), nexus(2)


def make_iso(path, blocks=64, fill=b"") -> bytes:
    """An image with an ISO 9660 primary volume descriptor at block 16 and a recognisable pattern."""
    raw = bytearray(blocks * BLOCK)
    for lba in range(blocks):
        raw[lba * BLOCK:lba * BLOCK + 16] = f"block {lba:08d}".encode().ljust(16)
    raw[16 * BLOCK:16 * BLOCK + 6] = b"\x01CD001"
    raw[17 * BLOCK:17 * BLOCK + len(fill)] = fill
    path.write_bytes(bytes(raw))
    return bytes(raw)


@pytest.fixture
def cd(tmp_path):
    raw = make_iso(tmp_path / "disc.iso")
    lu = CdromUnit(open_iso(tmp_path / "disc.iso"), 0)
    t = ScsiTarget(TARGET, {0: lu})
    for nx in (NX, NX2):
        assert key_asc(t.execute(nx, 0, tur(), None)) == (6, 0x29, 0x00)
    yield t, lu, raw
    lu.close()


def run(t, cdb, nx=NX, data_out=None):
    return t.execute(nx, 0, memoryview(bytes(cdb).ljust(16, b"\0")), data_out)


def ok(t, cdb, nx=NX) -> bytes:
    r = run(t, cdb, nx)
    assert r.status == 0, r
    return data(r)


def get_configuration(rt=0, start=0, alloc=4096):
    return bytes([0x46, rt]) + struct.pack(">H", start) + bytes(3) + struct.pack(">H", alloc) + b"\0"


def features(payload) -> dict[int, bytes]:
    out, pos = {}, 8
    while pos < len(payload):
        code, flags, length = struct.unpack_from(">HBB", payload, pos)
        out[code] = payload[pos:pos + 4 + length]
        pos += 4 + length
    return out


def gesn(classes=0x10, alloc=8, polled=1):
    return bytes([0x4A, polled, 0, 0, classes, 0, 0]) + struct.pack(">H", alloc) + b"\0"


def read_toc(fmt=0, msf=False, track=0, alloc=1024, control=0):
    return bytes([0x43, 0x02 if msf else 0, fmt, 0, 0, 0, track]) + struct.pack(">H", alloc) + bytes([control])


def start_stop(start, loej):
    return bytes([0x1B, 0, 0, 0, (0x02 if loej else 0) | (0x01 if start else 0), 0])


# ---------------------------------------------------------------------------------------------- identity
def test_inquiry_is_a_removable_cd_dvd_device(cd):
    t, lu, _ = cd
    d = ok(t, inquiry(alloc=96))
    assert d[0] == 0x05 and d[1] & 0x80 and d[16:32] == b"VIRTUAL CDROM   "
    assert 0x02A0 in struct.unpack_from(">8H", d, 58)
    pages = ok(t, inquiry(1, 0x00))
    assert pages[0] == 0x05 and list(pages[4:]) == [0x00, 0x80, 0x83]
    assert ok(t, inquiry(1, 0x80))[:2] == b"\x05\x80"
    assert key_asc(run(t, inquiry(1, 0xB0))) == (5, 0x24, 0x00)  # no block limits on a CD


def test_read_capacity_and_reads_are_2048_byte_blocks(cd):
    t, lu, raw = cd
    assert ok(t, cdb16(0x25)) == struct.pack(">II", 63, 2048)
    assert ok(t, read10(3, 2)) == raw[3 * BLOCK:5 * BLOCK]
    assert ok(t, rw12(0xA8, 60, 4)) == raw[60 * BLOCK:]
    assert key_asc(run(t, read10(63, 2))) == (5, 0x21, 0x00)
    assert key_asc(run(t, cdb16(0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1))) == (5, 0x20, 0x00)  # no READ(16)


def test_writes_are_refused_with_data_protect(cd):
    t, lu, raw = cd
    assert t.data_out_length(0, write10(0, 1)) == 0  # the transport collects no data for them
    for cdb in (write10(0, 1), rw12(0xAA, 0, 1), cdb16(0x04), cdb16(0xA1), cdb16(0x5B)):
        assert key_asc(run(t, cdb)) == (7, 0x27, 0x00), cdb[0]
    assert ok(t, read10(0, 1)) == raw[:BLOCK]


# ---------------------------------------------------------------------------------------------- MMC
def test_get_configuration_profiles_of_a_cd_sized_image(cd):
    t, lu, _ = cd
    d = ok(t, get_configuration())
    length, profile = struct.unpack_from(">I2xH", d)
    assert length == len(d) - 4 and profile == 0x0008
    f = features(d)
    assert set(f) >= {0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x001E, 0x001F}
    plist = f[0x0000][4:]
    assert [(struct.unpack_from(">H", plist, i)[0], plist[i + 2] & 1) for i in range(0, len(plist), 4)] == \
        [(0x0010, 0), (0x0008, 1)]
    assert f[0x001E][2] & 1 and not f[0x001F][2] & 1            # CD Read current, DVD Read not
    assert struct.unpack_from(">IH", f[0x0010], 4) == (2048, 1)  # Random Readable: 2048-byte blocks
    assert f[0x0003][4] >> 5 == 1 and f[0x0003][4] & 0x08        # a tray that ejects
    # RT=1: current features only; RT=2: exactly the one asked for
    assert 0x001F not in features(ok(t, get_configuration(rt=1)))
    assert list(features(ok(t, get_configuration(rt=2, start=0x0010)))) == [0x0010]
    assert list(features(ok(t, get_configuration(start=0x001E)))) == [0x001E, 0x001F, 0x0100]
    assert key_asc(run(t, get_configuration(rt=3))) == (5, 0x24, 0x00)


def test_an_image_larger_than_a_cd_is_a_dvd(tmp_path):
    path = tmp_path / "dvd.iso"
    make_iso(path)
    with open(path, "r+b") as f:
        f.truncate(4 << 30)  # sparse: 4 GiB
    lu = CdromUnit(open_iso(path), 0)
    t = ScsiTarget(TARGET, {0: lu})
    run(t, tur())
    d = ok(t, get_configuration())
    assert struct.unpack_from(">H", d, 6)[0] == 0x0010
    f = features(d)
    assert f[0x001F][2] & 1 and not f[0x001E][2] & 1
    assert struct.unpack_from(">IH", f[0x0010], 4) == (2048, 16)
    assert ok(t, cdb16(0x25)) == struct.pack(">II", (4 << 30) // 2048 - 1, 2048)
    phys = ok(t, bytes([0xAD, 0, 0, 0, 0, 0, 0, 0x00, 0x08, 0x04, 0]))
    assert struct.unpack_from(">H", phys)[0] == 2050 and phys[4] == 0x01
    assert struct.unpack_from(">I", phys, 12)[0] == 0x30000 + (4 << 30) // 2048 - 1
    assert ok(t, bytes([0xAD, 0, 0, 0, 0, 0, 0, 0x01, 0, 8, 0])) == bytes([0, 6, 0, 0, 0, 0, 0, 0])
    lu.close()


def test_read_dvd_structure_on_a_cd_is_incompatible(cd):
    t, lu, _ = cd
    assert key_asc(run(t, bytes([0xAD, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x04, 0]))) == (5, 0x30, 0x00)


def test_read_toc_format_0_lba_and_msf(cd):
    t, lu, _ = cd
    d = ok(t, read_toc())
    assert d == bytes([0, 18, 1, 1]) + bytes([0, 0x14, 1, 0, 0, 0, 0, 0]) + bytes([0, 0x14, 0xAA, 0]) + \
        struct.pack(">I", 64)
    d = ok(t, read_toc(msf=True))
    assert d[8:12] == bytes([0, 0, 2, 0])                 # track 1 at 00:02:00
    assert d[16:20] == bytes([0, 0, 2, 64])               # lead-out 64 frames later
    assert ok(t, read_toc(track=0xAA))[2:] == bytes([1, 1, 0, 0x14, 0xAA, 0]) + struct.pack(">I", 64)
    assert key_asc(run(t, read_toc(track=2))) == (5, 0x24, 0x00)
    assert len(ok(t, read_toc(alloc=4))) == 4


def test_read_toc_format_1_sessions_also_where_linux_asks(cd):
    t, lu, _ = cd
    expected = bytes([0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0])
    assert ok(t, read_toc(fmt=1)) == expected
    assert ok(t, read_toc(fmt=0, control=0x40, alloc=12)) == expected  # format in byte 9 (sr_cd_check)


def test_read_toc_format_2_full_toc(cd):
    t, lu, _ = cd
    d = ok(t, read_toc(fmt=2))
    assert struct.unpack_from(">H", d)[0] == len(d) - 2 and d[2:4] == b"\x01\x01"
    points = {d[i + 3]: d[i:i + 11] for i in range(4, len(d), 11)}
    assert set(points) == {0xA0, 0xA1, 0xA2, 0x01}
    assert points[0xA2][8:11] == bytes([0, 2, 64]) and points[0x01][8:11] == bytes([0, 2, 0])
    assert key_asc(run(t, read_toc(fmt=5))) == (5, 0x24, 0x00)


def test_read_disc_and_track_information(cd):
    t, lu, _ = cd
    d = ok(t, bytes([0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0]))
    assert len(d) == 34 and struct.unpack_from(">H", d)[0] == 32
    assert d[2] & 0x03 == 0x02 and (d[2] >> 2) & 0x03 == 0x03  # disc complete, last session complete
    assert (d[3], d[4], d[5], d[6]) == (1, 1, 1, 1)
    assert key_asc(run(t, bytes([0x51, 1, 0, 0, 0, 0, 0, 0, 34, 0]))) == (5, 0x24, 0x00)
    d = ok(t, bytes([0x52, 1, 0, 0, 0, 1, 0, 0, 36, 0]))
    assert d[2] == 1 and struct.unpack_from(">II", d, 24) == (64, 63)
    assert key_asc(run(t, bytes([0x52, 1, 0, 0, 0, 2, 0, 0, 36, 0]))) == (5, 0x24, 0x00)


def test_mode_sense_capabilities_page(cd):
    t, lu, _ = cd
    d = ok(t, bytes([0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 255, 0]))
    length, bdl = struct.unpack_from(">H4xH", d)
    assert length == len(d) - 2 and bdl == 0
    page = d[8:]
    assert page[0] == 0x2A and page[1] == len(page) - 2
    assert page[2] & 0x08 and page[3] == 0      # reads DVD-ROM, writes nothing
    assert page[6] >> 5 == 1 and page[6] & 0x08 and not page[6] & 0x02  # tray, eject, not locked
    d6 = ok(t, bytes([0x1A, 0, 0x3F, 0, 255, 0]))
    assert d6[0] == len(d6) - 1 and d6[3] == 0 and {d6[4], d6[4 + 2 + d6[5]]} == {0x01, 0x2A}
    assert key_asc(run(t, bytes([0x1A, 0, 0x08, 0, 255, 0]))) == (5, 0x24, 0x00)  # no caching page


def test_gesn_is_polled_only_and_reports_the_media_class(cd):
    t, lu, _ = cd
    assert key_asc(run(t, gesn(polled=0))) == (5, 0x24, 0x00)
    assert ok(t, gesn()) == bytes([0, 6, 0x04, 0x10, 0, 0x02, 0, 0])  # no change, medium present
    assert ok(t, gesn(classes=0x04)) == bytes([0, 2, 0x80, 0x10])      # NEA for a class we do not have


# ---------------------------------------------------------------------------------------------- tray and medium
def test_eject_then_not_ready_then_load(cd):
    t, lu, raw = cd
    assert ok(t, start_stop(start=False, loej=True)) == b""
    assert key_asc(run(t, tur())) == (2, 0x3A, 0x02)
    assert key_asc(run(t, read10(0, 1))) == (2, 0x3A, 0x02)
    assert key_asc(run(t, cdb16(0x25))) == (2, 0x3A, 0x02)
    sense = ok(t, cdb16(0x03, 0, 0, 0, 18, 0))
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (2, 0x3A, 0x02)
    assert ok(t, gesn(), NX2) == bytes([0, 6, 0x04, 0x10, 3, 0x01, 0, 0])  # MediaRemoval, tray open
    assert struct.unpack_from(">H", ok(t, get_configuration()), 6)[0] == 0  # no current profile
    assert ok(t, start_stop(start=True, loej=True)) == b""
    assert ok(t, tur()) == b""                                       # the one that loaded it: ready
    assert key_asc(run(t, tur(), NX2)) == (6, 0x28, 0x00)            # the other: the disc may have changed
    assert ok(t, read10(0, 1), NX2) == raw[:BLOCK]
    assert ok(t, gesn(), NX2)[4] == 2                                # NewMedia, once
    assert ok(t, gesn(), NX2)[4] == 0


def test_prevent_medium_removal_refuses_an_eject_until_allowed(cd):
    t, lu, _ = cd
    assert ok(t, cdb16(0x1E, 0, 0, 0, 1, 0)) == b""
    assert ok(t, bytes([0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 255, 0]))[8 + 6] & 0x02  # the page says locked
    assert key_asc(run(t, start_stop(start=False, loej=True), NX2)) == (5, 0x53, 0x02)
    assert ok(t, tur()) == b""
    assert ok(t, cdb16(0x1E, 0, 0, 0, 0, 0)) == b""
    assert ok(t, start_stop(start=False, loej=True), NX2) == b""
    assert key_asc(run(t, tur())) == (2, 0x3A, 0x02)


def test_a_prevent_ends_with_its_session(cd):
    t, lu, _ = cd
    ok(t, cdb16(0x1E, 0, 0, 0, 1, 0))
    t.nexus_lost(NX)
    assert ok(t, start_stop(start=False, loej=True), NX2) == b""


def test_media_change_raises_the_unit_attention_then_serves_the_new_disc(cd, tmp_path):
    t, lu, raw = cd
    ok(t, cdb16(0x1E, 0, 0, 0, 1, 0))  # a lock does not stop the administrator
    new = make_iso(tmp_path / "second.iso", blocks=100, fill=b"the second disc")
    lu.change_medium(open_iso(tmp_path / "second.iso"))
    # GET CONFIGURATION and GET EVENT STATUS NOTIFICATION neither report nor take the unit attention
    assert ok(t, gesn())[4:6] == bytes([2, 0x02])
    ok(t, get_configuration())
    for nx in (NX, NX2):
        assert key_asc(run(t, tur(), nx)) == (6, 0x28, 0x00)
        assert ok(t, tur(), nx) == b""
    assert ok(t, cdb16(0x25)) == struct.pack(">II", 99, 2048)
    assert ok(t, read10(17, 1))[:15] == b"the second disc" and ok(t, read10(99, 1)) == new[99 * BLOCK:]
    assert ok(t, read_toc())[16:20] == struct.pack(">I", 100)


def test_a_file_that_is_not_an_iso_is_refused(tmp_path):
    (tmp_path / "x.img").write_bytes(bytes(1 << 20))
    with pytest.raises(BackstoreError, match="x.img: not an ISO 9660 or UDF image"):
        open_iso(tmp_path / "x.img")
    with pytest.raises(BackstoreError, match="cannot open the ISO image"):
        open_iso(tmp_path / "missing.iso")
