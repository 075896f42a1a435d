"""The image store (shared/images/store.py) with real qemu-img: create, import of every format qemu-img makes,
overlays published into flat versions, rollback, prune, verify, export checked with `qemu-img compare` and
`qemu-img check`, the free-space reserve. qemu-img (Debian qemu-utils) must be installed: without it these
tests fail, they do not skip."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from services.iscsi_target.scsi.overlay import Overlay, OverlayError, OverlayFull
from shared.images.store import ImageStore, ImageStoreError, SpaceError

KiB, MiB = 1024, 1 << 20
ROOT = Path(__file__).resolve().parents[2]
SIZE = 8 * MiB


def digest(content: bytes) -> str:
    """The store's version digest, computed independently: sha256 over the sha256 of each MiB."""
    outer = hashlib.sha256()
    for off in range(0, len(content), MiB):
        outer.update(hashlib.sha256(content[off:off + MiB]).digest())
    return outer.hexdigest()


def qemu_img(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "state" / "images")


def random_raw(path: Path, size: int, seed: int = 3) -> bytes:
    rnd = random.Random(seed)
    content = bytearray(size)
    for _ in range(40):  # scattered data, the rest holes (as a fresh install is)
        off = rnd.randrange(0, size // 4096) * 4096
        n = min(rnd.randrange(1, 64) * 4096, size - off)
        content[off:off + n] = rnd.randbytes(n)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4096):
            block = content[off:off + 4096]
            if any(block):
                f.seek(off)
                f.write(block)
    return bytes(content)


def write_pc(store: ImageStore, name: str, pc: str, writes) -> None:
    plan = store.disk_for(name, pc)
    ov = Overlay(plan.version_path, plan.overlay_path, base_id=plan.base_id)
    try:
        for off, data in writes:
            if data is None:
                ov.unmap(off[0], off[1])
            else:
                ov.write(off, data)
    finally:
        ov.close()


def apply(model: bytearray, writes) -> None:
    for off, data in writes:
        if data is None:
            model[off[0]:off[0] + off[1]] = bytes(off[1])
        else:
            model[off:off + len(data)] = data


def test_create_gives_an_empty_sparse_read_only_version_1(store):
    v = store.create("win10", SIZE)
    path = store.version_path("win10")
    assert v.n == 1 and v.size == SIZE and v.digest == digest(bytes(SIZE))
    assert path == store.root / "win10" / "versions" / "1.raw"
    st = os.stat(path)
    assert st.st_size == SIZE and st.st_blocks == 0 and st.st_mode & 0o777 == 0o444
    info = store.info("win10")
    assert info.current == 1 and info.keep_versions == 3 and [x.n for x in info.versions] == [1]
    assert store.names() == ["win10"]
    with pytest.raises(ImageStoreError, match="already exists"):
        store.create("win10", SIZE)
    with pytest.raises(ImageStoreError, match="image name 'Bad Name'"):
        store.create("Bad Name", SIZE)
    with pytest.raises(ImageStoreError, match="multiple of 512"):
        store.create("odd", 1000)
    manifest = json.loads((store.root / "win10" / "image.json").read_text())
    assert manifest["current"] == 1 and manifest["versions"][0]["digest"] == v.digest


def test_publish_makes_a_flat_version_and_running_pcs_keep_theirs(store):
    store.create("lab", SIZE)
    v1_sum = store.info("lab").versions[0].digest
    write_pc(store, "lab", "pc-a", [(0, b"a" * 4096)])         # a discard PC running on v1
    super_writes = [(4096, b"s" * 10000), (1 * MiB + 100, b"marker"), (SIZE - 512, b"e" * 512)]
    write_pc(store, "lab", "super", super_writes)
    model = bytearray(SIZE)
    apply(model, super_writes)
    seen = []
    v2 = store.publish("lab", "super", progress=lambda done, total, phase: seen.append((phase, done, total)))
    assert v2.n == 2 and v2.parent == 1 and v2.source == "publish super"
    path2 = store.version_path("lab", 2)
    assert path2.read_bytes() == model and os.stat(path2).st_mode & 0o777 == 0o444
    assert v2.digest == digest(bytes(model))
    assert store.info("lab").current == 2
    assert store.overlay_base("lab", "super") is None           # consumed
    assert ("checksum", SIZE, SIZE) in seen and ("merge", SIZE, SIZE) in seen
    # pc-a kept running on v1: its disk is still v1 plus its own write
    plan = store.disk_for("lab", "pc-a")
    assert plan.version == 1
    ov = Overlay(plan.version_path, plan.overlay_path, base_id=plan.base_id)
    assert bytes(ov.read(1 * MiB, 4096)) == bytes(4096) and bytes(ov.read(0, 4096)) == b"a" * 4096
    ov.close()
    # a PC with no overlay powers on: it gets v2
    assert store.disk_for("lab", "pc-new").version == 2
    # the super PC goes on: v3 = v2 + its next writes, among them an UNMAP of the marker
    more = [((1 * MiB, 4096), None), (3 * MiB, b"three" * 1000)]
    write_pc(store, "lab", "super", more)
    apply(model, more)
    v3 = store.publish("lab", "super")
    assert store.version_path("lab", 3).read_bytes() == model
    assert v3.parent == 2
    assert [r.ok for r in store.verify("lab")] == [True, True, True]
    assert store.info("lab").versions[0].digest == v1_sum
    assert digest(store.version_path("lab", 1).read_bytes()) == v1_sum


def test_a_login_s_reads_of_the_manifest_follow_every_change_made_elsewhere(store, tmp_path):
    """current, version_path and base_id read a parsed manifest kept while its file is the same: a change by
    another ImageStore (the controller's, in another process) is seen at the next call."""
    store.create("img", SIZE)
    write_pc(store, "img", "super", [(0, b"s" * 4096)])
    assert store.current("img") == 1 and store.base_id("img", 1).startswith("img@1:")
    other = ImageStore(tmp_path / "state" / "images")
    other.publish("img", "super")
    assert store.current("img") == 2 and store.version_path("img").name == "2.raw"
    assert store.base_id("img", 2) == other.base_id("img", 2)
    other.rollback("img", 1)
    assert store.current("img") == 1 and store.version_path("img").name == "1.raw"


def test_rollback_prune_and_what_prune_keeps(store):
    store.create("img", SIZE, keep_versions=1)
    for i in range(4):
        write_pc(store, "img", "super", [(i * 4096, bytes([i + 1]) * 4096)])
        store.publish("img", "super")
    assert [v.n for v in store.info("img").versions] == [1, 2, 3, 4, 5]
    write_pc(store, "img", "persist", [(0, b"p" * 512)])        # an overlay on v5
    store.rollback("img", 2)
    assert store.info("img").current == 2 and store.disk_for("img", "fresh").version == 2
    assert store.disk_for("img", "persist").version == 5        # a persistent PC keeps its version
    with pytest.raises(ImageStoreError, match="has no version 9"):
        store.rollback("img", 9)
    gone = store.prune("img", in_use={3})
    # keep: the last 1 (5), current (2), in use (3), under an overlay (5); v1 and v4 go
    assert gone == [1, 4]
    assert [v.n for v in store.info("img").versions] == [2, 3, 5]
    assert sorted(p.name for p in (store.root / "img" / "versions").iterdir()) == ["2.raw", "3.raw", "5.raw"]
    # numbers are never reused
    write_pc(store, "img", "super", [(0, b"z" * 4096)])
    assert store.publish("img", "super").n == 6


def test_verify_finds_a_changed_or_missing_version(store):
    store.create("v", SIZE)
    write_pc(store, "v", "super", [(0, b"x" * 4096)])
    store.publish("v", "super")
    path = store.version_path("v", 1)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"tampered")
    results = store.verify("v")
    assert not results[0].ok and "writable" in results[0].problem and results[1].ok
    os.chmod(path, 0o444)
    assert "digest" in store.verify("v")[0].problem
    store.version_path("v", 2).unlink()
    assert "missing" in store.verify("v")[1].problem


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vpc"])
def test_export_compares_equal_to_the_version(store, tmp_path, fmt):
    store.create("e", SIZE)
    writes = [(4096, os.urandom(8192)), (5 * MiB + 512, os.urandom(1000))]
    write_pc(store, "e", "super", writes)
    store.publish("e", "super")
    expected = tmp_path / "expected.raw"
    model = bytearray(SIZE)
    apply(model, writes)
    expected.write_bytes(model)
    out = tmp_path / f"out.{fmt}"
    seen = []
    store.export("e", out, fmt=fmt, progress=lambda d, t, p: seen.append((d, t)))
    assert seen[-1] == (SIZE, SIZE)
    qemu_img("compare", "-f", "raw", "-F", fmt, str(expected), str(out))  # exit 0: identical
    info = json.loads(qemu_img("info", "--output=json", str(out)).stdout)
    assert info["format"] == fmt and info["virtual-size"] == SIZE
    if fmt == "qcow2":
        qemu_img("check", str(out))  # exit 0: no errors, no leaks
    zeros = tmp_path / "zeros.raw"
    zeros.write_bytes(bytes(SIZE))
    store.export("e", tmp_path / f"v1.{fmt}", version=1, fmt=fmt)  # an older version: still v1's content
    qemu_img("compare", "-f", "raw", "-F", fmt, str(zeros), str(tmp_path / f"v1.{fmt}"))


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vpc", "vhdx", "vmdk"])
def test_import_of_each_format_qemu_img_makes(store, tmp_path, fmt):
    raw = tmp_path / "src.raw"
    content = random_raw(raw, SIZE)
    if fmt == "raw":
        src = raw
    else:
        src = tmp_path / f"src.{fmt}"
        opts = ["-o", "subformat=dynamic,force_size=on"] if fmt == "vpc" else []
        qemu_img("create", "-f", fmt, *opts, str(src), str(SIZE))     # made by qemu-img create ...
        qemu_img("convert", "-n", "-f", "raw", "-O", fmt, str(raw), str(src))  # ... filled by convert
    seen = []
    v = store.import_file(f"imp-{fmt}", src, progress=lambda d, t, p: seen.append((p, d, t)))
    path = store.version_path(f"imp-{fmt}")
    assert path.read_bytes() == content and v.size == SIZE
    assert v.digest == digest(content) and v.source.startswith(f"import {src.name}")
    assert os.stat(path).st_blocks * 512 < SIZE  # holes kept (or made: qemu-img writes zeros sparse)
    phase = "copy" if fmt == "raw" else "convert"
    assert (phase, SIZE, SIZE) in seen
    qemu_img("compare", "-f", "raw", "-F", fmt, str(path), str(src))


def test_import_refuses_what_it_cannot_read(store, tmp_path):
    with pytest.raises(ImageStoreError, match="is not a file"):
        store.import_file("x", tmp_path / "none.img")
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(ImageStoreError, match="not a positive multiple of 512"):
        store.import_file("x", odd)
    assert not store.exists("x")


def test_a_missing_qemu_img_is_named(tmp_path):
    s = ImageStore(tmp_path / "images", qemu_img=str(tmp_path / "no-qemu-img"))
    (tmp_path / "a.raw").write_bytes(bytes(4096))
    with pytest.raises(ImageStoreError, match="qemu-utils"):
        s.import_file("a", tmp_path / "a.raw")


def test_the_reserve_refuses_store_changes_and_overlay_writes(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    s = ImageStore(tmp_path / "images", reserve=free + (1 << 30))
    with pytest.raises(SpaceError, match="reserve"):
        s.create("big", SIZE)
    ok = ImageStore(tmp_path / "images2")
    ok.create("img", SIZE)
    plan = ok.disk_for("img", "pc")
    guard = ImageStore(tmp_path / "images2", reserve=free + (1 << 30)).space_guard
    ov = Overlay(plan.version_path, plan.overlay_path, base_id=plan.base_id, space_guard=guard)
    try:
        with pytest.raises(OverlayFull) as exc:
            ov.write(0, b"x" * 4096)
        assert exc.value.reason == "reserve"
    finally:
        ov.close()


def test_overlay_reset_size_and_debris(store):
    store.create("r", SIZE)
    write_pc(store, "r", "pc1", [(0, b"x" * 64 * KiB)])
    assert store.overlay_size("r", "pc1") >= 64 * KiB
    info = store.info("r")
    assert [(o.pc, o.base_version) for o in info.overlays] == [("pc1", 1)]
    assert store.overlay_reset("r", "pc1") is True and store.overlay_size("r", "pc1") == 0
    assert store.overlay_reset("r", "pc1") is False
    (store.root / "r" / "versions" / "7.raw.tmp").write_bytes(b"half a publish")
    store.prune("r")
    assert not (store.root / "r" / "versions" / "7.raw.tmp").exists()
    with pytest.raises(ImageStoreError, match="PC name"):
        store.overlay_path("r", "../etc")
    with pytest.raises(ImageStoreError, match="has no overlay"):
        store.publish("r", "pc1")
    write_pc(store, "r", "pc2", [(0, b"y" * 512)])
    bm = store.root / "r" / "overlays" / "pc2.bitmap"
    raw = bytearray(bm.read_bytes())
    raw[:8] = b"NOTOURS!"
    bm.write_bytes(raw)
    with pytest.raises(ImageStoreError, match="pc2's overlay bitmap is unreadable"):
        store.disk_for("r", "pc2")
    assert bm.exists()  # never thrown away behind the PC's back


def test_an_open_overlay_is_neither_published_nor_reset_nor_opened_twice(store, tmp_path):
    store.create("busy", SIZE)
    plan = store.disk_for("busy", "super")
    ov = Overlay(plan.version_path, plan.overlay_path, base_id=plan.base_id)
    try:
        ov.write(0, b"x" * 4096)
        assert store.overlay_in_use("busy", "super")
        with pytest.raises(ImageStoreError, match="open in a target"):
            store.publish("busy", "super")
        with pytest.raises(ImageStoreError, match="open in a target"):
            store.overlay_reset("busy", "super")
        with pytest.raises(OverlayError, match="open elsewhere"):  # a second target process, or this one twice
            Overlay(plan.version_path, plan.overlay_path, base_id=plan.base_id)
        other = subprocess.run(
            [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
             "from services.iscsi_target.scsi.overlay import Overlay, OverlayError\n"
             "try:\n Overlay(sys.argv[2], sys.argv[3])\nexcept OverlayError as e:\n print(e)",
             str(ROOT), str(plan.version_path), str(plan.overlay_path)], capture_output=True, text=True)
        assert "open elsewhere" in other.stdout, other.stderr
    finally:
        ov.close()
    assert not store.overlay_in_use("busy", "super")
    assert store.publish("busy", "super").n == 2
