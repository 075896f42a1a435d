"""The control channel's commands: `{command, arguments}` in, `{result, text, arguments}` out (Kea's shape).

Result codes: 0 success, 1 error, 2 unsupported command, 3 empty (nothing matched). Each handler's docstring
is its help text, listed by `list-commands`. A handler returns the answer, or None when it has handed the
work to a background call that answers later.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable

from services.controller.config_store import get_path, set_path
from services.controller.fleet import timeline
from services.controller.supervisor_rpc import RUNNING_STATES
from shared.boot import target_for
from shared.config.loader import ConfigError
from shared.config.model import SERVICES
from shared.paths import state_path

if TYPE_CHECKING:
    from services.controller.server import Controller

SUCCESS, ERROR, UNSUPPORTED, EMPTY = 0, 1, 2, 3
SHOWN_STATES = RUNNING_STATES | {"FATAL", "EXITED"}
Answer = dict[str, Any] | None
HANDLERS: dict[str, Callable[["Controller", list[bytes], dict[str, Any]], Answer]] = {}


def command(name: str):
    def register(fn):
        HANDLERS[name] = fn
        return fn

    return register


def ok(text: str, **arguments: Any) -> dict[str, Any]:
    return {"result": SUCCESS, "text": text, "arguments": arguments}


def error(text: str, **arguments: Any) -> dict[str, Any]:
    return {"result": ERROR, "text": text, "arguments": arguments}


def dispatch(ctl: "Controller", envelope: list[bytes], name: str, args: dict[str, Any]) -> Answer:
    handler = HANDLERS.get(name)
    if handler is None:
        return {"result": UNSUPPORTED, "text": f"'{name}' command not supported", "arguments": {}}
    try:
        return handler(ctl, envelope, args)
    except BadArgument as exc:
        return error(str(exc))


@command("list-commands")
def list_commands(ctl, envelope, args):
    """The commands this controller answers, with their help."""
    return ok(f"{len(HANDLERS)} commands", commands={n: (h.__doc__ or "").strip() for n, h in sorted(HANDLERS.items())})


@command("config-get")
def config_get(ctl, envelope, args):
    """The running configuration (or the value at `path`) and its revision."""
    path = args.get("path") or ""
    try:
        value = get_path(ctl.store.data, path)
    except ConfigError as exc:
        return error(str(exc))
    return ok(f"revision {ctl.store.revision}", revision=ctl.store.revision, path=path, value=value)


@command("config-test")
def config_test(ctl, envelope, args):
    """Validate `config` (a whole configuration) without applying it."""
    try:
        ctl.store.stage(args.get("config"))
    except ConfigError as exc:
        return error(f"configuration rejected: {exc}", errors=exc.errors)
    return ok("configuration is valid")


def _commit(ctl: "Controller", data: Any) -> dict[str, Any]:
    try:
        revision = ctl.commit(data)
    except ConfigError as exc:
        return error(
            f"configuration rejected, revision {ctl.store.revision} stays: {exc}",
            errors=exc.errors,
            revision=ctl.store.revision,
        )
    return ok(f"revision {revision} published", revision=revision)


@command("config-apply")
def config_apply(ctl, envelope, args):
    """Validate `config` and publish it as the next revision."""
    return _commit(ctl, args.get("config"))


@command("config-set")
def config_set(ctl, envelope, args):
    """Set the value at `path` (e.g. dhcp.scopes[0].lease_time) and publish the next revision."""
    path = args.get("path")
    if not isinstance(path, str) or not path:
        return error("config-set needs a path")
    try:
        data = set_path(ctl.store.data, path, args.get("value"))
    except ConfigError as exc:
        return error(str(exc))
    return _commit(ctl, data)


def _process_rows(ctl: "Controller") -> tuple[list[dict[str, Any]], str | None]:
    """Every service process: supervisord's view joined with its heartbeats."""
    now = time.time()
    timeout = ctl.config.bus.heartbeat_timeout
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    warning = None
    if ctl.supervisor.available():
        try:
            for proc in ctl.supervisor.processes():
                if proc["group"] not in SERVICES:
                    continue
                if proc["statename"] not in SHOWN_STATES:
                    continue  # a slot scale.<service> leaves stopped
                instance = int(proc["name"].rsplit("_", 1)[1])
                rows[(proc["group"], instance)] = {
                    "service": proc["group"],
                    "instance": instance,
                    "state": proc["statename"],
                    "pid": proc["pid"] or None,
                    "uptime": (proc["now"] - proc["start"]) if proc["pid"] else None,
                }
        except Exception as exc:
            warning = str(exc)
    for (service, instance), beat in ctl.services.rows.items():
        row = rows.setdefault(
            (service, instance),
            {"service": service, "instance": instance, "state": None, "pid": beat.pid, "uptime": now - beat.started},
        )
        if row["pid"] not in (None, beat.pid):
            continue  # the heartbeat is from a process that has since been replaced
        healthy = now - beat.last_beat <= timeout
        row.update(
            revision=beat.revision,
            last_beat=round(now - beat.last_beat, 1),
            health="ok" if healthy and beat.revision == ctl.store.revision else ("stale" if healthy else "silent"),
            events_emitted=beat.emitted,
            events_dropped=beat.dropped,
            events_received=beat.received,
            counters=beat.counters,
        )
        if row["state"] is None:
            row["state"] = "RUNNING" if healthy else "UNKNOWN"
    return [rows[k] for k in sorted(rows)], warning


@command("status-get")
def status_get(ctl, envelope, args):
    """The controller and every service process: state, pid, applied revision, uptime, heartbeat, counters."""
    processes, warning = _process_rows(ctl)
    controller = {
        "pid": ctl.pid,
        "uptime": round(time.time() - ctl.started, 1),
        "revision": ctl.store.revision,
        "epoch": ctl.clone.epoch,
        "events_received": ctl.events_received,
        "events_stored": ctl.events.count(),
        "bad_messages": ctl.bad_messages,
        "supervisord": ctl.supervisor.available(),
    }
    text = f"revision {ctl.store.revision}, {len(processes)} service processes"
    if warning:
        text += f" (supervisord: {warning})"
    return ok(text, controller=controller, processes=processes)


@command("events-list")
def events_list(ctl, envelope, args):
    """Stored events, oldest first: `after_id`, `since` (unix time), `type` (or a prefix), `mac`, `limit`."""
    try:
        rows = ctl.events.query(
            after_id=int(args.get("after_id") or 0),
            since=float(args["since"]) if args.get("since") is not None else None,
            type=args.get("type"),
            mac=args.get("mac"),
            limit=min(int(args.get("limit") or 100), 10000),
        )
    except (TypeError, ValueError) as exc:
        return error(f"events-list: {exc}")
    return {"result": SUCCESS if rows else EMPTY, "text": f"{len(rows)} events", "arguments": {"events": rows}}


class BadArgument(Exception):
    pass


def _supervised_service(command: str, ctl: "Controller", args: dict[str, Any]) -> str:
    """The `service` argument, checked, with supervisord there to act on it."""
    service = args.get("service")
    if service not in SERVICES:
        raise BadArgument(f"{command}: service must be one of {', '.join(SERVICES)}")
    if not ctl.supervisor.available():
        raise BadArgument(f"{command}: supervisord is not running (start the stack with `make up`)")
    return service


def _mac_arg(args: dict[str, Any]) -> str:
    from shared.config.base import normalize_mac

    try:
        return normalize_mac(args.get("mac"))
    except ValueError as exc:
        raise BadArgument(str(exc)) from None


@command("service-restart")
def service_restart(ctl, envelope, args):
    """Restart each process of `service`, one after the other (through supervisord)."""
    service = _supervised_service("service-restart", ctl, args)
    ctl.submit(envelope, lambda: ctl.supervisor.restart(service), lambda names: ok(f"restarted {len(names)} processes", restarted=names))
    return None


@command("service-scale")
def service_scale(ctl, envelope, args):
    """Run `count` processes of `service` (recorded as scale.<service> in the configuration)."""
    service = _supervised_service("service-scale", ctl, args)
    try:
        count = int(args.get("count"))
    except (TypeError, ValueError):
        return error("service-scale: count must be a whole number")
    answer = _commit(ctl, set_path(ctl.store.data, f"scale.{service}", count))
    if answer["result"] != SUCCESS:
        return answer
    revision = answer["arguments"]["revision"]
    ctl.submit(
        envelope,
        lambda: ctl.supervisor.scale(service, count),
        lambda done: ok(f"{service}: {count} process{'' if count == 1 else 'es'} (revision {revision})", revision=revision, **done),
    )
    return None


def _client_rows(ctl: "Controller") -> list[dict[str, Any]]:
    names = {c.mac: c.name for c in ctl.config.clients}
    rows = []
    for mac, row in sorted(ctl.clients.by_mac.items()):
        target = target_for(ctl.config, mac, row.ip)
        rows.append(
            {
                **row.as_dict(),
                "name": names.get(mac),
                "target": f"{target[0]} lun {target[1]}" if target else None,
            }
        )
    return rows


@command("client-list")
def client_list(ctl, envelope, args):
    """Every known PC: MAC, name, IP, assigned target, state, last boot."""
    rows = _client_rows(ctl)
    return {"result": SUCCESS if rows else EMPTY, "text": f"{len(rows)} clients", "arguments": {"clients": rows}}


@command("client-get")
def client_get(ctl, envelope, args):
    """One PC (`mac`): its row and the timeline of its last boot, assembled from events."""
    mac = _mac_arg(args)
    row = ctl.clients.by_mac.get(mac)
    if row is None:
        return {"result": EMPTY, "text": f"no client {mac}", "arguments": {}}
    since = (row.last_boot or row.last_event) - 1
    ips = {ip for ip, m in ctl.clients.mac_by_ip.items() if m == mac} | ({row.ip} if row.ip else set())
    events = ctl.events.query(since=since, mac=mac, ips=sorted(ips), limit=5000)
    client = next((c for c in _client_rows(ctl) if c["mac"] == mac), row.as_dict())
    return ok(f"client {mac}", client=client, timeline=timeline(events))


@command("lease-list")
def lease_list(ctl, envelope, args):
    """Leases from the DHCP lease store (read-only, while the service writes): IP, MAC, scope, state, expiry.
    `all`: include released and expired ones. Without a store yet: what lease events have told the controller."""
    from services.dhcp.lease_store import LeaseStore

    path = state_path(ctl.state_dir, ctl.config.dhcp.lease_file)
    if path.exists():
        store = LeaseStore.open_readonly(path)
        try:
            leases = store.list(include_free=bool(args.get("all")))
        finally:
            store.close()
        source = str(path)
    else:
        leases = [
            {"ip": key[len("lease/") :], "state": "bound", **val}
            for key, (seq, val) in sorted(ctl.clone.store.items())
            if key.startswith("lease/")
        ]
        source = "events"
    return {"result": SUCCESS if leases else EMPTY, "text": f"{len(leases)} leases", "arguments": {"leases": leases, "source": source}}


@command("lease-release")
def lease_release(ctl, envelope, args):
    """Free the lease of `mac`: the DHCP service releases it and answers with a dhcp.lease.released event."""
    from services.controller.server import Waiter
    from shared import events as ev

    mac = _mac_arg(args)
    ctl.send_command("dhcp", "lease-release", {"mac": mac})
    ctl.waiters.append(
        Waiter(
            envelope,
            lambda msg: msg["type"] == ev.LEASE_RELEASED and msg["fields"].get("mac") == mac,
            time.time() + float(args.get("timeout", 5.0)),
            lambda msg: ok(f"released {msg['fields'].get('ip')} held by {mac}", ip=msg["fields"].get("ip"), mac=mac),
            lambda: error(f"no DHCP process released a lease of {mac} within 5 s (no such lease, or dhcp is not running)"),
        )
    )
    return None


@command("version-get")
def version_get(ctl, envelope, args):
    """The controller's version and process id."""
    return ok("bootfleet 0.1.0", version="0.1.0", pid=os.getpid())
