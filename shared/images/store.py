"""The image store: named images, each a chain of immutable, flat versions, and the PCs' overlays on them.

On disk, under the state directory (docs/images.md, "On disk"):

    images/<name>/image.json            the manifest: size, current version, keep_versions, versions with digests
    images/<name>/versions/<n>.raw      version n: a whole raw disk (sparse), chmod 0444, never written again
    images/<name>/overlays/<pc>.overlay a PC's copy-on-write data (sparse, at the disk's own offsets)
    images/<name>/overlays/<pc>.bitmap  its granule bitmap (shared/images/overlay_format.py)
    images/<name>/.lock                 flock'd by every change of the manifest

Every version is flat: publishing copies the version below (a reflink where the file system has them,
else a sparse copy of its data extents) and merges the overlay's granules into it, so a read of version 9
costs what a read of version 1 does (one bitmap test in the PC's overlay, then the version's mapping) and
prune merges nothing: it deletes files. The price is space: on ext4 each version takes the space of its
data (measured in docs/images.md); on XFS/btrfs the copy is a reflink and only the changed extents cost.

The manifest is replaced atomically (shared/atomic_file.py) after the version file it names is complete,
fsync'd, read-only and renamed into place, so a crash leaves either the old manifest or the new one; a
`<n>.raw.tmp` or a version file the manifest does not name is debris a later change removes.

The controller owns the store (its commands change it); the iSCSI target only opens versions read-only
and overlays read-write (`disk_for`). An open overlay holds an flock on its bitmap; publish and reset take
the same lock and refuse while a target holds it, so neither happens under a running PC.

This module holds the manifest and the versions' life (create, import, publish, rollback, prune, verify,
export); the bytes of version files (copy, merge, checksum) are in version_files.py, an overlay's files
as the store sees them (and the SpaceGuard) in overlays.py, qemu-img in qemu_img.py, the errors in errors.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.atomic_file import write_atomic
from shared.images import overlay_format as F
from shared.images import overlays
from shared.images import qemu_img as qemu
from shared.images import version_files as vf
from shared.images.errors import ImageStoreError, SpaceError
from shared.images.overlays import SpaceGuard
from shared.images.qemu_img import EXPORT_FORMATS, IMPORT_FORMATS
from shared.images.version_files import CHUNK

__all__ = ["ImageStore", "ImageStoreError", "SpaceError", "SpaceGuard", "Version", "OverlayInfo", "ImageInfo",
           "VerifyResult", "DiskPlan", "IMPORT_FORMATS", "EXPORT_FORMATS", "DEFAULT_KEEP", "CHUNK"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")       # short enough for a base id in 64 bytes
PC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST = "image.json"
DEFAULT_KEEP = 3


@dataclass(frozen=True)
class Version:
    n: int
    size: int
    digest: str          # hex; see version_files.digest: a sha256 over the sha256 of each MiB
    created: float
    parent: int | None
    source: str          # "create", "import <file>", "publish <pc>"


@dataclass(frozen=True)
class OverlayInfo:
    pc: str
    base_version: int | None   # None: the bitmap is unreadable
    allocated: int             # bytes the overlay takes on disk (data + bitmap)
    path: str


@dataclass(frozen=True)
class ImageInfo:
    name: str
    size: int
    current: int
    keep_versions: int
    versions: list[Version]
    overlays: list[OverlayInfo] = field(default_factory=list)
    disk_usage: dict = field(default_factory=dict)   # version -> bytes on disk

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VerifyResult:
    n: int
    ok: bool
    problem: str = ""    # "" when ok


@dataclass(frozen=True)
class DiskPlan:
    """What the iSCSI target opens for a PC: `Overlay(version_path, overlay_path, base_id=base_id)`."""
    image: str
    version: int
    version_path: Path
    overlay_path: Path
    base_id: str


def _progress_none(done: int, total: int, phase: str) -> None:
    pass


class ImageStore:
    """All images under `root` (the state directory's `images/`). `reserve`: bytes of free space that no
    image operation or overlay write may take (SpaceError, OverlayFull with reason "reserve")."""

    def __init__(self, root: str | os.PathLike, reserve: int = 0, qemu_img: str = "qemu-img"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.reserve = reserve
        self.qemu_img = qemu_img
        self.space_guard = SpaceGuard(self.root, reserve)
        self._views: dict[str, tuple] = {}  # name -> (the manifest file's identity, its parsed content)

    @classmethod
    def for_state_dir(cls, state_dir: str | os.PathLike, reserve: int = 0) -> "ImageStore":
        return cls(Path(state_dir) / "images", reserve)

    # ------------------------------------------------------------------ paths, manifest
    def _dir(self, name: str) -> Path:
        if not NAME_RE.match(name or ""):
            raise ImageStoreError(f"image name {name!r}: use 1..40 of a-z 0-9 . _ - (starting with a letter or digit)")
        return self.root / name

    def version_path(self, name: str, n: int | None = None) -> Path:
        m = self._manifest_view(name)
        n = m["current"] if n is None else n
        self._version(m, n)
        return self._dir(name) / "versions" / f"{n}.raw"

    def overlay_path(self, name: str, pc: str) -> Path:
        if not PC_RE.match(pc or ""):
            raise ImageStoreError(f"PC name {pc!r}: use 1..64 of A-Z a-z 0-9 . _ -")
        return self._dir(name) / "overlays" / f"{pc}.overlay"

    def base_id(self, name: str, n: int) -> str:
        """What an overlay's header records of the version below it: name, number and checksum prefix."""
        return f"{name}@{n}:{self._version(self._manifest_view(name), n)['digest'][:16]}"

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def exists(self, name: str) -> bool:
        return (self._dir(name) / MANIFEST).is_file()

    def _manifest(self, name: str) -> dict:
        path = self._dir(name) / MANIFEST
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ImageStoreError(f"image {name!r} does not exist") from None

    def _manifest_view(self, name: str) -> dict:
        """The manifest, to read and never to change: parsed once while its file stays the same (each write
        replaces the file, by rename), since a PC's login asks for it three times (version, path, base id)."""
        path = self._dir(name) / MANIFEST
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageStoreError(f"image {name!r} does not exist") from None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        seen = self._views.get(name)
        if seen is not None and seen[0] == key:
            return seen[1]
        m = self._manifest(name)
        self._views[name] = (key, m)
        return m

    def _write_manifest(self, name: str, m: dict) -> None:
        write_atomic(self._dir(name) / MANIFEST, json.dumps(m, indent=1, sort_keys=True) + "\n")

    @staticmethod
    def _version(m: dict, n: int) -> dict:
        for v in m["versions"]:
            if v["n"] == n:
                return v
        have = ", ".join(str(v["n"]) for v in m["versions"])
        raise ImageStoreError(f"image {m['name']!r} has no version {n} (versions: {have})")

    @contextmanager
    def _locked(self, name: str):
        d = self._dir(name)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield d
        finally:
            os.close(fd)

    def _need(self, nbytes: int, what: str) -> None:
        free = self.space_guard.free()
        if free - nbytes < self.reserve:
            raise SpaceError(f"{what} needs {nbytes} bytes; {free} are free and the reserve is {self.reserve}")

    # ------------------------------------------------------------------ reading the store
    def info(self, name: str) -> ImageInfo:
        m = self._manifest(name)
        d = self._dir(name)
        usage = {}
        for v in m["versions"]:
            try:
                usage[v["n"]] = os.stat(d / "versions" / f"{v['n']}.raw").st_blocks * 512
            except FileNotFoundError:
                usage[v["n"]] = 0
        return ImageInfo(m["name"], m["size"], m["current"], m["keep_versions"],
                         [Version(**v) for v in m["versions"]], self.overlays(name), usage)

    def current(self, name: str) -> int:
        """The image's current version (its manifest alone: what a PC's login needs, not `info`'s walk of
        every overlay)."""
        return int(self._manifest_view(name)["current"])

    def overlays(self, name: str) -> list[OverlayInfo]:
        d = self._dir(name) / "overlays"
        out = []
        for bm in sorted(d.glob("*.bitmap")) if d.is_dir() else []:
            pc = bm.stem
            out.append(OverlayInfo(pc, self.overlay_base(name, pc), self.overlay_size(name, pc),
                                   str(bm.with_suffix(".overlay"))))
        return out

    def overlay_base(self, name: str, pc: str) -> int | None:
        """The version a PC's overlay sits on (None: no overlay, or an unreadable one)."""
        base = overlays.base_id(self.overlay_path(name, pc))
        m = re.match(rf"^{re.escape(name)}@(\d+):", base) if base is not None else None
        return int(m.group(1)) if m else None

    def overlay_size(self, name: str, pc: str) -> int:
        """Bytes a PC's overlay takes on disk (its data file's blocks plus the bitmap's)."""
        return overlays.disk_usage(self.overlay_path(name, pc))

    def disk_for(self, name: str, pc: str) -> DiskPlan:
        """The version and overlay a PC's disk is made of: the version its overlay sits on if it has one
        (a persistent PC keeps its version until reset), else the current version (a new overlay)."""
        m = self._manifest(name)
        n = self.overlay_base(name, pc)
        if n is None:
            if F.bitmap_path(self.overlay_path(name, pc)).exists():
                raise ImageStoreError(f"image {name!r}: {pc}'s overlay bitmap is unreadable or not on this "
                                      f"image; `client reset` discards it")
            n = m["current"]
        elif not any(v["n"] == n for v in m["versions"]):
            raise ImageStoreError(f"image {name!r}: {pc}'s overlay sits on version {n}, which is gone; "
                                  f"`client reset` discards the overlay")
        return DiskPlan(name, n, self.version_path(name, n), self.overlay_path(name, pc), self.base_id(name, n))

    # ------------------------------------------------------------------ changing the store
    def create(self, name: str, size: int, keep_versions: int = DEFAULT_KEEP) -> Version:
        """A new image whose version 1 is an empty (sparse, all zeros) disk of `size` bytes."""
        if size <= 0 or size % 512:
            raise ImageStoreError(f"image {name!r}: size {size} is not a positive multiple of 512")
        return self._new_image(name, keep_versions, "create", lambda tmp, progress: os.truncate(tmp, size),
                               _progress_none, 0)

    def import_file(self, name: str, source: str | os.PathLike, keep_versions: int = DEFAULT_KEEP,
                    progress=_progress_none) -> Version:
        """A new image whose version 1 is `source`: raw as it is (holes kept); qcow2, VHD (vpc), VHDX and
        VMDK converted with `qemu-img convert`, whose progress goes to `progress(done, total, "convert")`."""
        source = Path(source)
        if not source.is_file():
            raise ImageStoreError(f"import: {source} is not a file")
        meta = self._qemu_info(source)
        fmt = meta.get("format")
        if fmt not in IMPORT_FORMATS:
            raise ImageStoreError(f"import: {source} is {fmt!r}; importable: {', '.join(IMPORT_FORMATS)}")
        size = os.path.getsize(source) if fmt == "raw" else int(meta["virtual-size"])  # qemu rounds raw up
        if size <= 0 or size % 512:
            raise ImageStoreError(f"import: {source} is {size} bytes, not a positive multiple of 512")
        need = int(meta.get("actual-size") or size)

        def fill(tmp: Path, progress) -> None:
            if fmt == "raw":
                with open(source, "rb") as src, open(tmp, "wb") as dst:
                    if not vf.reflink(src.fileno(), dst.fileno()):
                        vf.sparse_copy(src.fileno(), dst.fileno(), size, progress, "copy")
                    progress(size, size, "copy")
            else:
                self._convert(["-f", fmt, "-O", "raw", str(source), str(tmp)], size, progress)
            if os.path.getsize(tmp) != size:
                raise ImageStoreError(f"import: {source} converted to {os.path.getsize(tmp)} bytes, not {size}")

        return self._new_image(name, keep_versions, f"import {source.name} ({fmt})", fill, progress, need)

    def _new_image(self, name: str, keep: int, source: str, fill, progress, need: int) -> Version:
        if keep < 1:
            raise ImageStoreError(f"image {name!r}: keep_versions {keep} must be at least 1")
        with self._locked(name) as d:
            if (d / MANIFEST).exists():
                raise ImageStoreError(f"image {name!r} already exists")
            self._need(need, f"image {name!r}")
            (d / "versions").mkdir(exist_ok=True)
            (d / "overlays").mkdir(exist_ok=True)
            tmp = d / "versions" / "1.raw.tmp"
            tmp.unlink(missing_ok=True)
            tmp.touch(mode=0o600)
            try:
                fill(tmp, progress)
                v = self._seal(name, tmp, 1, None, source, progress)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._write_manifest(name, {"name": name, "size": v.size, "current": 1, "keep_versions": keep,
                                        "next": 2, "versions": [asdict(v)]})
            return v

    def _seal(self, name: str, tmp: Path, n: int, parent: int | None, source: str, progress) -> Version:
        """fsync, checksum, chmod 0444 and rename a finished version file into place."""
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
            digest = vf.digest(fd, size, progress)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o444)
        final = tmp.with_name(f"{n}.raw")
        os.replace(tmp, final)
        vf.fsync_dir(final.parent)
        return Version(n, size, digest, time.time(), parent, source)

    def publish(self, name: str, pc: str, progress=_progress_none) -> Version:
        """The super PC's overlay becomes the next version, which becomes current; the overlay is reset.
        Refused while a target has the overlay open (the PC must be shut down). Running PCs are not
        touched: their version file stays as it was."""
        with self._locked(name) as d:
            m = self._manifest(name)
            path = self.overlay_path(name, pc)
            bm_path = F.bitmap_path(path)
            base_n = self.overlay_base(name, pc)
            if base_n is None:
                raise ImageStoreError(f"publish {name!r}: PC {pc!r} has no overlay on this image")
            base = self._version(m, base_n)
            with overlays.closed(path, f"publish {pc}'s overlay on {name!r}"):  # held to the end
                return self._publish(name, pc, m, d, path, base_n, base, progress)

    def _publish(self, name, pc, m, d, path, base_n, base, progress) -> Version:
        bm_path = F.bitmap_path(path)
        with open(bm_path, "rb") as bmf:
            header = F.read_header(bmf.fileno(), str(bm_path))
            if header.base_id != self.base_id(name, base_n):
                raise ImageStoreError(f"publish {name!r}: {pc}'s overlay sits on {header.base_id!r}, "
                                      f"which is not version {base_n} as the manifest has it")
            bits = F.read_bits(bmf.fileno(), header)
        n = m.get("next", max(v["n"] for v in m["versions"]) + 1)
        self._sweep(d, m)
        base_path = d / "versions" / f"{base_n}.raw"
        self._need(os.stat(path).st_blocks * 512 if vf.can_reflink(base_path, d) else
                   os.stat(base_path).st_blocks * 512 + os.stat(path).st_blocks * 512, f"publish {name!r}")
        tmp = d / "versions" / f"{n}.raw.tmp"
        tmp.unlink(missing_ok=True)
        try:
            with open(base_path, "rb") as src, open(tmp, "wb") as dst, open(path, "rb") as ov:
                if not vf.reflink(src.fileno(), dst.fileno()):
                    vf.sparse_copy(src.fileno(), dst.fileno(), base["size"], progress, "copy")
                vf.merge(ov.fileno(), dst.fileno(), bits, header, progress)
            v = self._seal(name, tmp, n, base_n, f"publish {pc}", progress)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        m["versions"].append(asdict(v))
        m["current"], m["next"] = n, n + 1
        # a crash between these two leaves the overlay beside the version made from it: the super PC then
        # boots the old version plus the same overlay (the same disk), and its next publish includes it again
        self._write_manifest(name, m)
        self._remove_overlay(path)
        return v

    def rollback(self, name: str, n: int) -> None:
        """Version n becomes current: PCs get it at their next power-on."""
        with self._locked(name):
            m = self._manifest(name)
            self._version(m, n)
            if not (self._dir(name) / "versions" / f"{n}.raw").is_file():
                raise ImageStoreError(f"image {name!r}: version {n}'s file is missing (run image verify)")
            m["current"] = n
            self._write_manifest(name, m)

    def set_keep_versions(self, name: str, keep: int) -> None:
        if keep < 1:
            raise ImageStoreError(f"image {name!r}: keep_versions {keep} must be at least 1")
        with self._locked(name):
            m = self._manifest(name)
            m["keep_versions"] = keep
            self._write_manifest(name, m)

    def prune(self, name: str, in_use=()) -> list[int]:
        """Delete versions older than the last keep_versions, never the current one, one in `in_use` (the
        versions running PCs booted), or one an overlay on disk sits on. Returns the versions deleted."""
        with self._locked(name) as d:
            m = self._manifest(name)
            numbers = sorted(v["n"] for v in m["versions"])
            keep = set(numbers[-m["keep_versions"]:]) | {m["current"]} | set(in_use)
            keep |= {o.base_version for o in self.overlays(name) if o.base_version is not None}
            gone = [n for n in numbers if n not in keep]
            if gone:
                m["versions"] = [v for v in m["versions"] if v["n"] not in gone]
                self._write_manifest(name, m)  # first: a crash then leaves files nobody names, not names without files
                for n in gone:
                    (d / "versions" / f"{n}.raw").unlink(missing_ok=True)
            self._sweep(d, m)
            return gone

    def verify(self, name: str, progress=_progress_none) -> list[VerifyResult]:
        """Each version's file against the manifest: present, read-only, its size and its digest."""
        m = self._manifest(name)
        out = []
        for v in m["versions"]:
            path = self._dir(name) / "versions" / f"{v['n']}.raw"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                out.append(VerifyResult(v["n"], False, f"{path} is missing"))
                continue
            try:
                st = os.fstat(fd)
                if st.st_mode & 0o222:
                    out.append(VerifyResult(v["n"], False, f"{path} is writable (mode {st.st_mode & 0o777:o})"))
                elif st.st_size != v["size"]:
                    out.append(VerifyResult(v["n"], False, f"{path} is {st.st_size} bytes, not {v['size']}"))
                else:
                    digest = vf.digest(fd, st.st_size, progress)
                    ok = digest == v["digest"]
                    out.append(VerifyResult(v["n"], ok, "" if ok else f"digest {digest}, recorded {v['digest']}"))
            finally:
                os.close(fd)
        return out

    def export(self, name: str, dest: str | os.PathLike, version: int | None = None, fmt: str = "raw",
               progress=_progress_none) -> Path:
        """A version written to `dest` as raw, qcow2 or vpc (dynamic VHD of exactly the disk's size)."""
        if fmt not in EXPORT_FORMATS:
            raise ImageStoreError(f"export: format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")
        src = self.version_path(name, version)
        dest = Path(dest)
        opts = ["-o", "subformat=dynamic,force_size=on"] if fmt == "vpc" else []
        self._convert(["-f", "raw", "-O", fmt, *opts, str(src), str(dest)], os.path.getsize(src), progress)
        return dest

    def overlay_reset(self, name: str, pc: str) -> bool:
        """Delete a PC's overlay (its next disk starts clean on the then current version). Refused while a
        target has it open (a session may be logged in). True when there was one."""
        self._manifest(name)
        path = self.overlay_path(name, pc)
        with overlays.closed(path, f"reset {pc}'s overlay on {name!r}"):
            return self._remove_overlay(path)

    def overlay_in_use(self, name: str, pc: str) -> bool:
        """True while a target process has the PC's overlay open."""
        try:
            with overlays.closed(self.overlay_path(name, pc), "probe"):
                return False
        except ImageStoreError:
            return True

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _remove_overlay(path: Path) -> bool:
        return overlays.remove(path)

    @staticmethod
    def _sweep(d: Path, m: dict) -> None:
        named = {f"{v['n']}.raw" for v in m["versions"]}
        for p in (d / "versions").iterdir():
            if p.name not in named and (p.suffix in (".raw", ".tmp")):
                p.unlink(missing_ok=True)

    def _qemu_info(self, path: Path) -> dict:
        return qemu.info(self.qemu_img, path)

    def _convert(self, args: list[str], total: int, progress) -> None:
        qemu.convert(self.qemu_img, args, total, progress)
