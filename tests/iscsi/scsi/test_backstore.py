"""Backing stores: durability (FUA, SYNCHRONIZE CACHE, write-through; checked by reopening the file),
sparse against preallocated images, hole punching, resize with its unit attention, read-only images."""

from __future__ import annotations

import os

import pytest

from services.iscsi_target.scsi import BackstoreError, FileBackstore, RamBackstore

from .helpers import MiB, cdb16, data, key_asc, nexus, read10, read_capacity16, ready_target, tur, write10

NX = nexus()


def reopen(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_fua_write_is_in_the_file_at_its_response(tmp_path, monkeypatch):
    path = tmp_path / "d.img"
    store = FileBackstore(path, MiB)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    t = ready_target(store)
    assert t.execute(NX, 0, write10(3, 1, flags=0x08), b"\x42" * 512).status == 0
    assert synced == [store.fd]
    assert reopen(path)[3 * 512:4 * 512] == b"\x42" * 512


def test_plain_write_is_synced_by_synchronize_cache(tmp_path, monkeypatch):
    path = tmp_path / "d.img"
    store = FileBackstore(path, MiB)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    t = ready_target(store)
    t.execute(NX, 0, write10(0, 1), b"\x01" * 512)
    assert synced == []
    assert t.execute(NX, 0, cdb16(0x35), None).status == 0
    assert synced == [store.fd]
    store.close()
    again = FileBackstore(path, MiB, create=False)
    assert bytes(again.read(0, 512)) == b"\x01" * 512
    again.close()


def test_write_through_syncs_every_write(tmp_path, monkeypatch):
    store = FileBackstore(tmp_path / "d.img", MiB, write_through=True)
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    t = ready_target(store)
    t.execute(NX, 0, write10(0, 2), bytes(1024))
    assert synced == [store.fd]
    d = data(t.execute(NX, 0, cdb16(0x1A, 0x08, 0x08, 0, 255, 0), None))
    assert not d[6] & 0x04  # the caching page says WCE=0


def test_sparse_image_allocates_nothing_and_preallocated_everything(tmp_path):
    sparse = FileBackstore(tmp_path / "s.img", 16 * MiB, sparse=True)
    full = FileBackstore(tmp_path / "f.img", 16 * MiB)
    assert os.path.getsize(tmp_path / "s.img") == os.path.getsize(tmp_path / "f.img") == 16 * MiB
    assert os.stat(tmp_path / "s.img").st_blocks * 512 < MiB
    assert os.stat(tmp_path / "f.img").st_blocks * 512 >= 16 * MiB
    assert sparse.mapped(0) == (False, 16 * MiB)
    sparse.close()
    full.close()


def test_existing_image_keeps_its_data_and_size(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(b"\x5a" * 2 * MiB)
    store = FileBackstore(path, None, create=False)
    assert store.size == 2 * MiB and bytes(store.read(0, 4)) == b"\x5a" * 4
    store.close()


def test_missing_image_without_create_is_an_error_naming_it(tmp_path):
    with pytest.raises(BackstoreError, match="nope.img"):
        FileBackstore(tmp_path / "nope.img", MiB, create=False)
    with pytest.raises(BackstoreError, match="size"):
        FileBackstore(tmp_path / "x.img", MiB + 1)


def test_readonly_image_is_opened_read_only(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(MiB))
    os.chmod(path, 0o444)
    store = FileBackstore(path, None, readonly=True, create=False)
    t = ready_target(store)
    assert key_asc(t.execute(NX, 0, write10(0, 1), bytes(512))) == (7, 0x27, 0x00)
    assert t.execute(NX, 0, read10(0, 1), None).status == 0


def test_resize_reports_capacity_changed_to_every_nexus(tmp_path):
    store = FileBackstore(tmp_path / "d.img", MiB, sparse=True)
    t = ready_target(store)
    other = nexus(2)
    t.execute(other, 0, tur(), None)
    t.luns[0].resize(2 * MiB)
    for nx in (NX, other):
        assert key_asc(t.execute(nx, 0, tur(), None)) == (6, 0x2A, 0x09)
    d = data(t.execute(NX, 0, read_capacity16(), None))
    assert int.from_bytes(d[:8], "big") == 2 * MiB // 512 - 1
    assert t.execute(NX, 0, write10(2 * MiB // 512 - 1, 1), bytes(512)).status == 0


def test_ram_resize_keeps_data():
    store = RamBackstore(MiB)
    t = ready_target(store)
    t.execute(NX, 0, write10(0, 1), b"\x33" * 512)
    t.luns[0].resize(2 * MiB)
    t.execute(NX, 0, tur(), None)
    assert data(t.execute(NX, 0, read10(0, 1), None)) == b"\x33" * 512


def test_bad_block_size():
    with pytest.raises(BackstoreError):
        RamBackstore(MiB, block_size=1024)
