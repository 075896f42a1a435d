"""`lun-resync` (and the other commands about what the iSCSI target exports): entries of the one command table
(`commands.COMMANDS`, imported at the end of commands.py).

`lun-resync` asks the iSCSI target service (a `command/iscsi_target/<id>` key, as lease-release asks DHCP) to
rebuild a mirror LUN's dropped leg while it serves. The service reports it as a long operation
(docs/control.md, "Long operations"): `operation.progress` with `op`, then `operation.finished`, and
`iscsi.mirror.resynced` when the mirror is whole again. The answer comes with the operation's first event
(the resync started, or why it did not), so `bootfleet lun resync` then follows the bar from its events.
"""

from __future__ import annotations

import time
import uuid

from services.controller.commands import BadArgument, command, error, ok
from services.controller.waiters import Waiter
from shared import events as ev

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
