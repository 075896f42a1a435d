"""`bootfleet image ...` and `bootfleet client reset`: the image commands on the command line (docs/images.md).

Long commands (import, export, publish, verify) are answered at once with an operation id; the CLI then
follows the operation's progress events until it finishes (cli_progress.follow_operation: a bar on a terminal,
a line per 10 % through a pipe, on stderr). `--json` prints the answer's arguments, and for a long command the
finished operation's fields with them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from services.controller.cli_progress import follow_operation, last_event_id
from services.controller.commands import summary

LONG = {"import", "export", "publish", "verify"}


def _size(n: Any) -> str:
    if n is None:
        return "-"
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def cmd_image(ctl, args, *, table, answer_of, error) -> int:
    """Dispatch `bootfleet image ACTION ...`; `table`, `answer_of` and `error` are cli.py's helpers."""
    a = args.action
    if a == "list":
        def render(r):
            table(["image", "current", "versions", "size", "on disk", "mode", "PCs"],
                  [[i["name"], i.get("current"), ",".join(map(str, i.get("versions") or [])) or "-", _size(i.get("size")),
                    _size(i.get("disk_usage")), i.get("mode"), i.get("pcs")] for i in r.get("images", [])])
        answer = ctl.call("image-list")
        if answer.get("result") == 3 and not args.json:
            print("no images (bootfleet image create NAME --size 40G, or image import NAME FILE)")
            return 0
        return answer_of(answer, args, render)
    if a == "info":
        def render(r):
            i = r["image"]
            print(f"{i['name']}: {_size(i['size'])}, current version {i['current']}, keeps {i['keep_versions']}, "
                  f"mode {i.get('mode') or '-'}, quota {_size(i.get('quota')) if i.get('quota') else 'none'}")
            table(["version", "", "created", "source", "on disk", "digest"],
                  [[v["n"], "current" if v["current"] else "", _when(v["created"]), v["source"], _size(v["disk_usage"]),
                    v["digest"][:16]] for v in i["versions"]])
            if i["pcs"]:
                table(["pc", "mac", "mode", "version", "sessions", "overlay", "overlay on", "target"],
                      [[p["pc"], p["mac"], p["mode"], p["version"], p["sessions"], _size(p["overlay"]),
                        p["overlay_version"], p["target"]] for p in i["pcs"]])
            v = i.get("verified")
            if v:
                print(f"last verify {_when(v['at'])}: {'ok' if v['ok'] else 'FAILED'}")
        return answer_of(ctl.call("image-info", name=args.name), args, render)
    if a == "create":
        return answer_of(ctl.call("image-create", name=args.name, size=args.size, mode=args.mode), args)
    if a == "rollback":
        return answer_of(ctl.call("image-rollback", name=args.name, version=args.version), args)
    if a == "prune":
        return answer_of(ctl.call("image-prune", name=args.name), args)
    # long ones
    if a == "import":
        call = dict(name=args.name, file=os.path.abspath(args.file), mode=args.mode)
    elif a == "export":
        if len(args.rest) not in (1, 2):
            raise error("usage: bootfleet image export NAME [VERSION] FILE --format raw|qcow2|vpc")
        version = int(args.rest[0]) if len(args.rest) == 2 else None
        call = dict(name=args.name, file=os.path.abspath(args.rest[-1]), version=version, format=args.format)
    elif a == "publish":
        call = dict(name=args.name, pc=args.pc)
    else:
        call = dict(name=args.name)
    after = last_event_id(ctl)
    answer = ctl.call(f"image-{a}", **{k: v for k, v in call.items() if v is not None})
    if answer.get("result") in (1, 2):
        raise error(answer.get("text", "error"))
    op = answer["arguments"]["op"]
    fields = follow_operation(ctl, op, after, f"{a} {args.name}", error=error)
    if args.json:
        print(json.dumps({**answer["arguments"], "finished": fields}, indent=2, default=str))
    else:
        print(fields.get("text", ""))
    return 0


def add_parsers(sub, add) -> None:
    """The `image` subcommands (cli.py's build_parser calls this with its `add`)."""
    im = add(sub, "image", "images: create, import, list, info, publish, rollback, prune, verify, export")
    isub = im.add_subparsers(dest="action", required=True)
    c = add(isub, "create", summary("image-create"))
    c.add_argument("name")
    c.add_argument("--size", required=True, help="40G, 40GiB or bytes")
    c.add_argument("--mode", help="the default mode of its PCs (discard, persistent, super, readonly, refuse)")
    i = add(isub, "import", summary("image-import"))
    i.add_argument("name")
    i.add_argument("file")
    i.add_argument("--mode", help="the default mode of its PCs")
    add(isub, "list", summary("image-list"))
    for name in ("info", "prune", "verify"):
        add(isub, name, summary(f"image-{name}")).add_argument("name")
    p = add(isub, "publish", summary("image-publish"))
    p.add_argument("name")
    p.add_argument("--pc", help="the super PC's name (default: the image's super client)")
    r = add(isub, "rollback", summary("image-rollback"))
    r.add_argument("name")
    r.add_argument("version", type=int)
    e = add(isub, "export", summary("image-export"))
    e.add_argument("name")
    e.add_argument("rest", nargs="+", metavar="[VERSION] FILE")
    e.add_argument("--format", default="raw", choices=("raw", "qcow2", "vpc"))


def cmd_client_reset(ctl, args, *, answer_of, error) -> int:
    if len(args.more) != 1:
        raise error("usage: bootfleet client reset MAC")
    return answer_of(ctl.call("client-reset", mac=args.more[0]), args)
