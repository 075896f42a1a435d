"""The control channel's commands: `{command, arguments}` in, `{result, text, arguments}` out (Kea's shape).

Result codes: 0 success, 1 error, 2 unsupported command, 3 empty (nothing matched). `COMMANDS` is the one
table of commands: each handler's docstring is its help (first line: a summary), answered by `list-commands`
and rendered by the `bootfleet` CLI as its own help. A handler gets the controller's `Facade` and returns the
answer, or None when it has handed the work to a background call (or a waiter) that answers later.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from services.controller.config_store import get_path, set_path
from services.controller.event_watch import MAX_WAIT, Watch, select
from services.controller.facade import Facade
from services.controller.fleet import timeline
from services.controller.supervisor_rpc import RUNNING_STATES
from services.controller.waiters import Waiter
from shared import events as ev
from shared.boot import target_for
from shared.config.loader import ConfigError
from shared.config.model import SERVICES

SUCCESS, ERROR, UNSUPPORTED, EMPTY = 0, 1, 2, 3
SHOWN_STATES = RUNNING_STATES | {"FATAL", "EXITED"}
Answer = dict[str, Any] | None
Handler = Callable[[Facade, list[bytes], dict[str, Any]], Answer]


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # the handler's docstring
    handler: Handler

    @property
    def summary(self) -> str:
        """The first paragraph, on one line (what the CLI shows)."""
        return " ".join(self.help.split("\n\n", 1)[0].split())


COMMANDS: dict[str, Command] = {}


def command(name: str):
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = Command(name, inspect.cleandoc(fn.__doc__ or ""), fn)
        return fn

    return register


def summary(name: str) -> str:
    return COMMANDS[name].summary


def ok(text: str, **arguments: Any) -> dict[str, Any]:
    return {"result": SUCCESS, "text": text, "arguments": arguments}


def error(text: str, **arguments: Any) -> dict[str, Any]:
    return {"result": ERROR, "text": text, "arguments": arguments}


def dispatch(ctl: Facade, envelope: list[bytes], name: str, args: dict[str, Any]) -> Answer:
    cmd = COMMANDS.get(name)
    if cmd is None:
        return {"result": UNSUPPORTED, "text": f"'{name}' command not supported", "arguments": {}}
    try:
        return cmd.handler(ctl, envelope, args)
    except BadArgument as exc:
        return error(str(exc))


@command("list-commands")
def list_commands(ctl, envelope, args):
    """The commands this controller answers, with their help."""
    return ok(f"{len(COMMANDS)} commands", commands={n: c.help for n, c in sorted(COMMANDS.items())})


@command("config-get")
def config_get(ctl, envelope, args):
    """The running configuration, or the value at a path, and its revision.

    Arguments: `path` (optional, e.g. boot.default_lun)."""
    path = args.get("path") or ""
    try:
        value = get_path(ctl.config.data, path)
    except ConfigError as exc:
        return error(str(exc))
    return ok(f"revision {ctl.config.revision}", revision=ctl.config.revision, path=path, value=value)


@command("config-test")
def config_test(ctl, envelope, args):
    """Validate a whole configuration without applying it.

    Arguments: `config` (the configuration)."""
    try:
        ctl.config.stage(args.get("config"))
    except ConfigError as exc:
        return error(f"configuration rejected: {exc}", errors=exc.errors)
    return ok("configuration is valid")


def _commit(ctl: Facade, data: Any) -> dict[str, Any]:
    try:
        revision = ctl.commit(data)
    except ConfigError as exc:
        return error(
            f"configuration rejected, revision {ctl.config.revision} stays: {exc}",
            errors=exc.errors,
            revision=ctl.config.revision,
        )
    return ok(f"revision {revision} published", revision=revision)


@command("config-apply")
def config_apply(ctl, envelope, args):
    """Validate a whole configuration and publish it as the next revision.

    Arguments: `config` (the configuration). One equal to the running configuration is no new revision."""
    return _commit(ctl, args.get("config"))


@command("config-set")
def config_set(ctl, envelope, args):
    """Set the value at a path (e.g. dhcp.scopes[0].lease_time) and publish the next revision.

    Arguments: `path`, `value`."""
    path = args.get("path")
    if not isinstance(path, str) or not path:
        return error("config-set needs a path")
    try:
        data = set_path(ctl.config.data, path, args.get("value"))
    except ConfigError as exc:
        return error(str(exc))
    return _commit(ctl, data)


def _process_rows(ctl: Facade) -> tuple[list[dict[str, Any]], str | None]:
    """Every service process: supervisord's view joined with its heartbeats."""
    now = time.time()
    timeout = ctl.running.bus.heartbeat_timeout
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
    for (service, instance), beat in ctl.fleet.services.rows.items():
        row = rows.setdefault(
            (service, instance),
            {"service": service, "instance": instance, "state": None, "pid": beat.pid, "uptime": now - beat.started},
        )
        if row["pid"] not in (None, beat.pid):
            continue  # the heartbeat is from a process that has since been replaced
        healthy = beat.healthy(now, timeout)
        row.update(
            revision=beat.revision,
            last_beat=round(now - beat.last_beat, 1),
            health=beat.health(now, timeout, ctl.config.revision),
            failed=beat.failed,
            events_emitted=beat.emitted,
            events_dropped=beat.dropped,
            events_received=beat.received,
            counters=beat.counters,
            events_by_type=dict(beat.by_type),
            **({"iscsi_io": beat.io.as_dict()} if beat.io else {}),
        )
        if row["state"] is None:
            row["state"] = "RUNNING" if healthy else "UNKNOWN"
    return [rows[k] for k in sorted(rows)], warning


@command("status-get")
def status_get(ctl, envelope, args):
    """The controller and each service process: state, pid, applied revision, uptime, heartbeat, counters."""
    processes, warning = _process_rows(ctl)
    controller = {
        "pid": ctl.stats.pid,
        "uptime": round(time.time() - ctl.stats.started, 1),
        "revision": ctl.config.revision,
        "epoch": ctl.stats.epoch,
        "events_received": ctl.stats.events_received,
        "events_stored": ctl.events.count(),
        "bad_messages": ctl.stats.bad_messages,
        "supervisord": ctl.supervisor.available(),
        "web": ctl.stats.web,
    }
    text = f"revision {ctl.config.revision}, {len(processes)} service processes"
    if warning:
        text += f" (supervisord: {warning})"
    # `scale` with 'auto' resolved on the controller's host: the processes it starts
    return ok(text, controller=controller, processes=processes, scale=ctl.running.scale.resolved())


@command("events-list")
def events_list(ctl, envelope, args):
    """Stored events, oldest first.

    Arguments (all optional): `after_id`, `since` (unix time), `type` (a type or a prefix), `mac`, `limit`."""
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


def events_answer(rows: list[dict[str, Any]], last_id: int) -> dict[str, Any]:
    """events-wait's answer: the events, and the id to ask after next."""
    return {"result": SUCCESS if rows else EMPTY, "text": f"{len(rows)} events", "arguments": {"events": rows, "last_id": last_id}}


@command("events-wait")
def events_wait(ctl, envelope, args):
    """Events stored after `after_id`, answered as soon as there are any (a long poll: `events --follow`).

    Arguments: `after_id` (the last id seen), `type`, `mac`, `op` (only the events of one long operation: their
    `fields.op`), `limit`, `wait` (seconds to hold the request; default 25, at most 60). Answer: as events-list,
    plus `last_id` (ask after it next); result 3 (empty) when `wait` passed with nothing new."""
    try:
        query = {
            "after_id": int(args.get("after_id") or 0),
            "type": args.get("type"),
            "mac": args.get("mac"),
            "limit": min(int(args.get("limit") or 1000), 10000),
        }
        wait = min(max(float(args.get("wait", 25.0)), 0.0), MAX_WAIT)
    except (TypeError, ValueError) as exc:
        return error(f"events-wait: {exc}")
    op = args.get("op") or None
    rows = ctl.events.query(**query)
    if rows:
        query["after_id"] = rows[-1]["id"]
    picked = select(rows, op)
    if picked or not wait:
        return events_answer(picked, query["after_id"])
    ctl.watch(Watch(envelope, query, op, time.time() + wait))
    return None


class BadArgument(Exception):
    pass


def _supervised_service(command: str, ctl: Facade, args: dict[str, Any]) -> str:
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
    """Restart each process of a service, one after the other (through supervisord).

    Arguments: `service`."""
    service = _supervised_service("service-restart", ctl, args)
    ctl.submit(envelope, lambda: ctl.supervisor.restart(service), lambda names: ok(f"restarted {len(names)} processes", restarted=names))
    return None


@command("service-scale")
def service_scale(ctl, envelope, args):
    """Run N processes of a service (recorded as scale.<service> in the configuration); `auto`: one per
    usable core of the controller's host.

    Arguments: `service`, `count` (a whole number or "auto")."""
    service = _supervised_service("service-scale", ctl, args)
    value = args.get("count")
    try:
        value = value if value == "auto" else int(value)
    except (TypeError, ValueError):
        return error("service-scale: count must be a whole number or 'auto'")
    answer = _commit(ctl, set_path(ctl.config.data, f"scale.{service}", value))
    if answer["result"] != SUCCESS:
        return answer
    revision = answer["arguments"]["revision"]
    count = ctl.running.scale.processes(service)
    ctl.submit(
        envelope,
        lambda: ctl.supervisor.scale(service, count),
        lambda done: ok(f"{service}: {count} process{'' if count == 1 else 'es'} (revision {revision})", revision=revision, **done),
    )
    return None


def _configured(config, mac: str) -> bool:
    """Somebody configured this PC: a clients[] entry or a DHCP reservation."""
    return any(c.mac == mac for c in config.clients) or any(
        r.mac == mac for s in config.dhcp.scopes for r in s.reservations)


def _identity(ctl: Facade, mac: str, row) -> dict[str, Any]:
    """What the PC said of itself (uuid, nic, arch, firmware); a PC nobody configured is `new` (its boot
    progress, the state it would otherwise show, goes in `progress`)."""
    out = {"uuid": None, "firmware": None, **row.identity}
    if not _configured(ctl.running, mac):
        out.update(state="new", progress=row.state)
    return out


@command("client-assign")
def client_assign(ctl, envelope, args):
    """Adopt a PC (a `new` one, or change one): add or update its clients[] entry, as a new revision.

    Arguments: `mac`, `target` (IQN), `name`, `lun`; or, for a PC on an image, `image` and `mode` (discard,
    persistent, super, readonly, refuse; default the image's) instead of `target` and `lun`. Only the arguments
    given change an existing entry; the others stay as they are. A PC on an image that is logged in keeps its
    disk until its next power-on (docs/images.md)."""
    import copy

    mac = _mac_arg(args)
    changes = {key: args[key] for key in ("target", "name", "lun", "image", "mode") if args.get(key) is not None}
    if not changes:
        return error("client-assign: give at least one of target, name, lun, image, mode")
    if "target" in changes and ("image" in changes or "mode" in changes):
        return error("client-assign: a PC boots a target or an image, not both")
    data = copy.deepcopy(ctl.config.data)
    clients = data.setdefault("clients", [])
    entry = next((c for c in clients if str(c.get("mac", "")).lower().replace("-", ":") == mac), None)
    if entry is None:
        entry = {"mac": mac}
        clients.append(entry)
    for a, b in (("image", ("target", "lun")), ("target", ("image", "mode"))):
        if a in changes:  # the other kind of assignment goes
            for key in b:
                entry.pop(key, None)
    entry.update(changes)
    answer = _commit(ctl, data)
    if answer["result"] != SUCCESS:
        return answer
    revision = answer["arguments"]["revision"]
    text = f"client {mac}: {', '.join(f'{k} {v}' for k, v in changes.items())} (revision {revision})"
    extra = image_commands.client_image_fields(ctl, mac)
    if extra and ctl.pcboot.logged_in(mac):
        text += "; it is logged in: the change takes effect at its next power-on"
    return ok(text, revision=revision, client=entry, **extra)


def _client_rows(ctl: Facade) -> list[dict[str, Any]]:
    names = {c.mac: c.name for c in ctl.running.clients}
    now = time.time()
    rows = []
    for mac, row in sorted(ctl.fleet.clients.by_mac.items()):
        target = target_for(ctl.running, mac, row.ip)
        rows.append(
            {
                **row.as_dict(now),
                "name": names.get(mac),
                **_identity(ctl, mac, row),
                "target": f"{target[0]} lun {target[1]}" if target else None,
                **image_commands.client_image_fields(ctl, mac),  # a PC on an image: its own target, version, overlay
            }
        )
    return rows


@command("client-list")
def client_list(ctl, envelope, args):
    """Every known PC: MAC, name, IP, assigned target, state, last boot; on an image also its image, version,
    mode, overlay size and sessions."""
    rows = _client_rows(ctl)
    return {"result": SUCCESS if rows else EMPTY, "text": f"{len(rows)} clients", "arguments": {"clients": rows}}


@command("client-get")
def client_get(ctl, envelope, args):
    """One PC and the timeline of its last boot, assembled from events.

    Arguments: `mac`."""
    mac = _mac_arg(args)
    row = ctl.fleet.clients.by_mac.get(mac)
    if row is None:
        return {"result": EMPTY, "text": f"no client {mac}", "arguments": {}}
    since = (row.last_boot or row.last_event) - 1
    ips = {ip for ip, m in ctl.fleet.clients.mac_by_ip.items() if m == mac} | ({row.ip} if row.ip else set())
    events = ctl.events.query(since=since, mac=mac, ips=sorted(ips), limit=5000)
    client = next((c for c in _client_rows(ctl) if c["mac"] == mac), row.as_dict())
    return ok(f"client {mac}", client=client, timeline=timeline(events))


@command("lease-list")
def lease_list(ctl, envelope, args):
    """DHCP leases from the lease store: IP, MAC, scope, state, expiry.

    Arguments: `all` (include released and expired ones). The store is read read-only while the DHCP service
    writes it; without a store yet, the answer is what lease events have told the controller."""
    leases, source = ctl.leases.list(include_free=bool(args.get("all")))
    return {"result": SUCCESS if leases else EMPTY, "text": f"{len(leases)} leases", "arguments": {"leases": leases, "source": source}}


@command("lease-release")
def lease_release(ctl, envelope, args):
    """Free the lease of a MAC: the DHCP service releases it and answers with a dhcp.lease.released event.

    Arguments: `mac`, `timeout` (seconds, default 5)."""
    mac = _mac_arg(args)
    ctl.ask(
        "dhcp",
        "lease-release",
        {"mac": mac},
        Waiter(
            envelope,
            lambda msg: msg["type"] == ev.LEASE_RELEASED and msg["fields"].get("mac") == mac,
            time.time() + float(args.get("timeout", 5.0)),
            lambda msg: ok(f"released {msg['fields'].get('ip')} held by {mac}", ip=msg["fields"].get("ip"), mac=mac),
            lambda: error(f"no DHCP process released a lease of {mac} within 5 s (no such lease, or dhcp is not running)"),
        ),
    )
    return None


@command("version-get")
def version_get(ctl, envelope, args):
    """The controller's version and process id."""
    return ok("bootfleet 0.1.0", version="0.1.0", pid=os.getpid())


from services.controller import image_commands  # noqa: E402  (registers image-* and client-reset in COMMANDS)
from services.controller import media_commands  # noqa: E402  (registers lun-resync)
