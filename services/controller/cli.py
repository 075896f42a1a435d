"""`bootfleet`: the command line for a running stack; a thin layer over the controller's control channel.

Exit codes: 0 success, 1 error (one line saying why), 2 usage. `--json` prints the controller's
arguments as JSON instead of tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import yaml
import zmq

from services.controller.commands import COMMANDS, summary
from shared.bus.endpoints import control_endpoint
from shared.config.model import SERVICES

STATE_DIR = os.environ.get("BOOTFLEET_STATE_DIR", "var")


class CliError(Exception):
    pass


class Control:
    """Requests to the controller's control socket, each with a deadline."""

    def __init__(self, state_dir: Path, timeout: float):
        self.endpoint = control_endpoint(state_dir)
        self.timeout = timeout

    def call(self, command: str, **arguments: Any) -> dict[str, Any]:
        sock_path = self.endpoint[len("ipc://") :]
        if not os.path.exists(sock_path):
            raise CliError(f"the controller is not running (no {sock_path}); start the stack with `make up`")
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.REQ)
        sock.linger = 0
        try:
            sock.connect(self.endpoint)
            sock.send(msgpack.packb({"command": command, "arguments": arguments}, use_bin_type=True))
            if not sock.poll(self.timeout * 1000):
                raise CliError(f"the controller did not answer {command} within {self.timeout:.0f} s ({self.endpoint})")
            return msgpack.unpackb(sock.recv(), raw=False)
        finally:
            sock.close()


# -- output ---------------------------------------------------------------------------------------
def _table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("-" if v is None or v == "" else str(v) for v in row))
    Console(width=max(100, _terminal_width())).print(table)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 160


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def parse_since(text: str) -> float:
    """`90s`, `10m`, `2h`, `1d` ago, or an ISO date/time."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise CliError(f"--since {text}: expected 10m, 2h, 1d or an ISO date such as 2026-11-26T10:00") from None


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


def cmd_status(ctl: Control, args) -> int:
    def render(a):
        c = a["controller"]
        print(
            f"controller  pid {c['pid']}  up {_ago(c['uptime'])}  revision {c['revision']}  "
            f"events {c['events_received']} received, {c['events_stored']} stored"
            + ("" if c["supervisord"] else "  (no supervisord)")
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

    return _answer(ctl.call("status-get"), args, render)


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
    last = events[-1]["id"] if events else 0
    query.pop("since", None)
    try:
        while True:
            time.sleep(0.5)
            answer = ctl.call("events-list", after_id=last, **{**query, "limit": 1000})
            for e in answer["arguments"].get("events", []):
                print(json.dumps(e, default=str) if args.json else _event_line(e), flush=True)
                last = e["id"]
    except KeyboardInterrupt:
        return 0


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
        _table(columns, rows)

    return _answer(ctl.call("client-list"), args, render)


def cmd_client_assign(ctl: Control, args) -> int:
    if len(args.more) != 1:
        raise CliError("usage: bootfleet client assign MAC --target IQN [--name NAME] [--lun N]")
    return _answer(ctl.call("client-assign", mac=args.more[0], target=args.target, name=args.name, lun=args.lun), args)


def cmd_client(ctl: Control, args) -> int:
    if args.mac == "assign":
        return cmd_client_assign(ctl, args)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bootfleet", description="Control a running Bootfleet stack.")
    p.add_argument("--state-dir", default=STATE_DIR, help="the stack's state directory (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the controller")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sub.add_parser("status", help=summary("status-get")).set_defaults(fn=cmd_status)

    c = sub.add_parser("config", help="test, apply, set, get the configuration; print its JSON Schema")
    csub = c.add_subparsers(dest="action", required=True)
    t = csub.add_parser("test", help=summary("config-test") + " (here: no controller needed)")
    t.add_argument("file")
    a = csub.add_parser("apply", help=summary("config-apply"))
    a.add_argument("file")
    s = csub.add_parser("set", help=summary("config-set"))
    s.add_argument("path")
    s.add_argument("value", help="a YAML value")
    g = csub.add_parser("get", help=summary("config-get"))
    g.add_argument("path", nargs="?")
    csub.add_parser("schema", help="the configuration's JSON Schema, for editors")
    c.set_defaults(fn=cmd_config)

    e = sub.add_parser("events", help=summary("events-list"))
    e.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    e.add_argument("--type", help="an event type or a prefix (dhcp, tftp.transfer, iscsi.login)")
    e.add_argument("--since", help="10m, 2h, 1d, or an ISO date/time")
    e.add_argument("--mac", help="only events naming this MAC")
    e.add_argument("--limit", type=int, default=100)
    e.set_defaults(fn=cmd_events)

    sv = sub.add_parser("service", help="restart or scale a service (through supervisord)")
    svsub = sv.add_subparsers(dest="action", required=True)
    r = svsub.add_parser("restart", help=summary("service-restart"))
    r.add_argument("name", choices=SERVICES)
    sc = svsub.add_parser("scale", help=summary("service-scale"))
    sc.add_argument("name", choices=SERVICES)
    sc.add_argument("count", type=int)
    sv.set_defaults(fn=cmd_service)

    sub.add_parser("clients", help=summary("client-list")).set_defaults(fn=cmd_clients)
    cl = sub.add_parser("client", help=summary("client-get"))
    cl.add_argument("mac")
    cl.add_argument("more", nargs="*", help="with `client assign MAC`: the PC to adopt")
    cl.add_argument("--target", help="client assign: the IQN it boots")
    cl.add_argument("--name", help="client assign: a name for people")
    cl.add_argument("--lun", type=int, help="client assign: the LUN of its target")
    cl.set_defaults(fn=cmd_client)

    le = sub.add_parser("leases", help=summary("lease-list"))
    le.add_argument("--all", action="store_true", help="include released and expired leases")
    le.set_defaults(fn=cmd_leases)
    ls = sub.add_parser("lease", help="act on a lease")
    lsub = ls.add_subparsers(dest="action", required=True)
    rel = lsub.add_parser("release", help=summary("lease-release"))
    rel.add_argument("mac")
    ls.set_defaults(fn=cmd_lease)

    sub.add_parser("commands", help="the controller's commands and their help (from list-commands)").set_defaults(fn=cmd_commands)

    k = sub.add_parser("keys", help="CURVE keys for a bus over tcp")
    ksub = k.add_subparsers(dest="action", required=True)
    kg = ksub.add_parser("generate", help="write server and client key pairs into <state-dir>/keys")
    kg.add_argument("--force", action="store_true")
    k.set_defaults(fn=cmd_keys)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ctl = Control(Path(args.state_dir), args.timeout)
    try:
        code = args.fn(ctl, args)
    except CliError as exc:
        print(f"bootfleet: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
