"""`bootfleet`: the command line for a running stack; a thin layer over the controller's control channel.

Exit codes: 0 success, 1 error (one line saying why), 2 usage. `--json` prints the controller's
arguments as JSON instead of tables. The global options (`--state-dir`, `--json`, `--timeout`) are accepted
anywhere on the line: `bootfleet status --json` is `bootfleet --json status`.

On a terminal, tables are drawn by rich (colour unless NO_COLOR is set); through a pipe they are plain text
in aligned columns, with no escape codes. Long operations show progress (cli_progress.py). Shell completion:
`bootfleet completion bash` prints the script (argcomplete).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from services.controller import cli_images, cli_media
from services.controller.cli_progress import follow_operation
from services.controller.cli_output import _ago, _table, _when, parse_since
from services.controller.commands import COMMANDS, summary
from services.controller.control_client import CliError, Control, NoAnswer
from shared.config.model import SERVICES

STATE_DIR = os.environ.get("BOOTFLEET_STATE_DIR", "var")


# -- commands -------------------------------------------------------------------------------------
def _answer(answer: dict[str, Any], args: argparse.Namespace, render=None) -> int:
    result = answer.get("result", 1)
    if result in (1, 2):
        raise CliError(answer.get("text", "error"))
    if args.json:
        print(json.dumps(answer.get("arguments", {}), indent=2, default=str))
    elif render:
        render(answer.get("arguments", {}))
    else:
        print(answer.get("text", ""))
    return 0


def _applied_or_failed(ctl: Control, args) -> tuple[dict[str, Any], list[str]]:
    """Wait (up to args.wait s) until every process `scale` asks for has applied the running revision or
    failed to; return the last status and one line per process that did not (`tftp[0]: <reason>`)."""
    deadline = time.monotonic() + args.wait
    log_dir = Path(args.state_dir) / "log"
    while True:
        answer = ctl.call("status-get")
        if answer.get("result") != 0:
            raise CliError(answer.get("text", "status-get failed"))
        status = answer["arguments"]
        revision = status["controller"]["revision"]
        scale = status["scale"]
        rows = {(p["service"], p["instance"]): p for p in status["processes"]}
        failed, waiting = [], []
        for service, count in scale.items():
            for instance in range(int(count)):
                name, p = f"{service}[{instance}]", rows.get((service, instance))
                log = log_dir / f"{service}_{instance}.log"
                if p is None:
                    waiting.append(f"{name}: not started")
                elif (p.get("failed") or {}).get("revision") == revision:
                    failed.append(f"{name}: {p['failed']['reason']}")
                elif p.get("state") == "FATAL":
                    failed.append(f"{name}: exited at start and supervisord gave up (FATAL); see {log}")
                elif p.get("health") != "ok":
                    waiting.append(f"{name}: not on revision {revision} after {args.wait:.0f} s (revision "
                                   f"{p.get('revision', '-')}, {p.get('state') or 'no process'}, "
                                   f"{p.get('health') or 'no heartbeat'}); see {log}")
        if not waiting or time.monotonic() >= deadline:
            return status, failed + waiting
        time.sleep(0.25)


def cmd_status(ctl: Control, args) -> int:
    failures: list[str] = []
    if args.wait is not None:
        status, failures = _applied_or_failed(ctl, args)
        answer = {"result": 0, "arguments": status}
    else:
        answer = ctl.call("status-get")

    def render(a):
        c = a["controller"]
        print(
            f"controller  pid {c['pid']}  up {_ago(c['uptime'])}  revision {c['revision']}  "
            f"events {c['events_received']} received, {c['events_stored']} stored"
            + ("" if c["supervisord"] else "  (no supervisord)")
            + _web_line(c.get("web"))
        )
        rows = []
        for p in a["processes"]:
            counters = " ".join(f"{k}={v}" for k, v in sorted((p.get("counters") or {}).items())[:6])
            rows.append(
                [
                    f"{p['service']}[{p['instance']}]",
                    p.get("state"),
                    p.get("pid"),
                    p.get("revision"),
                    p.get("health"),
                    _ago(p.get("uptime")),
                    _ago(p.get("last_beat")),
                    f"{p.get('events_emitted', 0)}/{p.get('events_dropped', 0)}",
                    counters,
                ]
            )
        _table(["service", "state", "pid", "revision", "health", "uptime", "heartbeat", "events/drops", "counters"], rows)

    code = _answer(answer, args, render)
    for line in failures:
        print(line, file=sys.stderr)
    if failures:
        print(f"bootfleet: {len(failures)} process{'es' if len(failures) > 1 else ''} not on revision "
              f"{answer['arguments']['controller']['revision']}", file=sys.stderr)
        return 1
    return code


def _web_line(web: dict[str, Any] | None) -> str:
    """The dashboard on the controller's line: its URL, or why it is not served."""
    if not web:
        return ""
    if web.get("state") == "running":
        return f"  web: {web.get('url')}"
    if web.get("state") == "failed" and web.get("url"):  # a revision's web section failed; the old server serves on
        return f"  web: failed: {web.get('reason')} (revision {web.get('revision')}; {web['url']} serves on)"
    if web.get("state") == "failed":
        return f"  web: failed: {web.get('reason')}"
    return f"  web: {web.get('state')}"


def cmd_web(ctl: Control, args) -> int:
    """`web passwd`: a password's hash for web.password_hash (needs no controller)."""
    from services.controller.web.auth import hash_password, read_password

    try:
        password = read_password()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    encoded = hash_password(password)
    if args.json:
        print(json.dumps({"password_hash": encoded}))
    else:
        print(encoded)
        if sys.stdin.isatty():
            print("put it in the configuration as web.password_hash; the controller reads it when it starts", file=sys.stderr)
    return 0


def _read_config(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML: {exc}") from None


def cmd_config(ctl: Control, args) -> int:
    from shared.config.loader import ConfigError, config_from_dict

    if args.action == "schema":
        from shared.config.model import BootfleetConfig

        print(json.dumps(BootfleetConfig.model_json_schema(), indent=2))
        return 0
    if args.action == "test":
        data = _read_config(args.file)
        try:
            config_from_dict(data)
        except ConfigError as exc:
            for line in exc.errors:
                print(f"{args.file}: {line}", file=sys.stderr)
            return 1
        print(f"{args.file}: valid")
        return 0
    if args.action == "apply":
        return _answer(ctl.call("config-apply", config=_read_config(args.file)), args)
    if args.action == "set":
        try:
            value = yaml.safe_load(args.value)
        except yaml.YAMLError as exc:
            raise CliError(f"{args.value}: not a YAML value: {exc}") from None
        return _answer(ctl.call("config-set", path=args.path, value=value), args)
    # get
    answer = ctl.call("config-get", path=args.path or "")

    def render(a):
        value = a["value"]
        if isinstance(value, (dict, list)):
            print(f"# revision {a['revision']}")
            print(yaml.safe_dump(value, sort_keys=False).rstrip())
        else:
            print(value)

    return _answer(answer, args, render)


def _event_line(e: dict[str, Any]) -> str:
    fields = " ".join(f"{k}={v}" for k, v in e["fields"].items())
    return f"{_when(e['ts'])}.{int(e['ts'] % 1 * 1000):03d}  {e['service']}[{e['instance']}]  {e['type']:<24} {fields}"


def cmd_events(ctl: Control, args) -> int:
    query: dict[str, Any] = {"limit": args.limit}
    if args.type:
        query["type"] = args.type
    if args.mac:
        query["mac"] = args.mac.lower()
    if args.since:
        query["since"] = parse_since(args.since)
    answer = ctl.call("events-list", **query)
    if answer["result"] in (1, 2):
        raise CliError(answer["text"])
    events = answer["arguments"].get("events", [])
    for e in events:
        print(json.dumps(e, default=str) if args.json else _event_line(e), flush=True)
    if not args.follow:
        return 0
    # pushed: each events-wait is held by the controller until events arrive (or 25 s pass: ask again)
    query.pop("since", None)
    query.pop("limit", None)
    last = events[-1]["id"] if events else _last_event_id(ctl)
    try:
        while True:
            try:
                answer = ctl.call("events-wait", after_id=last, wait=25.0, limit=1000, **query)
            except NoAnswer:
                continue  # the controller restarted meanwhile: ask again
            if answer["result"] in (1, 2):
                raise CliError(answer["text"])
            for e in answer["arguments"].get("events", []):
                print(json.dumps(e, default=str) if args.json else _event_line(e), flush=True)
            last = answer["arguments"].get("last_id", last)
    except KeyboardInterrupt:
        return 0


def _last_event_id(ctl: Control) -> int:
    from services.controller.cli_progress import last_event_id

    return last_event_id(ctl)


def cmd_operation(ctl: Control, args) -> int:
    """Follow a long operation's progress (its operation.progress events) until it finishes."""
    after = 0 if args.from_start else _last_event_id(ctl)
    fields = follow_operation(ctl, args.op, after, args.title or f"operation {args.op}", error=CliError,
                              timeout=args.within)
    if args.json:
        print(json.dumps(fields, indent=2, default=str))
    elif fields.get("text"):
        print(fields["text"])
    return 0


def cmd_completion(ctl: Control, args) -> int:
    import argcomplete

    print(argcomplete.shellcode(["bootfleet"], shell=args.shell))
    return 0


def _process_count(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'auto'") from None


def cmd_service(ctl: Control, args) -> int:
    if args.action == "restart":
        return _answer(ctl.call("service-restart", service=args.name), args)
    return _answer(ctl.call("service-scale", service=args.name, count=args.count), args)


def cmd_clients(ctl: Control, args) -> int:
    def render(a):
        now = time.time()
        rows = [
            [c["mac"], c.get("name"), c.get("ip"), c.get("target"), c["state"], _when(c.get("last_boot")), _ago(now - c["last_event"]) if c.get("last_event") else "-"]
            for c in a.get("clients", [])
        ]
        columns = ["mac", "name", "ip", "target", "state", "last boot", "last seen"]
        clients = a.get("clients", [])
        if any(c.get("uuid") or c.get("firmware") for c in clients):  # what PCs said of themselves (97, 93)
            columns[5:5] = ["firmware", "uuid"]
            for row, c in zip(rows, clients):
                row[5:5] = [c.get("firmware") or "-", c.get("uuid") or "-"]
        if any(c.get("image") for c in clients):  # PCs on images: image, the version they booted, mode, overlay
            columns[4:4] = ["image", "version", "mode", "overlay"]
            for row, c in zip(rows, clients):
                row[4:4] = [c.get("image"), c.get("version"), c.get("mode"),
                            cli_images._size(c.get("overlay")) if c.get("image") else None]
        _table(columns, rows)

    return _answer(ctl.call("client-list"), args, render)


def cmd_client_assign(ctl: Control, args) -> int:
    if len(args.more) not in (1, 2):
        raise CliError("usage: bootfleet client assign MAC (--target IQN [--lun N] | IMAGE [--mode MODE]) [--name NAME]")
    image = args.more[1] if len(args.more) == 2 else None
    return _answer(ctl.call("client-assign", mac=args.more[0], target=args.target, name=args.name, lun=args.lun,
                            image=image, mode=args.mode), args)


def cmd_client(ctl: Control, args) -> int:
    if args.mac == "assign":
        return cmd_client_assign(ctl, args)
    if args.mac == "install":
        return cli_media.cmd_client_install(ctl, args, answer_of=_answer, error=CliError)
    if args.mac == "reset":
        return cli_images.cmd_client_reset(ctl, args, answer_of=_answer, error=CliError)
    if args.more:
        raise CliError(f"bootfleet client {args.mac}: unexpected {' '.join(args.more)} (adopt a PC with: bootfleet client assign MAC --target IQN)")
    answer = ctl.call("client-get", mac=args.mac)
    if answer["result"] == 3:
        raise CliError(answer["text"])

    def render(a):
        c = a["client"]
        print(f"{c['mac']}  {c.get('name') or ''}  ip {c.get('ip') or '-'}  target {c.get('target') or '-'}  state {c['state']}")
        arch = c.get("arch")
        print(f"  uuid {c.get('uuid') or '-'}  firmware {c.get('firmware') or '-'}  arch {'-' if arch is None else arch}"
              f"  nic {c.get('nic') or '-'}")
        if c.get("image"):
            print(f"  image {c['image']} version {c.get('version')} mode {c.get('mode')}"
                  f"  overlay {cli_images._size(c.get('overlay'))}  sessions {c.get('sessions')}")
        rows = [[f"{s['t']:8.3f}", s["step"], s["detail"]] for s in a["timeline"]]
        _table(["t (s)", "step", "detail"], rows, title=f"last boot {_when(c.get('last_boot'))}")

    return _answer(answer, args, render)


def cmd_leases(ctl: Control, args) -> int:
    def render(a):
        rows = [[l["ip"], l["mac"], l.get("state"), l.get("scope"), l.get("hostname"), _when(l.get("expires"))] for l in a.get("leases", [])]
        _table(["ip", "mac", "state", "scope", "hostname", "expires"], rows)

    return _answer(ctl.call("lease-list", all=args.all), args, render)


def cmd_lease(ctl: Control, args) -> int:
    return _answer(ctl.call("lease-release", mac=args.mac), args)


def cmd_commands(ctl: Control, args) -> int:
    """The running controller's list-commands; the same table read here when it is not running."""
    try:
        answer = ctl.call("list-commands")
        table, source = answer["arguments"]["commands"], "the controller"
    except CliError:
        table, source = {n: c.help for n, c in sorted(COMMANDS.items())}, "the local table; the controller is not running"
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"control commands ({source}):")
    for name, text in table.items():
        first, _, rest = text.partition("\n\n")
        print(f"  {name:<16} {' '.join(first.split())}")
        for line in rest.splitlines():
            print(f"  {'':<16} {line.strip()}")
    return 0


def cmd_keys(ctl: Control, args) -> int:
    from shared.bus.keys import generate

    try:
        paths = generate(Path(args.state_dir), force=args.force)
    except FileExistsError as exc:
        raise CliError(str(exc)) from None
    for p in paths:
        print(p)
    return 0


# Global options, accepted before or after the command: every (sub)parser has them, with no default of its
# own (SUPPRESS), so a value given anywhere wins and `main` fills in GLOBAL_DEFAULTS for what was not given.
GLOBAL_DEFAULTS = {"state_dir": STATE_DIR, "json": False, "timeout": 10.0}


def _global_options() -> argparse.ArgumentParser:
    g = argparse.ArgumentParser(add_help=False)
    opts = g.add_argument_group("global options (anywhere on the line)")
    opts.add_argument("--state-dir", default=argparse.SUPPRESS, help=f"the stack's state directory (default: {STATE_DIR})")
    opts.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of tables")
    opts.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for the controller (default: 10)")
    return g


def _mac_completer(prefix, parsed_args, **kwargs):
    """Tab completion of a MAC: the PCs the running controller knows."""
    try:
        state = getattr(parsed_args, "state_dir", STATE_DIR)
        answer = Control(Path(state), 1.0).call("client-list")
        return [c["mac"] for c in answer["arguments"].get("clients", []) if c["mac"].startswith(prefix.lower())]
    except Exception:
        return []


def build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    p = argparse.ArgumentParser(prog="bootfleet", description="Control a running Bootfleet stack.", parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(subparsers, name: str, help: str, **kw) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=help, description=help, parents=[common], **kw)

    st = add(sub, "status", summary("status-get"))
    st.add_argument("--wait", type=float, metavar="SECONDS",
                    help="first wait until every process has applied the running revision or failed to; "
                         "exit 1 naming each one that did not (what `make up` runs)")
    st.set_defaults(fn=cmd_status)

    c = add(sub, "config", "test, apply, set, get the configuration; print its JSON Schema")
    csub = c.add_subparsers(dest="action", required=True)
    t = add(csub, "test", summary("config-test") + " (here: no controller needed)")
    t.add_argument("file")
    a = add(csub, "apply", summary("config-apply"))
    a.add_argument("file")
    s = add(csub, "set", summary("config-set"))
    s.add_argument("path")
    s.add_argument("value", help="a YAML value")
    g = add(csub, "get", summary("config-get"))
    g.add_argument("path", nargs="?")
    add(csub, "schema", "the configuration's JSON Schema, for editors")
    c.set_defaults(fn=cmd_config)

    e = add(sub, "events", summary("events-list"))
    e.add_argument("--follow", "-f", action="store_true", help="keep printing new events as the controller files them")
    e.add_argument("--type", help="an event type or a prefix (dhcp, tftp.transfer, iscsi.login)")
    e.add_argument("--since", help="10m, 2h, 1d, or an ISO date/time")
    e.add_argument("--mac", help="only events naming this MAC").completer = _mac_completer
    e.add_argument("--limit", type=int, default=100)
    e.set_defaults(fn=cmd_events)

    sv = add(sub, "service", "restart or scale a service (through supervisord)")
    svsub = sv.add_subparsers(dest="action", required=True)
    r = add(svsub, "restart", summary("service-restart"))
    r.add_argument("name", choices=SERVICES)
    sc = add(svsub, "scale", summary("service-scale"))
    sc.add_argument("name", choices=SERVICES)
    sc.add_argument("count", type=_process_count, help="a whole number, or auto: one per usable core")
    sv.set_defaults(fn=cmd_service)

    add(sub, "clients", summary("client-list")).set_defaults(fn=cmd_clients)
    cl = add(sub, "client", summary("client-get"))
    cl.add_argument("mac").completer = _mac_completer
    cl.add_argument("more", nargs="*", help="`client assign MAC [IMAGE]`: the PC to adopt (and its image); "
                    "`client reset MAC`: " + summary("client-reset") + "; `client install MAC ISO`: " + summary("client-install"))
    cl.add_argument("--mode", help="client assign MAC IMAGE: discard, persistent, super, readonly or refuse")
    cl.add_argument("--target", help="client assign: the IQN it boots")
    cl.add_argument("--name", help="client assign: a name for people")
    cl.add_argument("--lun", type=int, help="client assign: the LUN of its target")
    cl.set_defaults(fn=cmd_client)

    cli_images.add_parsers(sub, add)
    sub.choices["image"].set_defaults(fn=lambda ctl, args: cli_images.cmd_image(
        ctl, args, table=_table, answer_of=_answer, error=CliError))

    cli_media.add_parsers(sub, add)
    sub.choices["lun"].set_defaults(fn=lambda ctl, args: cli_media.cmd_lun(ctl, args, error=CliError))

    le = add(sub, "leases", summary("lease-list"))
    le.add_argument("--all", action="store_true", help="include released and expired leases")
    le.set_defaults(fn=cmd_leases)
    ls = add(sub, "lease", "act on a lease")
    lsub = ls.add_subparsers(dest="action", required=True)
    rel = add(lsub, "release", summary("lease-release"))
    rel.add_argument("mac").completer = _mac_completer
    ls.set_defaults(fn=cmd_lease)

    op = add(sub, "operation", "follow a long operation (image import/export, LUN resync) by its id until it ends")
    op.add_argument("op", help="the operation's id (its events' fields.op)")
    op.add_argument("--from-start", action="store_true", help="replay its stored events instead of only new ones")
    op.add_argument("--within", type=float, metavar="SECONDS", help="give up after this long")
    op.add_argument("--title", help="the progress bar's label")
    op.set_defaults(fn=cmd_operation)

    add(sub, "commands", "the controller's commands and their help (from list-commands)").set_defaults(fn=cmd_commands)

    k = add(sub, "keys", "CURVE keys for a bus over tcp")
    ksub = k.add_subparsers(dest="action", required=True)
    kg = add(ksub, "generate", "write server and client key pairs into <state-dir>/keys")
    kg.add_argument("--force", action="store_true")
    k.set_defaults(fn=cmd_keys)

    w = add(sub, "web", "the web dashboard")
    wsub = w.add_subparsers(dest="action", required=True)
    add(wsub, "passwd", "print the hash of a password for web.password_hash (asked on a terminal, else one line of "
        "standard input); no controller needed")
    w.set_defaults(fn=cmd_web)

    co = add(sub, "completion", "print the shell completion script: source <(bootfleet completion bash)")
    co.add_argument("shell", nargs="?", default="bash", choices=("bash", "zsh", "fish", "tcsh", "powershell"))
    co.set_defaults(fn=cmd_completion)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    import argcomplete

    argcomplete.autocomplete(parser)  # answers the shell's completion request and exits; otherwise nothing
    args = parser.parse_args(argv)
    for name, value in GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctl = Control(Path(args.state_dir), args.timeout)
    try:
        code = args.fn(ctl, args)
    except CliError as exc:
        print(f"bootfleet: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
