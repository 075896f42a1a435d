"""The dashboard's pages, rendered on the server from the answers of the control commands the CLI prints.

Each page function takes those answers (the `arguments` of `client-list`, `client-get`, `status-get`,
`events-list`, `image-list`) and returns HTML; nothing here asks the controller anything. Actions are buttons
that name a control command and its arguments (`data-command`, `data-args`); app.js asks for confirmation
and posts them to /api/<command>. Every value from the fleet is escaped.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from services.controller.web import waterfall

NAV = (("/", "Fleet"), ("/images", "Images"), ("/services", "Services"), ("/events", "Events"), ("/metrics", "Metrics"))


def e(value: Any) -> str:
    return "-" if value is None or value == "" else escape(str(value))


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def rate(n: float | None) -> str:
    return "-" if n is None else f"{human_bytes(n)}/s"


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def overlay_size(c: dict[str, Any]) -> float | None:
    from services.controller.web.metrics import _overlay_bytes

    return _overlay_bytes(c)


def action(label: str, command: str, args: dict[str, Any], confirm: str, input_name: str | None = None,
           input_label: str = "", input_value: Any = "", danger: bool = False) -> str:
    """A button for a control command; app.js confirms it in a dialog, then posts it."""
    attrs = {
        "class": "action danger" if danger else "action",
        "type": "button",
        "data-command": command,
        "data-args": json.dumps(args),
        "data-confirm": confirm,
    }
    if input_name:
        attrs.update({"data-input": input_name, "data-input-label": input_label, "data-input-value": str(input_value)})
    return "<button " + " ".join(f'{k}="{escape(v)}"' for k, v in attrs.items()) + f">{escape(label)}</button>"


def layout(title: str, body: str, *, path: str, csrf: str | None, logged_in: bool, live: bool = True) -> str:
    nav = "".join(
        f'<a href="{href}"{" class=current" if (href == path or (href != "/" and path.startswith(href))) else ""}>{name}</a>'
        for href, name in NAV
    )
    who = ('<form method="post" action="/logout" class="inline"><button type="submit">log out</button></form>'
           if logged_in else '<a href="/login" id="login-link">log in</a>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · Bootfleet</title>
<meta name="csrf-token" content="{escape(csrf or '')}">
<link rel="stylesheet" href="/static/style.css"></head>
<body data-live="{'1' if live else '0'}">
<header><span class="brand">Bootfleet</span><nav>{nav}</nav><span id="live" class="live">connecting…</span><span class="who">{who}</span></header>
<div id="flash" role="status"></div>
<main id="main">{body}</main>
<dialog id="confirm"><form method="dialog"><p id="confirm-text"></p>
<label id="confirm-input-label" hidden><span></span> <input id="confirm-input" name="value"></label>
<menu><button value="cancel" id="confirm-cancel">Cancel</button> <button value="ok" id="confirm-ok" class="danger">Confirm</button></menu>
</form></dialog>
<script src="/static/app.js"></script>
</body></html>"""


def login(message: str = "") -> str:
    return f"""<h1>Log in</h1>
<p>Paste the token from <code>&lt;state directory&gt;/web-token</code> (readable by the stack's owner), or the
password set as <code>web.password_hash</code>.</p>
{f'<p class="error">{escape(message)}</p>' if message else ''}
<form method="post" action="/login" class="login"><input type="password" name="secret" id="secret" autofocus
 placeholder="token or password"> <button type="submit" id="login">Log in</button></form>"""


# -- fleet --------------------------------------------------------------------------------------------------
FLEET_COLUMNS = ("name", "MAC", "state", "IP", "image", "version", "mode", "overlay", "read", "write", "last boot")


def fleet(clients: dict[str, Any], text: str = "") -> str:
    rows = []
    for c in clients.get("clients") or []:
        ov = overlay_size(c)
        cells = [
            (c.get("name") or "", f'<a href="/pc/{quote(c["mac"])}">{e(c.get("name") or c["mac"])}</a>'),
            (c["mac"], f'<a href="/pc/{quote(c["mac"])}"><code>{e(c["mac"])}</code></a>'),
            (c.get("state") or "", f'<span class="state state-{escape((c.get("state") or "").replace(" ", "-"))}">{e(c.get("state"))}</span>'),
            (c.get("ip") or "", e(c.get("ip"))),
            (c.get("image") or "", e(c.get("image"))),
            (c.get("version") if c.get("version") is not None else "", e(c.get("version"))),
            (c.get("mode") or "", e(c.get("mode"))),
            (ov if ov is not None else -1, human_bytes(ov)),
            (c.get("read_rate") or 0, rate(c.get("read_rate"))),
            (c.get("write_rate") or 0, rate(c.get("write_rate"))),
            (c.get("last_boot") or 0, when(c.get("last_boot"))),
        ]
        tds = "".join(f'<td data-sort="{escape(str(v))}">{h}</td>' for v, h in cells)
        rows.append(f'<tr data-mac="{escape(c["mac"])}">{tds}</tr>')
    head = "".join(f'<th data-col="{i}" tabindex="0">{name}</th>' for i, name in enumerate(FLEET_COLUMNS))
    body = "".join(rows) or f'<tr><td colspan="{len(FLEET_COLUMNS)}" class="empty">no PCs seen yet</td></tr>'
    return f"""<h1>Fleet</h1>
<p class="summary">{e(text)}</p>
<input type="search" class="filter" data-table="fleet" id="fleet-filter" placeholder="filter: name, MAC, state, IP, image…">
<table id="fleet" class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"""


# -- one PC -------------------------------------------------------------------------------------------------
def pc(detail: dict[str, Any] | None, mac: str, events: list[dict[str, Any]]) -> str:
    if not detail:
        return f'<h1>PC <code>{e(mac)}</code></h1><p class="empty">the controller knows no PC {e(mac)}</p>'
    c, steps = detail["client"], detail.get("timeline") or []
    found = waterfall.phases(steps)
    ov = overlay_size(c)
    facts = [("MAC", f"<code>{e(c['mac'])}</code>"), ("name", e(c.get("name"))), ("state", e(c.get("state"))),
             ("IP", e(c.get("ip"))), ("target", e(c.get("target"))), ("image", e(c.get("image"))),
             ("version", e(c.get("version"))), ("mode", e(c.get("mode"))), ("overlay", human_bytes(ov)),
             ("read", f"{human_bytes(c.get('read_bytes'))} ({rate(c.get('read_rate'))})"),
             ("written", f"{human_bytes(c.get('write_bytes'))} ({rate(c.get('write_rate'))})"),
             ("boots", e(c.get("boots"))), ("last boot", when(c.get("last_boot")))]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    phase_rows = "".join(f'<tr><td>{e(p.name)}</td><td>{p.start:.3f}</td><td>{p.duration:.3f}</td><td>{e(p.detail)}</td></tr>'
                         for p in found)
    step_rows = "".join(f'<tr><td>{s["t"]:.3f}</td><td>{e(s["step"])}</td><td>{e(s.get("detail"))}</td></tr>' for s in steps)
    actions = " ".join([
        action("Reset overlay", "client-reset", {"mac": c["mac"]},
               f"Reset the overlay of {c.get('name') or c['mac']}? Everything it wrote since its version is thrown away.",
               danger=True),
        action("Assign image…", "client-assign", {"mac": c["mac"]}, f"Assign an image to {c.get('name') or c['mac']}?",
               input_name="image", input_label="image", input_value=c.get("image") or ""),
    ])
    return f"""<h1>PC {e(c.get('name') or c['mac'])}</h1>
<dl class="facts">{dl}</dl>
<p class="actions">{actions}</p>
<h2>Last boot</h2>
{waterfall.svg(found)}
<table class="phases"><thead><tr><th>phase</th><th>start (s)</th><th>duration (s)</th><th>detail</th></tr></thead><tbody>{phase_rows}</tbody></table>
<details><summary>timeline steps</summary><table><thead><tr><th>t (s)</th><th>step</th><th>detail</th></tr></thead><tbody>{step_rows}</tbody></table></details>
<h2>Events</h2>
{event_table(events)}"""


# -- images -------------------------------------------------------------------------------------------------
def images(listing: dict[str, Any] | None, clients: dict[str, Any], note: str = "") -> str:
    found = (listing or {}).get("images") or []
    if not found:
        return f'<h1>Images</h1><p class="empty">no images{(" (" + escape(note) + ")") if note else ""}</p>'
    pcs: dict[tuple[str, str], list[str]] = {}
    for image in found:  # image-info's pcs[] (the version each booted last), else the client rows
        for pc in image.get("pcs") if isinstance(image.get("pcs"), list) else []:
            pcs.setdefault((image["name"], str(pc.get("version"))), []).append(f'{pc.get("pc") or pc.get("mac")} ({pc.get("mode")})')
    if not pcs:
        for c in clients.get("clients") or []:
            if c.get("image") is not None:
                pcs.setdefault((str(c["image"]), str(c.get("version"))), []).append(c.get("name") or c["mac"])
    parts = ["<h1>Images</h1>"]
    for image in found:
        name = image["name"]
        rows = []
        if image.get("in_store") is False:
            parts.append(f'<h2>{e(name)}</h2><p class="empty">named in the configuration, not created or imported yet</p>')
            continue
        for v in image.get("versions") or []:
            v = v if isinstance(v, dict) else {"n": v}  # image-list names versions; image-info describes them
            n = v.get("n", v.get("version"))
            current = n == image.get("current")
            running = ", ".join(pcs.get((name, str(n)), [])) or "-"
            button = "" if current else action("Roll back to this", "image-rollback", {"name": name, "version": n},
                                               f"Make version {n} of {name} current? PCs get it at their next power-on.")
            rows.append(f'<tr{" class=current" if current else ""}><td>{e(n)}{" (current)" if current else ""}</td>'
                        f'<td>{human_bytes(v.get("size"))}</td><td>{when(v.get("created"))}</td><td>{e(v.get("source"))}</td>'
                        f'<td><code>{e((v.get("digest") or "")[:12])}</code></td><td>{e(running)}</td><td>{button}</td></tr>')
        publish = action("Publish", "image-publish", {"name": name},
                         f"Publish the super PC's overlay of {name} as its next version?")
        parts.append(f"""<h2>{e(name)}</h2><p>size {human_bytes(image.get('size'))}, current version {e(image.get('current'))} {publish}</p>
<table class="versions"><thead><tr><th>version</th><th>size</th><th>created</th><th>source</th><th>digest</th><th>PCs</th><th></th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>""")
    return "".join(parts)


# -- services -----------------------------------------------------------------------------------------------
def services(status: dict[str, Any], service_names: tuple[str, ...], scale: dict[str, int]) -> str:
    c = status.get("controller") or {}
    procs = status.get("processes") or []
    rows = []
    for p in procs:
        counters = " ".join(f"{k}={v}" for k, v in sorted((p.get("counters") or {}).items()))
        health = p.get("health") or "-"
        rows.append(
            f'<tr data-service="{escape(p["service"])}" data-instance="{p["instance"]}"><td>{e(p["service"])}[{p["instance"]}]</td>'
            f'<td>{e(p.get("state"))}</td><td>{e(p.get("pid"))}</td><td>{e(p.get("revision"))}</td>'
            f'<td><span class="health health-{escape(health.split(":")[0])}">{e(health)}</span></td><td>{ago(p.get("uptime"))}</td>'
            f'<td>{ago(p.get("last_beat"))}</td><td>{e(p.get("events_emitted", 0))}/{e(p.get("events_dropped", 0))}</td>'
            f'<td class="counters">{e(counters)}</td></tr>')
    body = "".join(rows) or '<tr><td colspan="9" class="empty">no service processes</td></tr>'
    controls = []
    resolved = status.get("scale") or {}
    for name in service_names:
        running = sum(1 for p in procs if p["service"] == name and p.get("state") == "RUNNING")
        shown = f"auto ({resolved[name]})" if scale.get(name) == "auto" and name in resolved else scale.get(name, "-")
        controls.append(
            f'<tr data-service="{escape(name)}"><td>{escape(name)}</td><td>{e(shown)}</td><td>{running}</td><td>'
            + action("Restart", "service-restart", {"service": name}, f"Restart every {name} process, one after the other?")
            + " "
            + action("Scale…", "service-scale", {"service": name}, f"Run how many {name} processes?", input_name="count",
                     input_label="processes", input_value=scale.get(name, 1))
            + "</td></tr>")
    return f"""<h1>Services</h1>
<p class="summary">controller pid {e(c.get('pid'))}, up {ago(c.get('uptime'))}, revision {e(c.get('revision'))},
events {e(c.get('events_received'))} received, {e(c.get('events_stored'))} stored{'' if c.get('supervisord') else ' (no supervisord)'}</p>
<table id="scale"><thead><tr><th>service</th><th>scale</th><th>running</th><th>actions</th></tr></thead><tbody>{''.join(controls)}</tbody></table>
<table id="processes"><thead><tr><th>process</th><th>state</th><th>pid</th><th>revision</th><th>health</th><th>uptime</th><th>heartbeat</th><th>events/drops</th><th>counters</th></tr></thead>
<tbody>{body}</tbody></table>"""


# -- events -------------------------------------------------------------------------------------------------
def event_table(events: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr data-id="{ev["id"]}" data-type="{escape(ev["type"])}"><td>{when(ev["ts"])}.{int(ev["ts"] % 1 * 1000):03d}</td>'
        f'<td>{e(ev["service"])}[{e(ev["instance"])}]</td><td>{e(ev["type"])}</td>'
        f'<td class="fields">{e(" ".join(f"{k}={v}" for k, v in ev["fields"].items()))}</td></tr>'
        for ev in reversed(events)
    )
    return (f'<table class="events"><thead><tr><th>time</th><th>process</th><th>type</th><th>fields</th></tr></thead>'
            f'<tbody>{rows or "<tr><td colspan=4 class=empty>no events</td></tr>"}</tbody></table>')


SINCE = (("", "any time"), ("600", "10 minutes"), ("3600", "1 hour"), ("86400", "1 day"), ("604800", "7 days"))


def events_page(events: list[dict[str, Any]], query: dict[str, str]) -> str:
    options = "".join(f'<option value="{v}"{" selected" if query.get("since", "") == v else ""}>{label}</option>' for v, label in SINCE)
    return f"""<h1>Events</h1>
<form method="get" action="/events" class="filters">
<label>type <input name="type" value="{escape(query.get('type', ''))}" placeholder="dhcp, tftp.transfer, iscsi.login"></label>
<label>PC (MAC) <input name="mac" value="{escape(query.get('mac', ''))}" placeholder="52:54:00:00:00:01"></label>
<label>since <select name="since">{options}</select></label>
<button type="submit">Filter</button> <a href="/events">clear</a></form>
<p class="summary">newest first, at most 200; live</p>
{event_table(events)}"""


def events_query(params: dict[str, str], now: float | None = None) -> dict[str, Any]:
    """The events-list arguments a filter form asks for (`since` in seconds back)."""
    args: dict[str, Any] = {"limit": 200}
    if params.get("type"):
        args["type"] = params["type"].strip()
    if params.get("mac"):
        args["mac"] = params["mac"].strip().lower()
    if params.get("since"):
        try:
            args["since"] = (now or time.time()) - float(params["since"])
            args["limit"] = 10000  # since: oldest first, so take them all and keep the newest 200
        except ValueError:
            pass
    return args


def query_string(params: dict[str, str]) -> str:
    return urlencode({k: v for k, v in params.items() if v})
