"""The `image-*` commands and `client-reset`: images, their versions and the PCs' overlays (docs/images.md).

They are entries of the one command table (`commands.COMMANDS`, imported at the end of commands.py). The
image store (`shared/images/store.py`) does the work; what the controller adds is the configuration (an image
created or imported gets an `images[]` entry, as a new revision, like `service scale`) and what it knows of
the PCs (`pcboot.py`: their keys and sessions), so that a publish or a reset never happens under a running
PC and prune never deletes a version one booted.

Long work (import, export, publish, verify) runs on the image lane (`Facade.run_images`, a worker thread of
its own, so supervisord calls never wait behind a 40 GiB copy) and is answered at once with an operation id;
its progress and its end are `operation.progress` / `operation.finished` events with that `op`, which
`bootfleet` follows (docs/control.md, "Long operations"). Short changes (create, rollback, prune, reset) run on
the same lane and are answered when done: the store's per-image lock then never blocks the loop.
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from services.controller import events as cev
from services.controller.commands import EMPTY, SUCCESS, BadArgument, _commit, _mac_arg, command, error, ok
from services.controller.facade import Facade
from shared import events as ev
from shared.config.images import image_config
from shared.config.iscsi import parse_size
from shared.images.store import EXPORT_FORMATS, ImageStoreError

PROGRESS_EVERY = 1.0  # seconds between progress events of one operation (and at most one per 1 %)


# ---------------------------------------------------------------------------------------------- helpers
def _name(args: dict[str, Any], command: str) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not name:
        raise BadArgument(f"{command}: needs the image's name")
    return name


def _known(ctl: Facade, name: str, command: str) -> None:
    if not ctl.images.exists(name):
        have = ", ".join(ctl.images.names()) or "none"
        raise BadArgument(f"{command}: no image {name!r} in the store (images: {have})")


def _with_image(ctl: Facade, name: str, mode: str | None = None) -> dict[str, Any] | None:
    """The running configuration with an `images[]` entry for `name`, or None when it has one already."""
    if image_config(ctl.running, name) is not None:
        return None
    data = copy.deepcopy(ctl.config.data)
    entry: dict[str, Any] = {"name": name}
    if mode:
        entry["mode"] = mode
    data.setdefault("images", []).append(entry)
    return data


def _stage(ctl: Facade, data: dict[str, Any] | None) -> dict[str, Any] | None:
    """An error answer if the candidate would be refused (checked before the work, committed after)."""
    if data is None:
        return None
    from shared.config.loader import ConfigError

    try:
        ctl.config.stage(data)
    except ConfigError as exc:
        return error(f"configuration rejected, revision {ctl.config.revision} stays: {exc}", errors=exc.errors)
    return None


def _keep(ctl: Facade, name: str) -> int:
    image = image_config(ctl.running, name)
    return image.keep_versions if image else 3


class Progress:
    """The store's progress(done, total, phase) as operation.progress events, posted from the worker at most
    every PROGRESS_EVERY seconds or 1 %. Several phases (convert, then checksum) are one bar in percent."""

    def __init__(self, ctl: Facade, op: str, name: str, phases: tuple[str, ...] = (), total: int | None = None):
        self.ctl, self.op, self.name, self.phases = ctl, op, name, phases
        self.total = total  # several files one after another (verify): their sum
        self._sent_at = 0.0
        self._sent = -1.0
        self._base = 0  # verify: bytes of the versions already checksummed
        self._last = 0

    def __call__(self, done: int, total: int, phase: str) -> None:
        if self.total is not None:  # one file after another: `done` starts again at each
            if done < self._last:
                self._base += self._last
            self._last = done
            done, total, unit = self._base + done, self.total, "bytes"
        elif len(self.phases) > 1 and phase in self.phases:
            i = self.phases.index(phase)
            done, total, unit = int(100 * (i + (done / total if total else 1)) / len(self.phases)), 100, "%"
        else:
            unit = "bytes"
        frac = done / total if total else 0.0
        now = time.monotonic()
        if frac < 1.0 and now - self._sent_at < PROGRESS_EVERY and frac - self._sent < 0.01:
            return  # the end is always sent
        self._sent_at, self._sent = now, frac
        self.ctl.post(ev.OperationProgress(op=self.op, name=self.name, done=int(done), total=int(total), unit=unit))


def _long(ctl: Facade, envelope, args, name: str, what: str, work: Callable[[Progress], Any],
          done: Callable[[Any], str], failed: Callable[[], None] | None = None, progress: Progress | None = None,
          **answer: Any) -> dict[str, Any]:
    """Start `work` on the image lane; answer at once with the operation id. At its end (on the loop):
    `done(result)` gives the finished line (and does what the controller does after it)."""
    op = str(args.get("op") or uuid.uuid4().hex[:12])
    prog = progress or Progress(ctl, op, name)
    prog.op = op
    ctl.emit(ev.OperationProgress(op=op, name=name, done=0, total=None, unit="%" if len(prog.phases) > 1 else "bytes"))

    def finish(outcome: tuple[bool, Any]) -> dict[str, Any]:
        good, value = outcome
        if good:
            try:
                text = done(value)
            except Exception as exc:  # the work was done: say what failed after it
                good, text = False, f"{what}: {exc}"
        else:
            text = str(value)
            if failed:
                failed()
        ctl.emit(ev.OperationFinished(op=op, name=name, ok=good, text=text))
        return ok(text) if good else error(text)

    def run() -> tuple[bool, Any]:
        try:
            return True, work(prog)
        except (ImageStoreError, OSError) as exc:
            return False, f"{what}: {exc}"

    ctl.run_images(None, run, finish)
    return ok(f"{what} started (operation {op})", op=op, **answer)


def _short(ctl: Facade, envelope, work: Callable[[], Any], done: Callable[[Any], dict[str, Any]]) -> None:
    """A quick store change on the image lane, answered when it is done."""

    def run() -> tuple[bool, Any]:
        try:
            return True, work()
        except (ImageStoreError, OSError) as exc:
            return False, str(exc)

    ctl.run_images(envelope, run, lambda r: done(r[1]) if r[0] else error(r[1]))


def _pcs(ctl: Facade, name: str) -> list[dict[str, Any]]:
    rows = []
    for pc in ctl.pcboot.on_image(name):
        key = ctl.pcboot.keys.get(pc.mac) or {}
        rows.append({
            "mac": pc.mac, "pc": pc.pc, "mode": pc.mode, "target": pc.target,
            "version": key.get("version"), "boot": key.get("boot"), "sessions": ctl.pcboot.sessions(pc.mac),
            "overlay": ctl.images.overlay_size(name, pc.pc), "overlay_version": ctl.images.overlay_base(name, pc.pc),
        })
    return rows


# ---------------------------------------------------------------------------------------------- reading
@command("image-list")
def image_list(ctl, envelope, args):
    """Every image: current version, versions kept, size, default mode, PCs on it.

    Images in the store and images the configuration names (`in_store: false`: not created or imported yet)."""
    names = sorted(set(ctl.images.names()) | {i.name for i in ctl.running.images})
    rows = []
    for name in names:
        cfg = image_config(ctl.running, name)
        row: dict[str, Any] = {"name": name, "mode": cfg.mode if cfg else None, "configured": cfg is not None,
                               "in_store": ctl.images.exists(name), "pcs": len(ctl.pcboot.on_image(name))}
        if row["in_store"]:
            info = ctl.images.info(name)
            row.update(size=info.size, current=info.current, versions=[v.n for v in info.versions],
                       keep_versions=info.keep_versions, disk_usage=sum(info.disk_usage.values()))
        rows.append(row)
    return {"result": SUCCESS if rows else EMPTY, "text": f"{len(rows)} images", "arguments": {"images": rows}}


@command("image-info")
def image_info(ctl, envelope, args):
    """One image: its versions (size, digest, source, space on disk), which PC runs which version in which
    mode, with its sessions and overlay size.

    Arguments: `name`. `pcs[].version` is the version the PC booted last (its pcboot key); `overlay_version`
    the one its overlay on disk sits on."""
    name = _name(args, "image-info")
    _known(ctl, name, "image-info")
    info = ctl.images.info(name)
    cfg = image_config(ctl.running, name)
    versions = [{**v.__dict__, "disk_usage": info.disk_usage.get(v.n, 0), "current": v.n == info.current}
                for v in info.versions]
    image = {"name": name, "size": info.size, "current": info.current, "keep_versions": info.keep_versions,
             "mode": cfg.mode if cfg else None, "quota": cfg.quota if cfg else None,
             "versions": versions, "pcs": _pcs(ctl, name),
             "overlays": [o.__dict__ for o in info.overlays],
             "verified": VERIFIED.get(name)}
    return ok(f"image {name}: current version {info.current} (versions {', '.join(str(v.n) for v in info.versions)})",
              image=image)


VERIFIED: dict[str, dict[str, Any]] = {}  # image -> the last image-verify's results (image-info shows them)


# ---------------------------------------------------------------------------------------------- new images
@command("image-create")
def image_create(ctl, envelope, args):
    """Create an empty image (version 1: a sparse disk of all zeros) and add it to the configuration.

    Arguments: `name`, `size` (bytes or 40G / 40GiB), `mode` (the default mode of its PCs, optional)."""
    name = _name(args, "image-create")
    try:
        size = parse_size(args.get("size"))
    except ValueError as exc:
        return error(f"image-create: size: {exc}")
    data = _with_image(ctl, name, args.get("mode"))
    refused = _stage(ctl, data)
    if refused:
        return refused
    keep = _keep(ctl, name)

    def done(v) -> dict[str, Any]:
        revision = _commit_if(ctl, data)
        ctl.pcboot.refresh_image(name)
        return ok(f"image {name}: version 1, {size} bytes (revision {revision})", image=name, version=v.n,
                  size=v.size, digest=v.digest, revision=revision)

    _short(ctl, envelope, lambda: ctl.images.create(name, size, keep), done)
    return None


def _commit_if(ctl: Facade, data: dict[str, Any] | None) -> int:
    if data is None:
        return ctl.config.revision
    answer = _commit(ctl, data)
    if answer["result"] != SUCCESS:
        raise ImageStoreError(answer["text"])
    return answer["arguments"]["revision"]


@command("image-import")
def image_import(ctl, envelope, args):
    """Import a disk as a new image's version 1: raw as it is; qcow2, VHD, VHDX, VMDK through qemu-img convert.

    Arguments: `name`, `file` (a path the controller can read), `mode` (optional), `op` (the operation id its
    progress events carry; chosen here if not given). Answered at once with `op`; the image is added to the
    configuration when the import is done (operation.finished)."""
    name = _name(args, "image-import")
    source = args.get("file")
    if not isinstance(source, str) or not os.path.isabs(source):
        return error("image-import: `file` must be an absolute path the controller can read")
    if not os.path.isfile(source):
        return error(f"image-import: {source} is not a file")
    if ctl.images.exists(name):
        return error(f"image-import: image {name!r} already exists")
    data = _with_image(ctl, name, args.get("mode"))
    refused = _stage(ctl, data)
    if refused:
        return refused
    keep = _keep(ctl, name)

    def done(v) -> str:
        revision = _commit_if(ctl, data)
        ctl.pcboot.refresh_image(name)
        return f"image {name}: version 1 imported from {source} ({v.size} bytes, digest {v.digest[:16]}, revision {revision})"

    return _long(ctl, envelope, args, "image-import", f"import of {name}",
                 lambda p: ctl.images.import_file(name, source, keep, progress=p), done,
                 progress=Progress(ctl, "", "image-import", phases=("copy", "convert", "checksum")), image=name)


# ---------------------------------------------------------------------------------------------- versions
@command("image-publish")
def image_publish(ctl, envelope, args):
    """Make what the image's super PC wrote the next version, current for the PCs' next power-ons.

    Arguments: `name`, `pc` (optional: the super PC's name; default the image's super client), `op`.
    Refused while the super PC is logged in (shut it down first) and by the store while a target has its
    overlay open. Running PCs keep the version they booted."""
    name = _name(args, "image-publish")
    _known(ctl, name, "image-publish")
    pc = ctl.pcboot.super_of(name)
    pc_name = args.get("pc") or (pc.pc if pc else None)
    if not pc_name:
        return error(f"image-publish: image {name} has no super client (clients[].mode: super)")
    who = ctl.pcboot.pc_named(name, pc_name)
    if who and ctl.pcboot.logged_in(who.mac):
        return error(f"image-publish: {pc_name} ({who.mac}) is logged in ({ctl.pcboot.sessions(who.mac)} "
                     f"session(s)): shut it down first")
    base = ctl.images.overlay_base(name, pc_name)

    def done(v) -> str:
        size = ctl.images.info(name).disk_usage.get(v.n, 0)
        ctl.emit(cev.VersionPublished(image=name, version=v.n, pc=pc_name, size=size))
        if who:
            ctl.emit(cev.OverlayReset(mac=who.mac, pc=pc_name, image=name, version=base, reason="published"))
            ctl.pcboot.new_boot(who.mac)  # off: its next power-on starts on the new version
        return f"image {name}: version {v.n} published from {pc_name} (parent {v.parent}, digest {v.digest[:16]})"

    return _long(ctl, envelope, args, "image-publish", f"publish of {name}",
                 lambda p: ctl.images.publish(name, pc_name, progress=p), done,
                 progress=Progress(ctl, "", "image-publish", phases=("copy", "merge", "checksum")), image=name, pc=pc_name)


@command("image-rollback")
def image_rollback(ctl, envelope, args):
    """Make an older version current: PCs get it at their next power-on (running ones keep theirs).

    Arguments: `name`, `version`."""
    name = _name(args, "image-rollback")
    _known(ctl, name, "image-rollback")
    try:
        n = int(args.get("version"))
    except (TypeError, ValueError):
        return error("image-rollback: version must be a version number")

    def done(_) -> dict[str, Any]:
        ctl.emit(cev.Rollback(image=name, version=n))
        return ok(f"image {name}: version {n} is current (from the next power-on)", image=name, current=n)

    _short(ctl, envelope, lambda: ctl.images.rollback(name, n), done)
    return None


@command("image-prune")
def image_prune(ctl, envelope, args):
    """Delete the versions older than the image's last `keep_versions`, never the current one nor one a PC uses.

    Arguments: `name`. Kept: the last keep_versions (images[].keep_versions), the current version, every
    version a PC on the image booted last (its pcboot key: running PCs keep theirs), and every version an
    overlay on disk sits on."""
    name = _name(args, "image-prune")
    _known(ctl, name, "image-prune")
    keep = _keep(ctl, name)
    in_use = sorted(ctl.pcboot.in_use(name))

    def work() -> list[int]:
        if ctl.images.info(name).keep_versions != keep:
            ctl.images.set_keep_versions(name, keep)
        return ctl.images.prune(name, in_use=in_use)

    def done(gone: list[int]) -> dict[str, Any]:
        left = [v.n for v in ctl.images.info(name).versions]
        text = f"image {name}: deleted {', '.join(map(str, gone))}" if gone else f"image {name}: nothing to prune"
        return ok(f"{text}; versions {', '.join(map(str, left))}", image=name, deleted=gone, versions=left,
                  in_use=in_use)

    _short(ctl, envelope, work, done)
    return None


@command("image-verify")
def image_verify(ctl, envelope, args):
    """Check every version's file against its manifest: present, read-only, its size and its digest.

    Arguments: `name`, `op`. Answered at once with `op`; `operation.finished` says ok or names each bad
    version; `image-info` shows the last results (`verified`)."""
    name = _name(args, "image-verify")
    _known(ctl, name, "image-verify")
    total = sum(v.size for v in ctl.images.info(name).versions)

    def done(results) -> str:
        rows = [r.__dict__ for r in results]
        VERIFIED[name] = {"at": time.time(), "ok": all(r.ok for r in results), "versions": rows}
        bad = [f"version {r.n}: {r.problem}" for r in results if not r.ok]
        if bad:
            raise ImageStoreError(f"image {name}: " + "; ".join(bad))
        return f"image {name}: {len(results)} version(s) verified"

    return _long(ctl, envelope, args, "image-verify", f"verify of {name}",
                 lambda p: ctl.images.verify(name, progress=p), done,
                 progress=Progress(ctl, "", "image-verify", total=total), image=name)


@command("image-export")
def image_export(ctl, envelope, args):
    """Write a version to a file as raw, qcow2 or vpc (VHD), through qemu-img convert.

    Arguments: `name`, `file` (an absolute path; refused if it exists), `version` (default: current),
    `format` (raw, qcow2, vpc; default raw), `op`."""
    name = _name(args, "image-export")
    _known(ctl, name, "image-export")
    dest = args.get("file")
    fmt = args.get("format") or "raw"
    if not isinstance(dest, str) or not os.path.isabs(dest):
        return error("image-export: `file` must be an absolute path")
    if os.path.exists(dest):
        return error(f"image-export: {dest} exists (remove it first)")
    if fmt not in EXPORT_FORMATS:
        return error(f"image-export: format {fmt!r}: one of {', '.join(EXPORT_FORMATS)}")
    version = args.get("version")
    version = None if version in (None, "") else int(version)
    n = version or ctl.images.info(name).current

    def done(path: Path) -> str:
        return f"image {name}: version {n} written to {path} ({fmt}, {os.path.getsize(path)} bytes)"

    return _long(ctl, envelope, args, "image-export", f"export of {name}",
                 lambda p: ctl.images.export(name, dest, version=version, fmt=fmt, progress=p), done,
                 failed=lambda: Path(dest).unlink(missing_ok=True), image=name, version=n, file=dest)


# ---------------------------------------------------------------------------------------------- PCs
@command("client-reset")
def client_reset(ctl, envelope, args):
    """Empty a PC's overlay: it starts clean on the image's current version at its next power-on.

    Arguments: `mac`. Refused while the PC is logged in (and by the store while a target has its overlay
    open). Files an image.overlay.reset event (reason operator)."""
    mac = _mac_arg(args)
    pc = ctl.pcboot.pcs.get(mac)
    if pc is None:
        return error(f"client-reset: {mac} is not a PC on an image (clients[].image)")
    if ctl.pcboot.logged_in(mac):
        return error(f"client-reset: {pc.pc} ({mac}) is logged in ({ctl.pcboot.sessions(mac)} session(s)): "
                     "shut it down first")
    if not ctl.images.exists(pc.image):
        return error(f"client-reset: image {pc.image} is not in the store")
    base = ctl.images.overlay_base(pc.image, pc.pc)

    def done(existed: bool) -> dict[str, Any]:
        ctl.emit(cev.OverlayReset(mac=mac, pc=pc.pc, image=pc.image, version=base, reason="operator"))
        key = ctl.pcboot.new_boot(mac) or {}
        text = f"{pc.pc}: overlay on {pc.image} {'emptied' if existed else 'was empty'}; next power-on: version {key.get('version')}"
        return ok(text, mac=mac, pc=pc.pc, image=pc.image, had_overlay=existed, version=key.get("version"))

    _short(ctl, envelope, lambda: ctl.images.overlay_reset(pc.image, pc.pc), done)
    return None


def client_image_fields(ctl: Facade, mac: str) -> dict[str, Any]:
    """What `client-list` / `client-get` show of a PC on an image (nothing for one that is not)."""
    pc = ctl.pcboot.pcs.get(mac)
    if pc is None:
        return {}
    key = ctl.pcboot.keys.get(mac) or {}
    try:
        overlay = ctl.images.overlay_size(pc.image, pc.pc)
    except ImageStoreError:
        overlay = None
    return {"image": pc.image, "version": key.get("version"), "mode": pc.mode, "overlay": overlay,
            "sessions": ctl.pcboot.sessions(mac), "target": pc.target, "lun": 0}
