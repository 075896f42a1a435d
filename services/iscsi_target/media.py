"""Opening the backstores that are more than one image file — block devices, mirrors, CD/DVD drives — from
their config, and applying a new ISO to a running CD/DVD LU (the service's glue calls in here).

Mirrors. Each mirror keeps a small state file, `<state_dir>/mirrors/<id>.json` (id: a hash of its legs'
descriptions), naming the legs that are out of sync; a leg dropped at run time is written there before
the failing write is acknowledged, so after a restart the stale leg stays out until it is resynced. A file
leg that is missing while the other exists is created empty and starts out of sync (never served as if it
held the data). A leg that cannot be opened at all leaves the mirror degraded, serving from the other.
Leg failures and resyncs are reported through `mirror_events` (set by the service; default: logged).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from shared.paths import state_path

TYPES = ("block", "mirror", "cdrom")
log = logging.getLogger("iscsi_target.media")


class MirrorEvents:
    """What the service hears from its mirrors (override, or set callables): all called from I/O threads."""

    def leg_failed(self, mirror, index: int, name: str, reason: str) -> None:
        log.warning("mirror %s: leg %d (%s) dropped: %s; serving from the other leg", mirror, index, name, reason)

    def resync_progress(self, mirror, index: int, done: int, total: int) -> None:
        pass

    def resync_done(self, mirror, index: int, name: str) -> None:
        log.info("mirror %s: leg %d (%s) is in sync again", mirror, index, name)


mirror_events = MirrorEvents()
mirror_luns: dict[str, tuple[str, int]] = {}  # mirror id -> (target, LUN), filled by the service's build_lun


def _block(spec, readonly: bool | None = None):
    from services.iscsi_target.scsi.block_device import BlockBackstore

    # block_size None (not given, also in a published revision): the device's own logical block size
    return BlockBackstore(spec.path, block_size=spec.block_size,
                          readonly=spec.readonly if readonly is None else readonly,
                          direct=spec.direct, write_through=spec.write_through)


def _leg_name(spec, state_dir: Path) -> str:
    if spec.type == "ram":
        return f"ram:{spec.size}"
    return str(state_path(state_dir, spec.path)) if spec.type == "file" else spec.path


def open_backstore(spec, state_dir: Path):
    """The Backstore of a block or mirror spec (a cdrom LU is built whole by build_cdrom)."""
    if spec.type == "block":
        return _block(spec)
    if spec.type == "mirror":
        return _mirror(spec, state_dir)
    raise ValueError(f"{spec.type} is not a media backstore here")


def _mirror(spec, state_dir: Path):
    from services.iscsi_target.scsi import RamBackstore
    from services.iscsi_target.scsi.backstore import BackstoreError
    from services.iscsi_target.scsi.mirror import MirrorBackstore
    from services.iscsi_target.scsi.pread_file import PreadFileBackstore

    names = [_leg_name(leg, state_dir) for leg in spec.legs]
    ident = hashlib.sha256("\0".join(names).encode()).hexdigest()[:16]
    state_file = Path(state_dir) / "mirrors" / f"{ident}.json"
    state_file.parent.mkdir(parents=True, exist_ok=True)
    # a leg that starts empty (RAM, a file created now) beside one that holds data is out of sync
    existing = [leg.type == "block" or leg.type == "file" and state_path(state_dir, leg.path).exists()
                for leg in spec.legs]
    failed = [i for i, held in enumerate(existing) if not held] if any(existing) else []
    legs: list = [None, None]
    # legs that know their size first (a device, an existing file, a sized leg); then the others take it
    order = sorted(range(2), key=lambda i: not (existing[i] or spec.legs[i].size))
    for i in order:
        leg = spec.legs[i]
        size = leg.size or next((other.size for other in legs if other is not None), None)
        try:
            if leg.type == "ram":
                if not size:
                    raise BackstoreError("a RAM leg needs a size (or the other leg's)")
                legs[i] = RamBackstore(size, block_size=leg.block_size)
            elif leg.type == "block":
                legs[i] = _block(leg, readonly=False)
            else:
                path = state_path(state_dir, leg.path)
                path.parent.mkdir(parents=True, exist_ok=True)
                legs[i] = PreadFileBackstore(str(path), size, block_size=leg.block_size, sparse=leg.sparse,
                                             create=leg.create, write_through=spec.write_through)
        except BackstoreError as exc:
            log.warning("mirror %s: leg %d (%s) cannot be opened: %s; the mirror starts degraded", ident, i,
                        names[i], exc)
    if all(leg is None for leg in legs):
        raise BackstoreError(f"mirror of {names[0]} and {names[1]}: neither leg can be opened")
    m = MirrorBackstore(legs, names=names, state_file=state_file, write_through=spec.write_through, failed=failed,
                        on_leg_failed=lambda i, name, reason: mirror_events.leg_failed(ident, i, name, reason))
    m.on_resync_done = lambda i, name: mirror_events.resync_done(ident, i, name)
    m.ident = ident
    m.leg_specs = list(spec.legs)
    m.readonly = spec.readonly or m.readonly
    return m


def reopen_leg(mirror, index: int, state_dir: Path):
    """A fresh Backstore for leg `index` of a mirror (to resync onto): its file is recreated if it is gone."""
    from services.iscsi_target.scsi.pread_file import PreadFileBackstore
    from services.iscsi_target.scsi import RamBackstore

    leg = mirror.leg_specs[index]
    if leg.type == "ram":
        return RamBackstore(mirror.size, block_size=mirror.block_size)
    if leg.type == "block":
        return _block(leg, readonly=False)
    return PreadFileBackstore(str(state_path(state_dir, leg.path)), mirror.size, block_size=mirror.block_size,
                              sparse=leg.sparse, write_through=mirror.write_through)


def resync(mirror, index: int, state_dir: Path, progress=None) -> None:
    """Rebuild leg `index` while the LUN serves (blocking: run it in a thread); a missing or replaced file
    leg is reopened first."""
    old = mirror.legs[index]
    fresh = None
    if old is None or (hasattr(old, "gone") and old.gone()):
        fresh = reopen_leg(mirror, index, state_dir)
    mirror.resync(index, leg=fresh, progress=progress or (
        lambda done, total: mirror_events.resync_progress(mirror.ident, index, done, total)))


def build_cdrom(spec, lun_id: int, state_dir: Path):
    from services.iscsi_target.scsi.mmc import CdromUnit, open_iso

    return CdromUnit(open_iso(state_path(state_dir, spec.path)), lun_id)


def change_medium(lu, old_spec, new_spec, state_dir: Path) -> bool:
    """A cdrom LUN whose ISO changed gets the new disc in place (a media change: unit attention 28h/00h, the
    sessions stay); True when done so, False when the LUN must be rebuilt instead."""
    from services.iscsi_target.scsi.mmc import CdromUnit, open_iso

    if lu is None or not isinstance(lu, CdromUnit) or old_spec.type != "cdrom" or new_spec.type != "cdrom":
        return False
    lu.change_medium(open_iso(state_path(state_dir, new_spec.path)))
    log.info("LUN %d: new disc %s", lu.lun_id, new_spec.path)
    return True
