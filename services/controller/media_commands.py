"""`lun-resync` (and the other commands about what the iSCSI target exports): entries of the one command table
(`commands.COMMANDS`, imported at the end of commands.py).

`lun-resync` asks the iSCSI target service (a `command/iscsi_target/<id>` key, as lease-release asks DHCP) to
rebuild a mirror LUN's dropped leg while it serves. The service reports it as a long operation
(docs/control.md, "Long operations"): `operation.progress` with `op`, then `operation.finished`, and
`iscsi.mirror.resynced` when the mirror is whole again. The answer comes with the operation's first event
(the resync started, or why it did not), so `bootfleet lun resync` then follows the bar from its events.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
import uuid

from services.controller.commands import BadArgument, command, error, ok
from services.controller.waiters import Waiter
from shared import events as ev
from shared.paths import state_path

log = logging.getLogger("bootfleet.controller")
START_TIMEOUT = 10.0  # seconds for the iSCSI target to say the resync started (or why not)


def _mirror_lun(ctl, args, name: str) -> tuple[str, int]:
    """The (target, lun) a command names, checked against the running configuration: a mirror LUN."""
    target = args.get("target")
    if not isinstance(target, str) or not target:
        raise BadArgument(f"{name}: needs the target's IQN (target)")
    target = target.lower()
    try:
        lun = int(args.get("lun"))
    except (TypeError, ValueError):
        raise BadArgument(f"{name}: lun must be a number, not {args.get('lun')!r}") from None
    t = next((t for t in ctl.running.iscsi.targets if t.name == target), None)
    if t is None:
        raise BadArgument(f"{name}: no target {target} in the configuration (iscsi.targets)")
    spec = next((l.backstore for l in t.luns if l.id == lun), None)
    if spec is None:
        raise BadArgument(f"{name}: {target} has no LUN {lun}")
    if spec.type != "mirror":
        raise BadArgument(f"{name}: {target} LUN {lun} is a {spec.type} LUN, not a mirror")
    return target, lun


@command("lun-resync")
def lun_resync(ctl, envelope, args):
    """Rebuild a mirror LUN's dropped leg while it serves; progress as operation events.

    Arguments: `target` (IQN), `lun`, `op` (the operation's id; chosen here when not given). Answered when the
    iSCSI target starts the copy (or says why it does not: a mirror already whole is finished at once);
    follow `op` to its operation.finished, after which the mirror is whole again (iscsi.mirror.resynced)."""
    target, lun = _mirror_lun(ctl, args, "lun-resync")
    op = str(args.get("op") or uuid.uuid4().hex[:12])

    def started(msg):
        f = msg["fields"]
        if msg["type"] == ev.OPERATION_FINISHED and not f.get("ok"):
            return error(f"lun-resync: {f.get('text') or 'failed'}", op=op, target=target, lun=lun)
        text = f.get("text") if msg["type"] == ev.OPERATION_FINISHED else f"resync of {target} LUN {lun} started"
        return ok(text, op=op, target=target, lun=lun, total=f.get("total"))

    ctl.ask("iscsi_target", "lun-resync", {"target": target, "lun": lun, "op": op},
            Waiter(envelope,
                   lambda msg: msg["type"] in (ev.OPERATION_PROGRESS, ev.OPERATION_FINISHED)
                   and msg["fields"].get("op") == op,
                   time.time() + float(args.get("timeout", START_TIMEOUT)),
                   started,
                   lambda: error(f"lun-resync: no iSCSI target process started the resync of {target} LUN {lun} "
                                 f"within {START_TIMEOUT:.0f} s (is iscsi_target running?)", op=op)))
    return None


# ---------------------------------------------------------------------------------------------- client-install
def iso_target_iqn(prefix: str, iso: str) -> str:
    """The CD/DVD target of an ISO: `<boot.iqn_prefix>:iso.<its file name, lower case, without .iso>`."""
    stem = os.path.basename(iso)
    stem = stem[:-4] if stem.lower().endswith(".iso") else stem
    slug = re.sub(r"[^a-z0-9.-]+", "-", stem.lower()).strip("-.") or "disc"
    return f"{prefix}:iso.{slug}"


@command("client-install")
def client_install(ctl, envelope, args):
    """Boot a PC's next power-on from an installer ISO, its own network disk hooked: an install from the network.

    Arguments: `mac`, `iso` (a path the iSCSI target can read; relative: to the state directory). The ISO gets a
    CD/DVD target of its own (`<boot.iqn_prefix>:iso.<name>`, created unless it exists) and the PC's clients[]
    entry `install: <that IQN>`, as one revision; its script then hooks its disk (sanhook, drive 0x80) and boots
    the disc (sanboot), and the controller removes `install` when the PC fetches that script, so the boot after
    the installer's is the installed system's."""
    from services.controller.commands import _commit, _mac_arg
    from shared.boot import target_for

    mac = _mac_arg(args)
    iso = args.get("iso")
    if not isinstance(iso, str) or not iso:
        raise BadArgument("client-install: needs the ISO's path (iso)")
    client = next((c for c in ctl.running.clients if c.mac == mac), None)
    if client is None or target_for(ctl.running, mac) is None or not (client.target or client.image):
        raise BadArgument(f"client-install: {mac} has no disk to install onto (bootfleet client assign {mac} --target IQN)")
    path = state_path(ctl.config.dir.parent, iso)  # the state directory: where the iSCSI target resolves it
    if not os.path.isfile(path):
        raise BadArgument(f"client-install: {iso}: no such file")
    iqn = iso_target_iqn(ctl.running.boot.iqn_prefix, iso)
    data = copy.deepcopy(ctl.config.data)
    targets = data.setdefault("iscsi", {}).setdefault("targets", [])
    existing = next((t for t in targets if str(t.get("name", "")).lower() == iqn), None)
    if existing is None:
        targets.append({"name": iqn, "alias": os.path.basename(iso)[:64],
                        "luns": [{"id": 0, "backstore": {"type": "cdrom", "path": iso}}]})
    entry = next(c for c in data.get("clients", []) if str(c.get("mac", "")).lower().replace("-", ":") == mac)
    entry["install"] = iqn
    answer = _commit(ctl, data)
    if answer["result"] != 0:
        return answer
    return ok(f"{mac} boots {iqn} at its next power-on, its disk {target_for(ctl.running, mac)[0]} hooked "
              f"(revision {answer['arguments']['revision']})", mac=mac, target=iqn, iso=iso,
              revision=answer["arguments"]["revision"])


def observe(ctl, msg) -> None:
    """Called by the loop for every event: a PC with `install` set that fetched its script (TFTP, or HTTP) has
    started the install boot, so `install` goes (a new revision) and its next power-on boots its disk."""
    if msg.get("type") not in (ev.TFTP_FINISHED, ev.HTTP_FINISHED):  # the script over TFTP, or HTTP (boot.transport)
        return
    f = msg.get("fields") or {}
    config = ctl.config.config
    if config is None or f.get("file", "").lstrip("/") != config.boot.script.lstrip("/"):
        return
    mac = (f.get("mac") or "").lower()
    client = next((c for c in config.clients if c.install and (c.mac == mac or (c.ip and c.ip == f.get("ip")))), None)
    if client is None:
        return
    data = copy.deepcopy(ctl.config.data)
    for entry in data.get("clients", []):
        if str(entry.get("mac", "")).lower().replace("-", ":") == client.mac:
            entry.pop("install", None)
    try:
        revision = ctl.commit(data)
    except Exception as exc:  # noqa: BLE001 - logged; the PC would boot the disc again, which says so
        log.error("client-install: removing install of %s failed: %s", client.mac, exc)
        return
    log.info("client-install: %s fetched its install script; install removed (revision %d)", client.mac, revision)
