"""The PCs on images (issue 13, docs/images.md): one target per PC, whose LUN 0 is the PC's disk.

Each `clients[]` entry with an `image` becomes an ordinary target of the registry (so the owner model of
owners.py applies to it as to any other), named `pc_target_iqn` (shared/boot.py), with a policy that admits
only that PC: its initiator name (`pc_initiator_iqn`, which DHCP option 203 gave it) or its address (its
`clients[].ip`, or the address DHCP leased to its MAC). What its LUN 0 is depends on the PC's mode:

- discard, persistent, super: an `Overlay` (scsi/overlay.py) of the PC over the version it booted
  (durable, i.e. fsync'd at SYNCHRONIZE CACHE and FUA, except in discard mode);
- readonly: the version itself (`BaseImage`): writes fail DATA PROTECT / WRITE PROTECTED;
- refuse: no disk; a login is refused (0x0201).

The disk is opened at the first login and closed when the PC's last session ends, so that the image
store can publish or reset it (an open overlay holds an flock). Each session is recorded with the power-on
(`boot` of `pcboot/<mac>`, which the controller sets when the PC powers on, in `ctx.pcboot`) it logged in
under. A login of a newer power-on than the one the overlay was made for resets a discard overlay before
the login completes. Sessions of an older power-on still logged in are dead (a PC cannot keep a session
across its own power-on: a hard reset leaves the old TCP connection unnoticed until the NOP timeout), so
that login first closes them, as session reinstatement does, and waits for them to end; a session of the
same power-on (iPXE's, then the OS's; a reconnection after a network blip or a restart of this process)
never sees a reset. The boot is then recorded in `<state>/iscsi/pcs/<image>.<pc>.json`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from services.iscsi_target import events as ev
from services.iscsi_target.access import AccessPolicy
from services.iscsi_target.login import AUTH_FAILURE, TARGET_ERROR
from services.iscsi_target.scsi import LogicalUnit
from services.iscsi_target.scsi import sense as S
from services.iscsi_target.scsi.overlay import Overlay, open_base
from shared.atomic_file import write_atomic
from shared.boot import pc_initiator_iqn, pc_target_iqn
from shared.config.images import effective_mode, image_config, pc_name

log = logging.getLogger("bootfleet.iscsi_target.pc_disks")
FULL_EVENT_INTERVAL = 60.0  # seconds between two image.quota.reached events of one PC
STALE_WAIT = 10.0  # seconds a new power-on's login waits for its dead sessions' threads to let go


@dataclass(frozen=True)
class PcSpec:
    """What the configuration says of one PC on an image."""

    mac: str
    pc: str
    image: str
    target: str
    initiator: str
    mode: str
    ip: str | None
    quota: int | None
    soft_threshold: int | None


def pc_specs(config) -> list[PcSpec]:
    out = []
    for client in config.clients:
        if not client.image:
            continue
        image = image_config(config, client.image)
        out.append(PcSpec(client.mac, pc_name(client), client.image, pc_target_iqn(config, client),
                          pc_initiator_iqn(config, client), effective_mode(config, client), client.ip,
                          image.quota if image else None, image.soft_threshold_bytes if image else None))
    return out


class PcPolicy(AccessPolicy):
    """The global auth settings (CHAP, IP filters) plus: only this PC, by initiator name or by address."""

    def __init__(self, auth, spec: PcSpec, mac_for_ip):
        super().__init__(auth)
        self.spec = spec
        self.mac_for_ip = mac_for_ip

    def admit(self, initiator: str, ip: str) -> str | None:
        spec = self.spec
        if initiator.lower() != spec.initiator and ip != spec.ip and self.mac_for_ip(ip) != spec.mac:
            return (f"initiator {initiator} at {ip} is not PC {spec.pc} (initiator {spec.initiator}, "
                    f"MAC {spec.mac})")
        return super().admit(initiator, ip)


class PcDisk:
    """One PC's disk: LUN 0 of its target, open while a session of the PC is logged in."""

    def __init__(self, spec: PcSpec, store, state_dir: Path, pcboot, emit):
        self.spec = spec
        self.store = store          # shared.images.store.ImageStore
        self.state_dir = Path(state_dir)
        self.pcboot = pcboot        # () -> {mac: {image, version, boot, mode}}
        self.emit = emit
        self.scsi = None            # the target's ScsiTarget (set by the registry)
        self.lock = threading.Lock()
        self.ended = threading.Condition(self.lock)  # a session ended (a power-on's login waits for its dead ones)
        self.live: dict[object, int] = {}  # session's connection handle -> the power-on (boot) it logged in under
        self.lu = None
        self.backstore = None
        self.version: int | None = None
        self._full_at = -FULL_EVENT_INTERVAL

    # ------------------------------------------------------------------ sessions
    @property
    def sessions(self) -> int:
        return len(self.live)

    def login(self, handle=None, replaces=None) -> tuple[int, str] | None:
        """Before a login of this PC completes: the power-on reset, the disk opened. None, or (status,
        reason) to refuse the login. `handle`: the new session's connection (its `.abort(reason)` closes
        it); `replaces`: the handle of the session this login reinstates (same ISID), if any."""
        spec = self.spec
        if spec.mode == "refuse":
            return AUTH_FAILURE, f"PC {spec.pc} is set to refuse (mode refuse on image {spec.image})"
        with self.lock:
            try:
                boot = self._power_on(replaces)
                if self.lu is None:
                    self._open()
            except Exception as exc:  # noqa: BLE001 - the PC cannot boot: say why in its login failure
                log.error("PC %s: cannot open its disk on image %s: %s", spec.pc, spec.image, exc)
                return TARGET_ERROR, f"PC {spec.pc}'s disk on image {spec.image}: {exc}"
            self.live[handle if handle is not None else object()] = boot
            return None

    def session_ended(self, handle=None) -> None:
        with self.lock:
            if handle in self.live:
                del self.live[handle]
            elif handle is None:  # not named: the sessions whose connection is closing (io_loop's runners)
                for h in [h for h in self.live if getattr(getattr(h, "conn", None), "closing", True)]:
                    del self.live[h]
            self.ended.notify_all()
            if not self.live:
                self._close()

    def close(self) -> None:
        with self.lock:
            self._close()

    # ------------------------------------------------------------------ power-on
    def _state_path(self) -> Path:
        return self.state_dir / "iscsi" / "pcs" / f"{self.spec.image}.{self.spec.pc}.json"

    def _made_for(self) -> int | None:
        try:
            return int(json.loads(self._state_path().read_text())["boot"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def _boot(self) -> dict | None:
        info = self.pcboot().get(self.spec.mac)
        return info if isinstance(info, dict) and info.get("image") == self.spec.image else None

    def _power_on(self, replaces) -> int:
        """The reset rule (docs/images.md); returns the power-on this login is of. Called with the lock."""
        spec, info = self.spec, self._boot()
        made_for = self._made_for()
        if info is None:
            return made_for or 0
        boot = int(info["boot"])
        if made_for is not None and boot <= made_for:
            return made_for  # the same power-on: iPXE then the OS, a reconnection
        others = {h: b for h, b in self.live.items() if h is not replaces}  # a reinstated one is being replaced
        same = [h for h, b in others.items() if b >= boot]
        if not same and others and not self._end_dead(others, boot):
            same = list(others)  # they would not end: keep the overlay rather than reset under them
        if spec.mode == "discard":
            if same:
                log.warning("PC %s powered on (boot %d) while %d session(s) of it are still logged in: its "
                            "overlay is kept for this boot (never reset under a session)", spec.pc, boot, len(same))
            else:
                self._close()
                self.store.overlay_reset(spec.image, spec.pc)
                version = int(info.get("version") or self.store.current(spec.image))
                self.emit(ev.OverlayReset(mac=spec.mac, pc=spec.pc, image=spec.image, version=version,
                                          reason="power-on"))
        path = self._state_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        # a discard overlay is not fsync'd either: after a power loss both are moot (reset anyway)
        write_atomic(path, json.dumps({"boot": boot, "image": spec.image}).encode(), sync=spec.mode != "discard")
        return boot

    def _end_dead(self, dead: dict, boot: int) -> bool:
        """Close sessions of an older power-on than `boot` (the PC powered on since they logged in, so
        their initiator is gone) and wait for their connections to end; False if they did not in time."""
        log.warning("PC %s powered on (boot %d) with %d session(s) of its earlier power-on(s) %s still open: "
                    "closing them (a PC cannot keep a session across its own power-on)", self.spec.pc, boot,
                    len(dead), sorted(set(dead.values())))
        for handle, was in dead.items():
            abort = getattr(handle, "abort", None)
            if abort is not None:
                abort(f"PC {self.spec.pc} powered on again (boot {boot}): its session of boot {was} is dead")
        return self.ended.wait_for(lambda: not (dead.keys() & self.live.keys()), STALE_WAIT)

    # ------------------------------------------------------------------ the disk
    def _version(self) -> int:
        """The version to serve: the one the overlay sits on, else the one the PC powered on with, else
        the image's current version."""
        spec, store = self.spec, self.store
        if spec.mode != "readonly":
            n = store.overlay_base(spec.image, spec.pc)
            if n is not None:
                return n
        info = self._boot()
        if info is not None and info.get("version"):
            return int(info["version"])
        return store.current(spec.image)

    def _open(self) -> None:
        spec, store = self.spec, self.store
        n = self._version()
        if spec.mode == "readonly":
            backstore = open_base(store.version_path(spec.image, n))
            lu = LogicalUnit(backstore, 0, readonly=True)
        else:
            backstore = Overlay(store.version_path(spec.image, n), store.overlay_path(spec.image, spec.pc),
                                base_id=store.base_id(spec.image, n), durable=spec.mode != "discard",
                                quota=spec.quota, soft_threshold=spec.soft_threshold,
                                on_threshold=self._threshold, space_guard=store.space_guard)
            lu = LogicalUnit(backstore, 0)
            lu.on_space_error = self._full
        self.lu, self.backstore, self.version = lu, backstore, n
        self.scsi.add_lun(0, lu)
        log.info("PC %s: disk open on %s version %d (%s)", spec.pc, spec.image, n, spec.mode)

    def _close(self) -> None:
        if self.lu is None:
            return
        try:
            self.scsi.remove_lun(0)
        finally:
            try:
                self.backstore.close()  # an overlay syncs its bitmap and drops its flock
            finally:
                self.lu = self.backstore = None
        log.info("PC %s: disk closed", self.spec.pc)

    # ------------------------------------------------------------------ space
    def retune(self, spec: PcSpec) -> None:
        """A new revision's spec. Its quota and soft threshold apply to an open overlay at once (a lowered
        threshold already passed gives its unit attention now); a new mode at the disk's next open (the mode
        says what the disk is: the PC keeps the disk it powered on with while it runs)."""
        with self.lock:
            self.spec = spec
            overlay = self.backstore
            if not isinstance(overlay, Overlay):
                return
            crossed = spec.soft_threshold is not None and overlay.used >= spec.soft_threshold
            newly = crossed and not overlay.threshold_crossed
            overlay.quota, overlay.soft_threshold, overlay.threshold_crossed = spec.quota, spec.soft_threshold, crossed
        if newly:
            self._threshold(overlay)

    def _threshold(self, overlay) -> None:
        spec, lu = self.spec, self.lu
        if lu is not None:
            lu.add_ua_all(S.SOFT_THRESHOLD_REACHED)
        self.emit(ev.QuotaThreshold(mac=spec.mac, pc=spec.pc, image=spec.image, used=overlay.used,
                                    quota=spec.quota or 0))

    def _full(self, exc) -> None:
        now = time.monotonic()
        if now - self._full_at < FULL_EVENT_INTERVAL:
            return
        self._full_at = now
        spec = self.spec
        self.emit(ev.QuotaReached(mac=spec.mac, pc=spec.pc, image=spec.image, used=exc.used, quota=exc.limit,
                                  reason=exc.reason))


class PcDisks:
    """Every PC on an image this process knows, by target name; `build` brings them to a configuration."""

    def __init__(self, store, state_dir: Path, pcboot, emit, mac_for_ip):
        self.store = store
        self.state_dir = Path(state_dir)
        self.pcboot, self.emit, self.mac_for_ip = pcboot, emit, mac_for_ip
        self.disks: dict[str, PcDisk] = {}
        self.retiring: dict[str, PcDisk] = {}  # removed from the config, sessions still logged in
        self.lock = threading.Lock()

    def find(self, target: str) -> PcDisk | None:
        return self.disks.get(target) or self.retiring.get(target)

    def entries(self, config, old: dict, make_entry) -> dict:
        """The registry entries of the PCs of `config` (make_entry(name, alias, policy, disk, old_entry));
        keeps the disks of PCs still configured; a removed PC's disk stays until its sessions end."""
        reserve = config.image_store.reserve
        self.store.reserve = self.store.space_guard.reserve = reserve
        auth = config.iscsi.auth
        out, disks = {}, {}
        with self.lock:
            for spec in pc_specs(config):
                disk = self.disks.get(spec.target) or self.retiring.pop(spec.target, None)
                if disk is None:
                    disk = PcDisk(spec, self.store, self.state_dir, self.pcboot, self.emit)
                else:
                    disk.retune(spec)
                disks[spec.target] = disk
                out[spec.target] = make_entry(spec.target, spec.pc, PcPolicy(auth, spec, self.mac_for_ip), disk,
                                              old.get(spec.target))
            for name, disk in self.disks.items():
                if name not in disks and disk.sessions:
                    self.retiring[name] = disk
            self.disks = disks
        return out

    def session_ended(self, target: str, handle=None) -> None:
        disk = self.find(target)
        if disk is None:
            return
        disk.session_ended(handle)
        if disk.sessions == 0 and target not in self.disks:
            with self.lock:
                self.retiring.pop(target, None)

    def close(self) -> None:
        for disk in list(self.disks.values()) + list(self.retiring.values()):
            disk.close()
