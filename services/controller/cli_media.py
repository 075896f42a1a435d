"""`bootfleet lun resync TARGET LUN`: the commands about what the iSCSI target exports, on the command line.

The resync runs in the iSCSI target service; the controller answers when it has started, and the CLI then
follows the operation's events to the end (cli_progress.follow_operation: a bar on a terminal, a line per
10 % on stderr through a pipe), printing the finished operation's line on stdout.
"""

from __future__ import annotations

import json

from services.controller.cli_progress import follow_operation, last_event_id, new_op_id
from services.controller.commands import summary


def add_parsers(sub, add) -> None:
    lu = add(sub, "lun", "act on a LUN of a target (mirror resync)")
    lsub = lu.add_subparsers(dest="action", required=True)
    rs = add(lsub, "resync", summary("lun-resync"))
    rs.add_argument("target", help="the target's IQN")
    rs.add_argument("lun", type=int, help="the mirror LUN's id")
    rs.add_argument("--within", type=float, metavar="SECONDS", help="give up following after this long")


def cmd_lun(ctl, args, *, error) -> int:
    after = last_event_id(ctl)  # before the command: none of the operation's events is missed
    op = new_op_id()
    answer = ctl.call("lun-resync", target=args.target, lun=args.lun, op=op, timeout=max(1.0, ctl.timeout - 1.0))
    if answer.get("result") in (1, 2):
        raise error(answer.get("text", "lun-resync failed"))
    fields = follow_operation(ctl, op, after, f"resync {args.target} LUN {args.lun}", error=error,
                              timeout=args.within)
    if args.json:
        print(json.dumps({**answer.get("arguments", {}), "finished": fields}, indent=2, default=str))
    else:
        print(fields.get("text", ""))
    return 0


def cmd_client_install(ctl, args, *, answer_of, error) -> int:
    """`bootfleet client install MAC ISO`: the ISO's path is made absolute here (the CLI's working directory)."""
    import os

    if len(args.more) != 2:
        raise error("usage: bootfleet client install MAC ISO")
    mac, iso = args.more
    return answer_of(ctl.call("client-install", mac=mac, iso=os.path.abspath(iso)), args)
