"""Block commands, bytes in, bytes out: READ/WRITE in every size, ranges, protection fields, write
protect, READ CAPACITY, VERIFY, WRITE AND VERIFY, COMPARE AND WRITE, WRITE SAME, UNMAP, GET LBA STATUS,
SYNCHRONIZE CACHE, PRE-FETCH, ORWRITE; Data-Out lengths; 4096-byte blocks."""

from __future__ import annotations

import os
import struct

import pytest

from services.iscsi_target.scsi import FileBackstore, RamBackstore

from .helpers import (MiB, caw, cdb16, data, get_lba_status, info, key_asc, nexus, read6, read10, read16,
                      read_capacity16, ready_target, rw10, rw12, rw16, tur, unmap_cdb, unmap_params, write6, write10,
                      write16)

NX = nexus()


def pattern(n, bs=512, seed=1):
    return bytes((i * 7 + seed + i // bs) & 0xFF for i in range(n * bs))


@pytest.mark.parametrize("bs", [512, 4096])
def test_write_then_read_in_every_size(bs):
    t = ready_target(RamBackstore(4 * MiB, block_size=bs))
    for wr, rd, lba in ((write6, read6, 3), (lambda l, n: write10(l, n), lambda l, n: read10(l, n), 40),
                        (lambda l, n: rw12(0xAA, l, n), lambda l, n: rw12(0xA8, l, n), 90),
                        (write16, read16, 200)):
        payload = pattern(5, bs, seed=lba)
        cdb = wr(lba, 5)
        assert t.data_out_length(0, cdb) == 5 * bs
        assert t.execute(NX, 0, cdb, memoryview(payload)).status == 0
        r = t.execute(NX, 0, rd(lba, 5), None)
        assert r.status == 0 and data(r) == payload


def test_read_returns_a_view_of_the_store_not_a_copy(tmp_path):
    store = FileBackstore(tmp_path / "d.img", MiB)
    t = ready_target(store)
    r = t.execute(NX, 0, read10(0, 128), None)
    assert isinstance(r.data[0], memoryview) and r.data[0].obj is store.map


def test_read6_zero_length_means_256_blocks():
    t = ready_target()
    assert len(data(t.execute(NX, 0, read6(0, 0), None))) == 256 * 512


@pytest.mark.parametrize("make", [read10, read16, write10, write16])
def test_beyond_end_of_medium(make):
    t = ready_target()  # 8192 blocks
    cdb = make(8192 - 1, 2)
    r = t.execute(NX, 0, cdb, bytes(t.data_out_length(0, cdb)) or None)
    assert r.status == 2 and key_asc(r) == (5, 0x21, 0x00)
    r = t.execute(NX, 0, make(2 ** 32 - 1 if make in (read10, write10) else 2 ** 63, 1), bytes(512))
    assert key_asc(r) == (5, 0x21, 0x00)


def test_zero_blocks_is_good_and_moves_nothing():
    t = ready_target()
    r = t.execute(NX, 0, read10(0, 0), None)
    assert r.status == 0 and data(r) == b""
    assert t.data_out_length(0, write10(0, 0)) == 0
    assert t.execute(NX, 0, write10(0, 0), None).status == 0


@pytest.mark.parametrize("op", [0x28, 0x2A, 0x2F, 0x2E])
def test_protection_fields_are_refused(op):
    t = ready_target()
    cdb = rw10(op, 0, 1, flags=0x20)
    r = t.execute(NX, 0, cdb, bytes(t.data_out_length(0, cdb)))
    assert key_asc(r) == (5, 0x24, 0x00)


def test_dpo_fua_are_accepted():
    t = ready_target()
    assert t.execute(NX, 0, write10(0, 1, flags=0x18), bytes(512)).status == 0
    assert t.execute(NX, 0, read10(0, 1, flags=0x18), None).status == 0


def test_readonly_lun_refuses_every_write_but_reads():
    t = ready_target(RamBackstore(MiB), readonly=True)
    assert t.execute(NX, 0, read10(0, 1), None).status == 0
    for cdb, payload in ((write10(0, 1), bytes(512)), (write16(0, 1), bytes(512)),
                         (cdb16(0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0), bytes(512)),
                         (unmap_cdb(24), unmap_params((0, 1))), (caw(0, 1), bytes(1024))):
        assert key_asc(t.execute(NX, 0, cdb, payload)) == (7, 0x27, 0x00), cdb.hex()
    d = data(t.execute(NX, 0, cdb16(0x1A, 0x08, 0x3F, 0, 255, 0), None))
    assert d[2] & 0x80  # WP in the mode parameter header


@pytest.mark.parametrize("bs", [512, 4096])
def test_read_capacity(bs):
    t = ready_target(RamBackstore(8 * MiB, block_size=bs))
    d = data(t.execute(NX, 0, cdb16(0x25), None))
    assert struct.unpack(">II", d) == (8 * MiB // bs - 1, bs)
    d = data(t.execute(NX, 0, read_capacity16(), None))
    last, size = struct.unpack_from(">QI", d)
    assert (last, size) == (8 * MiB // bs - 1, bs) and d[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    assert len(data(t.execute(NX, 0, read_capacity16(alloc=12), None))) == 12


def test_verify_with_bytchk_reports_the_offset_of_the_first_difference():
    t = ready_target()
    payload = pattern(4)
    t.execute(NX, 0, write10(10, 4), payload)
    cdb = rw10(0x2F, 10, 4, flags=0x02)  # BYTCHK 01b
    assert t.data_out_length(0, cdb) == 4 * 512
    assert t.execute(NX, 0, cdb, payload).status == 0
    wrong = bytearray(payload)
    wrong[1234] ^= 0x55
    r = t.execute(NX, 0, cdb, bytes(wrong))
    assert key_asc(r) == (0xE, 0x1D, 0x00) and info(r) == 1234


def test_verify_bytchk_3_compares_one_block_against_each():
    t = ready_target()
    block = b"\xab" * 512
    t.execute(NX, 0, write10(0, 3), block * 3)
    cdb = rw16(0x8F, 0, 3, flags=0x06)
    assert t.data_out_length(0, cdb) == 512
    assert t.execute(NX, 0, cdb, block).status == 0
    t.execute(NX, 0, write10(2, 1), b"\xac" * 512)
    assert info(t.execute(NX, 0, cdb, block)) == 1024


def test_verify_without_bytchk_checks_the_range_only():
    t = ready_target()
    assert t.data_out_length(0, rw10(0x2F, 0, 8)) == 0
    assert t.execute(NX, 0, rw10(0x2F, 0, 8), None).status == 0
    assert key_asc(t.execute(NX, 0, rw10(0x2F, 8190, 8), None)) == (5, 0x21, 0)


def test_write_and_verify_writes():
    t = ready_target()
    payload = pattern(2)
    assert t.execute(NX, 0, rw12(0xAE, 5, 2, flags=0x02), payload).status == 0
    assert data(t.execute(NX, 0, read10(5, 2), None)) == payload


def test_compare_and_write_swaps_when_equal():
    t = ready_target()
    old, new = b"A" * 1024, b"B" * 1024
    t.execute(NX, 0, write10(100, 2), old)
    cdb = caw(100, 2)
    assert t.data_out_length(0, cdb) == 2048
    assert t.execute(NX, 0, cdb, old + new).status == 0
    assert data(t.execute(NX, 0, read10(100, 2), None)) == new


def test_compare_and_write_miscompare_offset_and_no_write():
    t = ready_target()
    current = b"A" * 1024
    t.execute(NX, 0, write10(100, 2), current)
    compare = bytearray(current)
    compare[700] = ord("Z")
    r = t.execute(NX, 0, caw(100, 2), bytes(compare) + b"B" * 1024)
    assert key_asc(r) == (0xE, 0x1D, 0x00) and info(r) == 700
    assert data(t.execute(NX, 0, read10(100, 2), None)) == current


def test_compare_and_write_limits():
    t = ready_target()
    assert key_asc(t.execute(NX, 0, caw(0, 129), bytes(2 * 129 * 512))) == (5, 0x24, 0)
    assert key_asc(t.execute(NX, 0, caw(0, 0), None)) == (5, 0x24, 0)
    assert key_asc(t.execute(NX, 0, caw(8191, 2), bytes(2048))) == (5, 0x21, 0)


def test_compare_and_write_is_atomic_across_threads():
    import threading

    t = ready_target()
    t.execute(NX, 0, write10(0, 1), bytes(512))
    wins = []

    def worker(n):
        nx = nexus(n)
        for _ in range(200):
            t.execute(nx, 0, tur(), None)  # its power-on unit attention, the first time
            while True:
                cur = data(t.execute(nx, 0, read10(0, 1), None))
                value = int.from_bytes(cur[:8], "big")
                new = (value + 1).to_bytes(8, "big").ljust(512, b"\0")
                r = t.execute(nx, 0, caw(0, 1), cur + new)
                if r.status == 0:
                    wins.append(1)
                    break
                assert r.status == 2 and key_asc(r)[0] in (0xE, 6)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 2, 3)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert int.from_bytes(data(t.execute(NX, 0, read10(0, 1), None))[:8], "big") == len(wins) == 600


def test_write_same_repeats_one_block():
    t = ready_target()
    block = pattern(1)
    cdb = cdb16(0x41, 0, 0, 0, 0, 50, 0, 0, 7, 0)
    assert t.data_out_length(0, cdb) == 512
    assert t.execute(NX, 0, cdb, block).status == 0
    assert data(t.execute(NX, 0, read10(50, 7), None)) == block * 7


def test_write_same_16_unmap_and_ndob_zero_the_blocks():
    t = ready_target()
    t.execute(NX, 0, write10(0, 16), b"\xff" * 16 * 512)
    unmap = memoryview(bytes([0x93, 0x08]) + struct.pack(">QI", 0, 8) + b"\0\0")
    assert t.execute(NX, 0, unmap, b"\xff" * 512).status == 0  # UNMAP deallocates whatever the pattern
    ndob = memoryview(bytes([0x93, 0x01]) + struct.pack(">QI", 8, 8) + b"\0\0")
    assert t.data_out_length(0, ndob) == 0
    assert t.execute(NX, 0, ndob, None).status == 0
    assert data(t.execute(NX, 0, read10(0, 16), None)) == bytes(16 * 512)


def test_write_same_anchor_and_range():
    t = ready_target()
    anchor = memoryview(bytes([0x93, 0x18]) + struct.pack(">QI", 0, 1) + b"\0\0")
    assert key_asc(t.execute(NX, 0, anchor, bytes(512))) == (5, 0x24, 0)
    beyond = memoryview(bytes([0x93, 0]) + struct.pack(">QI", 8190, 4) + b"\0\0")
    assert key_asc(t.execute(NX, 0, beyond, bytes(512))) == (5, 0x21, 0)


def test_write_same_zero_blocks_goes_to_the_end():
    t = ready_target()
    assert t.execute(NX, 0, cdb16(0x41, 0, 0, 0, 0x1F, 0xFC, 0, 0, 0, 0), b"\x11" * 512).status == 0  # LBA 8188
    assert data(t.execute(NX, 0, read10(8188, 4), None)) == b"\x11" * 2048


def test_unmap_zeroes_and_checks_ranges():
    t = ready_target()
    t.execute(NX, 0, write10(0, 8), b"\x77" * 8 * 512)
    params = unmap_params((1, 2), (5, 1))
    assert t.data_out_length(0, unmap_cdb(len(params))) == len(params)
    assert t.execute(NX, 0, unmap_cdb(len(params)), params).status == 0
    d = data(t.execute(NX, 0, read10(0, 8), None))
    assert d[512:1536] == bytes(1024) and d[2560:3072] == bytes(512) and d[:512] == b"\x77" * 512
    bad = unmap_params((8190, 4))
    assert key_asc(t.execute(NX, 0, unmap_cdb(len(bad)), bad)) == (5, 0x21, 0)
    assert key_asc(t.execute(NX, 0, unmap_cdb(4), bytes(4))) == (5, 0x1A, 0)  # PARAMETER LIST LENGTH ERROR
    assert t.execute(NX, 0, unmap_cdb(0), None).status == 0


def test_unmap_punches_holes_in_a_file_and_get_lba_status_sees_them(tmp_path):
    path = tmp_path / "thin.img"
    t = ready_target(FileBackstore(path, 4 * MiB, sparse=False))
    used = os.stat(path).st_blocks
    t.execute(NX, 0, write10(0, 2048), b"\x01" * 2048 * 512)
    params = unmap_params((256, 1024))
    assert t.execute(NX, 0, unmap_cdb(len(params)), params).status == 0
    assert os.stat(path).st_blocks < used
    assert data(t.execute(NX, 0, read10(256, 1024), None)) == bytes(1024 * 512)
    d = data(t.execute(NX, 0, get_lba_status(0), None))
    descs = [struct.unpack_from(">QIB", d, off) for off in range(8, len(d), 16)]
    assert descs[0] == (0, 256, 0) and descs[1] == (256, 1024, 1) and descs[2][0] == 1280 and descs[2][2] == 0
    d = data(t.execute(NX, 0, get_lba_status(300, alloc=24), None))
    assert len(d) == 24 and struct.unpack_from(">QIB", d, 8) == (300, 980, 1)


def test_get_lba_status_beyond_end():
    t = ready_target()
    assert key_asc(t.execute(NX, 0, get_lba_status(8192), None)) == (5, 0x21, 0)


def test_synchronize_cache_and_prefetch_check_the_range():
    t = ready_target()
    for op in (0x35, 0x34):
        assert t.execute(NX, 0, rw10(op, 0, 8), None).status == 0
        assert key_asc(t.execute(NX, 0, rw10(op, 8190, 8), None)) == (5, 0x21, 0)
    for op in (0x91, 0x90):
        assert t.execute(NX, 0, rw16(op, 0, 0), None).status == 0


def test_orwrite_ors_the_data_in():
    t = ready_target()
    t.execute(NX, 0, write10(0, 1), b"\x0f" * 512)
    assert t.execute(NX, 0, rw16(0x8B, 0, 1), b"\xf0" * 512).status == 0
    assert data(t.execute(NX, 0, read10(0, 1), None)) == b"\xff" * 512


def test_data_out_lengths_of_parameter_commands():
    t = ready_target()
    assert t.data_out_length(0, cdb16(0x15, 0x10, 0, 0, 28, 0)) == 28
    assert t.data_out_length(0, cdb16(0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0)) == 24
    assert t.data_out_length(0, read10(0, 8)) == 0
    assert t.data_out_length(5, write10(0, 8)) == 0  # no such LUN
    assert t.data_out_length(0, memoryview(b"\x2a")) == 0  # short CDB


def test_4096_byte_blocks_address_by_block():
    t = ready_target(RamBackstore(MiB, block_size=4096))
    payload = pattern(2, 4096)
    assert t.execute(NX, 0, write16(10, 2), payload).status == 0
    assert data(t.execute(NX, 0, read10(10, 2), None)) == payload
    assert key_asc(t.execute(NX, 0, read10(255, 2), None)) == (5, 0x21, 0)


def test_read_defect_data_is_an_empty_list():
    t = ready_target()
    d = data(t.execute(NX, 0, cdb16(0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0), None))
    assert d == bytes([0, 0x18, 0, 0])
    d = data(t.execute(NX, 0, cdb16(0xB7, 0x0D, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0), None))
    assert d == bytes([0, 0x0D]) + bytes(6)
