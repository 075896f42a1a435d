"""A PC's boot as a waterfall: the phases between the milestones of `client-get`'s timeline, drawn as SVG.

The phases, each ending at its milestone and starting where the one before ended:
DHCP (discover → ack), TFTP/HTTP (→ the last file loaded before the firmware's login), iSCSI login (→ the
firmware's login), first READ (→ the first READ), OS login (→ the OS's own login). A milestone the timeline
lacks (a PC still booting, or HTTP boot without TFTP) leaves its phase out; the next one starts at the last
milestone reached. Pure: a list of timeline steps in, phases or SVG text out.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any

PHASES = ("DHCP", "TFTP/HTTP", "iSCSI login", "first READ", "OS login")
COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2")


@dataclass(frozen=True)
class Phase:
    name: str
    start: float  # seconds since power-on
    end: float
    detail: str

    @property
    def duration(self) -> float:
        return round(self.end - self.start, 3)


def _first(steps, names, after: float = -1.0):
    return next((s for s in steps if s["step"] in names and s["t"] >= after), None)


def phases(steps: list[dict[str, Any]]) -> list[Phase]:
    if not steps:
        return []
    out: list[Phase] = []
    start = steps[0]["t"]
    discover = _first(steps, ("DHCP discover", "DHCP offer"))
    ack = _first(steps, ("DHCP ack",))
    if ack:
        out.append(Phase("DHCP", discover["t"] if discover else start, ack["t"], ack.get("detail", "")))
        start = ack["t"]
    fw = _first(steps, ("iSCSI login (firmware)",))
    files = [s for s in steps if s["step"] in ("TFTP file", "HTTP file") and (fw is None or s["t"] <= fw["t"])]
    if files:
        out.append(Phase("TFTP/HTTP", start, files[-1]["t"], ", ".join(s.get("detail", "") for s in files)))
        start = files[-1]["t"]
    if fw:
        out.append(Phase("iSCSI login", start, fw["t"], fw.get("detail", "")))
        start = fw["t"]
    read = _first(steps, ("first READ",), after=start)
    if read:
        out.append(Phase("first READ", start, read["t"], read.get("detail", "")))
        start = read["t"]
    os_login = _first(steps, ("iSCSI login (OS)",), after=start)
    if os_login:
        out.append(Phase("OS login", start, os_login["t"], os_login.get("detail", "")))
    return out


def svg(found: list[Phase], width: int = 720, row: int = 26) -> str:
    """One bar per phase on a shared time axis, labelled with its name and duration."""
    if not found:
        return '<p class="empty">no boot seen yet</p>'
    label_w, pad = 130, 70
    total = max(p.end for p in found) or 1.0
    scale = (width - label_w - pad) / total
    height = row * len(found) + 24
    parts = [f'<svg class="waterfall" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="boot waterfall">']
    for i, p in enumerate(found):
        y = i * row + 4
        x = label_w + p.start * scale
        w = max(2.0, (p.end - p.start) * scale)
        colour = COLOURS[PHASES.index(p.name)] if p.name in PHASES else "#888"
        parts.append(
            f'<g class="phase" data-phase="{escape(p.name)}" data-duration="{p.duration}">'
            f'<title>{escape(p.name)}: {p.start:.3f} s to {p.end:.3f} s ({escape(p.detail)})</title>'
            f'<text x="4" y="{y + 15}" class="label">{escape(p.name)}</text>'
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 8}" rx="3" fill="{colour}"/>'
            f'<text x="{x + w + 4:.1f}" y="{y + 15}" class="duration">{p.duration:.3f} s</text></g>'
        )
    axis_y = row * len(found) + 16
    parts.append(f'<text x="{label_w}" y="{axis_y}" class="axis">0 s</text>')
    parts.append(f'<text x="{width - pad}" y="{axis_y}" class="axis" text-anchor="end">{total:.3f} s since power-on</text>')
    parts.append("</svg>")
    return "".join(parts)
