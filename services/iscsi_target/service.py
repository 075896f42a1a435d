"""The iSCSI target service, the process glue: builds targets and LUNs from the config, runs the I/O loop
(io_loop.py), emits the events the connections hand out (events.py) and the periodic I/O statistics.

A new configuration revision is applied without dropping sessions: targets that appear are served at
once; targets that disappear ask their initiators to log out (Async Message, then a close after a grace
period); LUNs are added to or removed from live targets; access settings apply to the next login;
portals are opened and closed. A LUN whose backstore settings change is replaced (its sessions see a
unit attention from the SCSI layer). Every `io_stats_interval` seconds each session reports, per LUN,
the commands, bytes and mean latency of the interval.

One owner per target (owners.py): each process holds the targets whose lock it took (owner_locks.py)
and opens their LUNs only then; a target it does not own is a name, an access policy and LUN specs, so
that a new owner (after the old one died) starts from the backstores on disk, never from a copy built
before the old owner's last writes, reservations or leg drops. At start and at each revision a process
claims the free targets it is the preferred owner of (hrw_order), so that ownership is settled before the
first login; others are claimed when a connection is handed over.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services.iscsi_target import events as ev
from services.iscsi_target import media
from services.iscsi_target.access import AccessPolicy
from services.iscsi_target import owners
from services.iscsi_target.handoff import Handoff
from services.iscsi_target.io_loop import Router, Server
from services.iscsi_target.owner_locks import OwnerLocks
from services.iscsi_target.pc_disks import PcDisks
from services.iscsi_target.scsi.opcodes import NAMES
from shared.events import OperationFinished, OperationProgress
from shared.iscsi_latency import BUCKETS
from shared.paths import state_path
from shared.service import BaseService

LOGOUT_GRACE = 3.0


@dataclass
class TargetEntry:
    name: str
    alias: str | None
    scsi: object  # scsi.ScsiTarget
    policy: AccessPolicy
    lun_specs: dict = field(default_factory=dict)  # lun id -> Backstore config (to detect changes)
    owned: bool = True  # False: another process may own it; its LUNs are not open here
    pc: object = None  # pc_disks.PcDisk: a PC on an image (its LUN 0 opens at its login)


class Registry:
    """What connections look up: targets by name, the discovery policy, portal addresses; and `claim`,
    which makes this process a target's owner (with `owners` unset every target is ours, as in a test)."""

    def __init__(self):
        self.targets: dict[str, TargetEntry] = {}
        self.discovery = None
        self.portals: list[tuple[str, int]] = []
        self.owners: OwnerLocks | None = None
        self.open_luns = None  # (entry) -> None: builds an entry's LUNs once it is ours
        self.lock = threading.RLock()  # claims and config changes, one at a time

    def target(self, name: str) -> TargetEntry | None:
        return self.targets.get(name)

    def claim(self, name: str) -> bool:
        """Own this target (take its lock, open its LUNs); False when another process owns it."""
        entry = self.targets.get(name)
        if entry is None:
            return False
        if entry.owned or self.owners is None:
            return True
        with self.lock:
            entry = self.targets.get(name)
            if entry is None:
                return False
            if entry.owned:
                return True
            if not self.owners.acquire(name):
                return False
            try:
                self.open_luns(entry)
            except Exception:
                self.owners.release(name)
                raise
            entry.owned = True
            return True

    def discovery_policy(self) -> AccessPolicy:
        return self.discovery

    def visible_targets(self, initiator: str, ip: str) -> list[str]:
        return [name for name, entry in list(self.targets.items()) if entry.policy.visible_to(initiator, ip)]

    def target_addresses(self, local_ip: str, local_port: int) -> list[str]:
        """TargetAddress values: the configured portals, with 0.0.0.0 replaced by the address asked on."""
        out = []
        for ip, port in self.portals:
            address = local_ip if ip == "0.0.0.0" else ip
            item = f"{address}:{port},1"
            if item not in out:
                out.append(item)
        return out or [f"{local_ip}:{local_port},1"]


def build_backstore(spec, state_dir: Path):
    from services.iscsi_target.scsi import FileBackstore, RamBackstore

    if spec.type in media.TYPES:  # block devices, mirrors (media.py)
        return media.open_backstore(spec, state_dir)
    if spec.type == "ram":
        return RamBackstore(spec.size, block_size=spec.block_size)
    path = state_path(state_dir, spec.path)
    if spec.type == "vhd":
        from services.iscsi_target.scsi.vhd_backstore import open_image

        return open_image(str(path), block_size=spec.block_size, readonly=spec.readonly,
                          write_through=spec.write_through)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileBackstore(str(path), spec.size, block_size=spec.block_size, readonly=spec.readonly,
                         sparse=spec.sparse, create=spec.create, write_through=spec.write_through)


def build_lun(spec, lun_id: int, state_dir: Path, target: str = ""):
    """A LUN from its config; with a target name, its persistent reservations are kept (APTPL) in
    `<state>/iscsi/pr/` and loaded from there."""
    from services.iscsi_target.scsi import LogicalUnit, Nexus

    if spec.type == "cdrom":
        lu = media.build_cdrom(spec, lun_id, state_dir)
    else:
        lu = LogicalUnit(build_backstore(spec, state_dir), lun_id, readonly=spec.readonly)
        if spec.type == "mirror":
            media.mirror_luns[lu.store.ident] = (target, lun_id)  # its leg drops name the LUN
    if target:
        lu.res.persist_to(pr_state_path(state_dir, target, lun_id), Nexus)
    return lu


def pr_state_path(state_dir: Path, target: str, lun_id: int) -> Path:
    return Path(state_dir) / "iscsi" / "pr" / f"{hashlib.sha256(target.encode()).hexdigest()[:32]}-{lun_id}.json"


class IscsiTargetService(BaseService):
    name = "iscsi_target"
    sections = ("iscsi", "clients", "images", "image_store", "boot")  # the last four: the PCs on images

    def __init__(self, ctx):
        super().__init__(ctx)
        self.registry = Registry()
        self.server: Server | None = None
        self.config = None
        self._stats_prev: dict[tuple, tuple] = {}
        self._stats_task: asyncio.Task | None = None
        self._stats_lock = threading.Lock()
        self.handoff: Handoff | None = None
        self.pcs: PcDisks | None = None

    # ------------------------------------------------------------------ life
    async def start(self, config) -> None:
        ctx = self.ctx
        base = Path(ctx.state_dir) / "iscsi"
        self.registry.owners = OwnerLocks(base / "owners", ctx.instance)
        self.registry.open_luns = self._open_luns
        from shared.images.store import ImageStore

        media.mirror_events.leg_failed = self._leg_failed
        self.pcs = PcDisks(ImageStore.for_state_dir(ctx.state_dir, config.image_store.reserve), ctx.state_dir,
                           lambda: ctx.pcboot, ctx.emit, ctx.mac_for_ip)
        self._build(config)
        self.server = Server(self.registry, self.on_event, self._settings(config.iscsi))
        self.handoff = Handoff(base, ctx.instance, self.server.adopt)
        self.server.router = Router(self.registry.owners, self.handoff, ctx.instance, lambda: max(1, ctx.instances))
        self.server.set_portals([(p.ip, p.port) for p in config.iscsi.portals])
        self.config = config
        self._stats_task = asyncio.get_running_loop().create_task(self._stats_loop())
        self.log.info("serving %d target(s): %s", len(self.registry.targets), ", ".join(self.registry.targets) or "-")

    async def apply(self, config) -> None:
        removed = self._build(config)
        self.server.update_settings(self._settings(config.iscsi))
        self.server.set_portals([(p.ip, p.port) for p in config.iscsi.portals])
        self.config = config
        if removed:
            for runner in self.server.connections():
                session = runner.conn.session
                if session is not None and session.target in removed:
                    runner.request_logout(LOGOUT_GRACE)
        self.log.info("applied: %d target(s), removed %s", len(self.registry.targets), ", ".join(removed) or "none")

    async def command(self, name: str, args: dict) -> None:
        """`lun-resync {target, lun, op}` (for `bootfleet lun resync TARGET LUN`): rebuild a mirror LUN's dropped
        leg while it serves, reporting as operation `op` (operation.progress at 0, every 1 % or second and at
        the end; then operation.finished, and iscsi.mirror.resynced when the mirror is whole again)."""
        if name != "lun-resync":
            self.log.warning("command %s is not supported by iscsi_target", name)
            return
        op = str(args.get("op") or uuid.uuid4().hex[:12])
        target = str(args.get("target", "")).lower()

        def finished(ok: bool, text: str) -> None:
            (self.log.info if ok else self.log.warning)("lun-resync %s: %s", op, text)
            self.ctx.emit(OperationFinished(op=op, name="lun-resync", ok=ok, text=text))

        entry = self.registry.target(target)
        if entry is not None and not entry.owned:
            return  # another process owns it and answers
        try:
            lun = int(args.get("lun", -1))
        except (TypeError, ValueError):
            return finished(False, f"lun {args.get('lun')!r} is not a number")
        if entry is None:
            return finished(False, f"no target {target} is served")
        lu = entry.scsi.luns.get(lun)
        mirror = getattr(lu, "store", None)
        if mirror is None or not hasattr(mirror, "resync"):
            return finished(False, f"{target} LUN {lun} is not a mirror LUN" if lu else f"{target} has no LUN {lun}")
        stale = [i for i, state in enumerate(mirror.state) if state != "in_sync"]
        if not stale:
            return finished(True, f"{target} LUN {lun}: both legs are in sync, nothing to do")
        leg, started, sent = stale[0], time.monotonic(), [-1, 0.0]

        def progress(done: int, total: int) -> None:  # on the executor's thread; ctx.emit is thread-safe
            now = time.monotonic()
            if done in (0, total) or done * 100 // total > sent[0] or now - sent[1] >= 1.0:
                sent[0], sent[1] = done * 100 // total, now
                self.ctx.emit(OperationProgress(op=op, name="lun-resync", done=done, total=total))

        progress(0, mirror.size)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, media.resync, mirror, leg, self.ctx.state_dir, progress)
        except Exception as exc:  # noqa: BLE001 - a failed resync leaves the leg out; say why
            return finished(False, f"{target} LUN {lun}: leg {leg} ({mirror.names[leg]}) not resynced: {exc}")
        seconds = round(time.monotonic() - started, 3)
        self.ctx.emit(ev.MirrorResynced(target=target, lun=lun, leg=leg, name=mirror.names[leg],
                                        mirror=getattr(mirror, "ident", ""), bytes=mirror.size, seconds=seconds,
                                        op=op))
        finished(True, f"{target} LUN {lun}: leg {leg} ({mirror.names[leg]}) in sync again "
                       f"({mirror.size >> 20} MiB copied in {seconds:.1f} s)")

    def _leg_failed(self, ident: str, index: int, name: str, reason: str) -> None:
        """A mirror dropped a leg (called on the I/O thread that saw the failure): say it on the bus."""
        target, lun = media.mirror_luns.get(ident, ("", -1))
        self.log.warning("mirror %s (%s LUN %s): leg %d (%s) dropped: %s; serving from the other leg",
                         ident, target, lun, index, name, reason)
        self.ctx.emit(ev.MirrorLegDropped(target=target, lun=lun, leg=index, name=name, reason=reason, mirror=ident))

    async def stop(self) -> None:
        if media.mirror_events.__dict__.get("leg_failed") == self._leg_failed:
            del media.mirror_events.leg_failed  # back to logging only
        if self._stats_task:
            self._stats_task.cancel()
        if self.server:
            await asyncio.get_running_loop().run_in_executor(None, self.server.stop)
        if self.pcs:
            self.pcs.close()
        if self.handoff:
            self.handoff.close()
        if self.registry.owners:
            self.registry.owners.release_all()
        self._emit_stats()

    def counters(self) -> dict[str, float]:
        sessions = self.server.sessions.all() if self.server else []
        totals = [0, 0, 0, 0]
        for s in sessions:
            for st in list(s.stats.values()):
                totals[0] += st.reads
                totals[1] += st.writes
                totals[2] += st.read_bytes
                totals[3] += st.write_bytes
        owned = sum(1 for e in list(self.registry.targets.values()) if e.owned)
        return {"sessions": len(sessions), "connections": len(self.server.connections()) if self.server else 0,
                "targets": len(self.registry.targets), "targets_owned": owned,
                "handed_over": self.handoff.sent if self.handoff else 0,
                "handed_in": self.handoff.received if self.handoff else 0, "reads": totals[0], "writes": totals[1],
                "read_bytes": totals[2], "write_bytes": totals[3]}

    # ------------------------------------------------------------------ config
    @staticmethod
    def _settings(section) -> dict:
        return {"busy_poll_us": section.busy_poll_us, "nop_interval": section.nop_interval,
                "nop_timeout": section.nop_timeout, "cmd_window": section.cmd_window}

    def _build(self, config) -> list[str]:
        """Bring the registry to this config; returns the names of removed targets."""
        from services.iscsi_target.scsi import ScsiTarget

        section = config.iscsi
        state_dir = self.ctx.state_dir
        locks = self.registry.owners
        me, scale = self.ctx.instance, max(1, self.ctx.instances)
        with self.registry.lock:
            old = self.registry.targets
            new: dict[str, TargetEntry] = {}
            for t in section.targets:
                policy = AccessPolicy(t.effective_auth(section.auth), t.acls)
                specs = {lun.id: lun.backstore for lun in t.luns}
                entry = old.get(t.name)
                if entry is None or not entry.owned:
                    # Ours if we are its preferred owner and no one holds it; else opened when claimed.
                    mine = locks is None or (owners.hrw_order(t.name, scale)[0] == me and locks.acquire(t.name))
                    luns = {}
                    if mine:
                        try:
                            luns = {lun_id: build_lun(spec, lun_id, state_dir, t.name)
                                    for lun_id, spec in specs.items()}
                        except Exception:
                            if locks is not None:
                                locks.release(t.name)
                            raise
                    new[t.name] = TargetEntry(t.name, t.alias, ScsiTarget(t.name, luns), policy, specs, owned=mine)
                    continue
                swapped = {lun_id for lun_id, spec in entry.lun_specs.items()  # a new ISO: a media change in place
                           if specs.get(lun_id, spec) != spec and
                           media.change_medium(entry.scsi.luns.get(lun_id), spec, specs[lun_id], state_dir)}
                for lun_id, spec in entry.lun_specs.items():
                    if lun_id not in swapped and (lun_id not in specs or specs[lun_id] != spec):
                        entry.scsi.remove_lun(lun_id)
                for lun_id, spec in specs.items():
                    if lun_id in swapped:
                        continue
                    if lun_id not in entry.lun_specs or entry.lun_specs[lun_id] != spec:
                        entry.scsi.add_lun(lun_id, build_lun(spec, lun_id, state_dir, entry.name))
                new[t.name] = TargetEntry(t.name, t.alias, entry.scsi, policy, specs)
            if self.pcs is not None:
                new.update(self.pcs.entries(config, old, lambda *a: self._pc_entry(*a, locks, me, scale)))
            self.registry.portals = [(p.ip, p.port) for p in section.portals]
            self.registry.discovery = AccessPolicy(section.auth)
            self.registry.targets = new  # one assignment: connections see the old or the new dict
            removed = [name for name in old if name not in new]
            if locks is not None:
                for name in removed:
                    locks.release(name)  # its sessions are asked to log out; no one else will claim it
            return removed

    @staticmethod
    def _pc_entry(name, alias, policy, disk, prev, locks, me, scale) -> TargetEntry:
        """A PC's target (pc_disks.py): an ordinary target to the owner model, with no LUN until the PC logs in."""
        from services.iscsi_target.scsi import ScsiTarget

        keep = prev is not None and prev.pc is disk
        owned = keep and prev.owned
        if not owned:
            owned = locks is None or (owners.hrw_order(name, scale)[0] == me and locks.acquire(name))
        disk.scsi = prev.scsi if keep else ScsiTarget(name, {})
        return TargetEntry(name, alias, disk.scsi, policy, {}, owned=owned, pc=disk)

    def _open_luns(self, entry: TargetEntry) -> None:
        """Open a target's LUNs from their backstores on disk: it has just become ours."""
        state_dir = self.ctx.state_dir
        for lun_id, spec in entry.lun_specs.items():
            entry.scsi.add_lun(lun_id, build_lun(spec, lun_id, state_dir, entry.name))

    # ------------------------------------------------------------------ events
    def on_event(self, event: ev.Event) -> None:
        """An event from a connection (called from its thread) or from the statistics below."""
        if isinstance(event, ev.SessionEnd):
            self._emit_session_stats(event.session, final=True)
            if self.pcs is not None and event.session.target:
                # the PC's last session closes its disk
                self.pcs.session_ended(event.session.target, event.session.handle)
            return
        if isinstance(event, ev.Error):
            if event.level == "warning":
                self.log.warning("%s: %s", event.where, event.error)
            else:
                self.log.error("SCSI layer fault in %s: %s", event.where, event.error)
            return
        if event.mac is None and event.ip:
            mac = self.ctx.mac_for_ip(event.ip)
            if mac is None and self.pcs is not None and not isinstance(event, ev.LoginFailed):
                disk = self.pcs.find(getattr(event, "target", ""))  # a session of a PC's own target is that PC's
                mac = disk.spec.mac if disk else None
            if mac:
                event = event.with_mac(mac)
        self.ctx.emit(event)

    async def _stats_loop(self) -> None:
        while True:
            interval = self.config.iscsi.io_stats_interval if self.config else 10.0
            await asyncio.sleep(interval or 5.0)
            if interval:
                self._emit_stats()

    def _emit_stats(self) -> None:
        if not self.server:
            return
        for s in self.server.sessions.all():
            self._emit_session_stats(s)

    def _emit_session_stats(self, s, final: bool = False) -> None:
        """One io_stats event per LUN with activity since the last report (called from any thread)."""
        with self._stats_lock:
            for lun, st in list(s.stats.items()):
                key = (id(s), lun)
                now = st.snapshot()
                prev = self._stats_prev.pop(key, None) if final else self._stats_prev.get(key)
                if not final:
                    self._stats_prev[key] = now
                if prev is None:
                    prev = (0, 0, 0, 0, 0, 0, (0,) * BUCKETS, (0,) * 256)
                delta = [a - b for a, b in zip(now[:6], prev[:6])]
                commands = delta[0] + delta[1] + delta[2]
                if not commands:
                    continue
                buckets = [a - b for a, b in zip(now[6], prev[6])]
                by_op = {NAMES[op]: a - b for op, (a, b) in enumerate(zip(now[7], prev[7])) if a != b}
                self.on_event(ev.IoStats(ip=s.ip, initiator=s.initiator, target=s.target, tsih=s.tsih, lun=lun,
                                         reads=delta[0], writes=delta[1], others=delta[2], read_bytes=delta[3],
                                         write_bytes=delta[4], latency_us_avg=round(delta[5] / commands / 1000, 1),
                                         latency_sum_ns=delta[5], latency_buckets=buckets, ops=by_op))
