"""PCs on images as the controller decides them: power-on, the version each PC boots, who is logged in.

- `pcboot/<mac>` -> `{image, version, boot, mode}` in the replicated store (docs/images.md, "What the
  controller decides"): set when a PC on an image powers on, at `client assign` / `client reset`, and when a
  revision puts a PC on an image or changes its image or mode while it is off. The iSCSI target reads it at
  the PC's login: a login whose `boot` is newer than the one its overlay was made for, with no other session of
  that PC logged in, resets a discard overlay.
- Power-on is decided from firmware signals only, never from a login (iPXE logs out and the OS logs in; an OS
  reconnects after a network blip) nor from the OS's own DHCP (its discovers carry no PXE or iPXE class and
  are not reported; renewals are requests): a `dhcp.discover` (the DHCP service reports only booting
  clients' PXE and iPXE discovers) or the fetch of an iPXE loader (`boot.loaders`, by TFTP or HTTP: the
  firmware loading iPXE, before any login of this boot) when the PC was silent `BOOT_GAP` seconds, or was
  never seen, or has logged in to iSCSI since its last power-on (the firmware again: a reboot); or, when
  neither was seen, the iPXE script fetch (`boot.script`) on the same rules, a second fetch in one boot
  counting as a reboot. iPXE's autoboot logs in to a root-path from DHCP before it fetches the script: a
  script-only power-on that follows a login of this boot (within `LATE_LOGIN` s) is too late, the firmware
  already read the disk, so no new key is given for it (the disk never changes within one power-on; the
  overlay is reset at the next power-on seen in time).
- Sessions: normal `iscsi.login` / `iscsi.logout` on the PC's own target (pc_target_iqn), by process
  instance and TSIH; a restarted iSCSI process (`service.started`) has none left. `client reset` and
  `image publish` are refused while the PC has one (the store refuses an overlay a target has open as well).
- The keys and boot counters survive a controller restart in `<state>/controller/pcboot.json` (written once
  per loop turn that changed them): a running PC keeps its version whatever happens to the controller.

Sans-IO apart from that file: the clock is passed in with each event.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from services.controller.fleet import BOOT_GAP  # silence after which a firmware discover is a power-on
from shared import events as ev
from shared.atomic_file import write_atomic
from shared.boot import pc_target_iqn
from shared.bus import message as m
from shared.config.images import effective_mode, pc_name
from shared.config.model import BootfleetConfig

log = logging.getLogger("bootfleet.controller")

# modes whose overlay is kept at power-on: they boot the version their overlay sits on
KEEPS_OVERLAY = ("persistent", "super")
LATE_LOGIN = 30.0  # seconds: a login this shortly before a script-only power-on was that boot's firmware's


class Store(Protocol):
    def get(self, key: str) -> Any: ...

    def set(self, key: str, val: Any) -> int: ...


class Images(Protocol):
    def exists(self, name: str) -> bool: ...

    def info(self, name: str) -> Any: ...

    def overlay_base(self, name: str, pc: str) -> int | None: ...


def pcboot_key(mac: str) -> str:
    return f"{m.PCBOOT_PREFIX}{mac}"


@dataclass
class PcState:
    """What the controller tracks of one PC on an image (besides its key)."""

    boot: int = 0  # the last boot counter handed out
    last_event: float | None = None
    logged_in_since_power_on: bool = False
    script_seen: bool = False
    login_at: float | None = None  # the last normal login's time
    power_on_at: float | None = None
    sessions: set[tuple[int, int]] = field(default_factory=set)  # (iSCSI process instance, TSIH)


@dataclass(frozen=True)
class PcOnImage:
    mac: str
    pc: str  # its name in overlay file names and IQNs
    image: str
    mode: str
    target: str


class PcBoots:
    def __init__(self, store: Store, images: Images, path: Path, mac_of: Callable[[dict[str, Any]], str | None]):
        self.store = store
        self.images = images
        self.path = path
        self.mac_of = mac_of  # an event's fields -> the PC's MAC (the fleet's IP map for TFTP/iSCSI events)
        self.pcs: dict[str, PcOnImage] = {}  # mac -> the PC, from the running configuration
        self.by_target: dict[str, str] = {}  # pc target IQN -> mac
        self.state: dict[str, PcState] = {}
        self.keys: dict[str, dict[str, Any]] = {}  # mac -> the key's value as published
        self.script = "boot.ipxe"
        self.loaders = {"undionly.kpxe", "snponly.efi"}
        self._dirty = False

    # ------------------------------------------------------------------ start-up and revisions
    def load(self) -> None:
        """The keys and counters of the last run, published again as they were."""
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("%s unreadable (%s): every PC on an image starts from a new power-on", self.path, exc)
            return
        for mac, entry in (saved.get("pcs") or {}).items():
            self.state.setdefault(mac, PcState()).boot = int(entry.get("boot") or 0)
            if entry.get("key"):
                self.keys[mac] = entry["key"]
                self.store.set(pcboot_key(mac), entry["key"])

    def reconfigure(self, config: BootfleetConfig, update_keys: bool = True) -> None:
        """A revision: which PCs are on which image. A PC new on an image, or whose image or mode changed,
        gets a new key at once if it is not logged in; a logged-in one keeps its disk until its next
        power-on. A PC no longer on an image loses its key. `update_keys=False`: only learn who is where
        (at start-up, before the stored events told who is logged in)."""
        self.script = _basename(config.boot.script)
        self.loaders = {_basename(config.boot.loaders.bios), _basename(config.boot.loaders.efi)}
        pcs = {}
        for client in config.clients:
            if client.image:
                pcs[client.mac] = PcOnImage(client.mac, pc_name(client), client.image,
                                            effective_mode(config, client) or "discard", pc_target_iqn(config, client))
        self.pcs = pcs
        self.by_target = {p.target: mac for mac, p in pcs.items()}
        if not update_keys:
            return
        for mac in set(self.keys) - set(pcs):
            self._set_key(mac, None)
        for mac, pc in pcs.items():
            key = self.keys.get(mac)
            if key is None or (key.get("image"), key.get("mode")) != (pc.image, pc.mode):
                if key is None or not self.logged_in(mac):
                    self.new_boot(mac)

    # ------------------------------------------------------------------ events
    def observe(self, type: str, fields: dict[str, Any], ts: float, instance: int = 0, service: str = "",
                replay: bool = False) -> str | None:
        """One event; returns the MAC of a PC this event powered on (its key is new), else None."""
        if type == ev.SERVICE_STARTED and service == "iscsi_target":
            for st in self.state.values():  # a new process: the old one's sessions died with it
                st.sessions = {s for s in st.sessions if s[0] != instance}
            return None
        if type in (ev.ISCSI_LOGIN, ev.ISCSI_LOGOUT, ev.ISCSI_IO_STATS, ev.ISCSI_FIRST_READ):
            mac = self.by_target.get(fields.get("target") or "")
        else:
            mac = self.mac_of(fields)
        if mac is None or mac not in self.pcs:
            return None
        st = self.state.setdefault(mac, PcState())
        silent = st.last_event is None or ts - st.last_event > BOOT_GAP
        powered = late = False
        fetched = _basename(fields.get("file")) if type in (ev.TFTP_FINISHED, ev.HTTP_FINISHED) else None
        if type == ev.DHCP_DISCOVER or (fetched is not None and fetched in self.loaders):
            powered = silent or st.power_on_at is None or st.logged_in_since_power_on
        elif fetched is not None and fetched == self.script:
            powered = silent or st.power_on_at is None or st.script_seen
            if not powered:
                st.script_seen = True
            else:  # the firmware's login of this very boot came first: it was served the disk as it was
                late = (st.login_at is not None and ts - st.login_at <= LATE_LOGIN
                        and (st.power_on_at is None or st.login_at > st.power_on_at))
        elif type == ev.ISCSI_LOGIN and str(fields.get("session_type", "Normal")).lower() == "normal":
            st.sessions.add((instance, int(fields.get("tsih") or 0)))
            st.logged_in_since_power_on = True
            st.login_at = ts
        elif type == ev.ISCSI_LOGOUT:
            st.sessions.discard((instance, int(fields.get("tsih") or 0)))
        st.last_event = ts
        if not powered or replay:
            return None
        st.power_on_at = ts
        st.logged_in_since_power_on = late
        st.script_seen = fetched is not None and fetched == self.script
        if late:
            log.warning("PC %s powered on, known only from its boot script fetched %.1f s after its firmware logged "
                        "in to iSCSI (no DHCP discover or loader fetch seen): its disk stays as it is for this "
                        "boot; run dhcp in proxy mode or serve its loader to have it reset at power-on",
                        self.pcs[mac].pc, ts - st.login_at)
            return None
        self.new_boot(mac)
        return mac

    def replay(self, e: dict[str, Any]) -> None:
        """A stored event at start-up: sessions and silence only (a past discover powers nothing on now)."""
        if e["type"] in (ev.SERVICE_STARTED, ev.ISCSI_LOGIN, ev.ISCSI_LOGOUT):
            self.observe(e["type"], e["fields"], e["ts"], e.get("instance", 0), e.get("service", ""), replay=True)

    # ------------------------------------------------------------------ keys
    def version_for(self, pc: PcOnImage) -> int | None:
        """The version a PC boots now: the current one, or for a persistent or super PC with an overlay the
        version that overlay sits on (it keeps it until `client reset` or publish)."""
        if not self.images.exists(pc.image):
            return None
        if pc.mode in KEEPS_OVERLAY:
            base = self.images.overlay_base(pc.image, pc.pc)
            if base is not None:
                return base
        return self.images.info(pc.image).current

    def new_boot(self, mac: str) -> dict[str, Any] | None:
        """A new key for the PC (boot counter + 1): at power-on, assign, reset. None: its image has no
        version yet (created or imported later: the key comes with the next power-on or revision)."""
        pc = self.pcs.get(mac)
        if pc is None:
            return None
        version = self.version_for(pc)
        if version is None:
            if mac in self.keys:
                self._set_key(mac, None)
            return None
        st = self.state.setdefault(mac, PcState())
        st.boot += 1
        key = {"image": pc.image, "version": version, "boot": st.boot, "mode": pc.mode}
        self._set_key(mac, key)
        return key

    def refresh_image(self, image: str) -> None:
        """An image got its first version (create, import): its PCs without a key get one."""
        for mac, pc in self.pcs.items():
            if pc.image == image and mac not in self.keys:
                self.new_boot(mac)

    def _set_key(self, mac: str, val: dict[str, Any] | None) -> None:
        if val is None:
            self.keys.pop(mac, None)
        else:
            self.keys[mac] = val
        self.store.set(pcboot_key(mac), val)
        self._dirty = True

    def flush(self) -> None:
        """Persist keys and counters if they changed (the loop calls it once per turn)."""
        if not self._dirty:
            return
        self._dirty = False
        pcs = {mac: {"boot": st.boot, "key": self.keys.get(mac)} for mac, st in self.state.items()}
        for mac, key in self.keys.items():
            pcs.setdefault(mac, {"boot": key.get("boot", 0), "key": key})
        try:
            write_atomic(self.path, json.dumps({"pcs": pcs}, sort_keys=True))
        except OSError as exc:
            log.error("cannot save %s: %s", self.path, exc)
            self._dirty = True

    # ------------------------------------------------------------------ questions handlers ask
    def logged_in(self, mac: str) -> bool:
        st = self.state.get(mac)
        return bool(st and st.sessions)

    def sessions(self, mac: str) -> int:
        st = self.state.get(mac)
        return len(st.sessions) if st else 0

    def pc_named(self, image: str, pc: str) -> PcOnImage | None:
        return next((p for p in self.pcs.values() if p.image == image and p.pc == pc), None)

    def super_of(self, image: str) -> PcOnImage | None:
        return next((p for p in self.pcs.values() if p.image == image and p.mode == "super"), None)

    def on_image(self, image: str) -> list[PcOnImage]:
        return sorted((p for p in self.pcs.values() if p.image == image), key=lambda p: p.pc)

    def in_use(self, image: str) -> set[int]:
        """Versions PCs on `image` booted last (their keys): prune keeps them. A PC that is off keeps its
        version until its next power-on, `client reset`, or it leaves the image."""
        return {int(k["version"]) for k in self.keys.values() if k.get("image") == image}


def _basename(name: Any) -> str:
    return str(name or "").rsplit("/", 1)[-1]
