"""A PC's boot as a waterfall: the phases between the milestones of `client-get`'s timeline, drawn as SVG.

The milestones: DHCP (the ack), TFTP/HTTP (the last file loaded before the OS's login), iSCSI login (the
firmware's login), first READ (the first READ after that login), OS login (the OS's own login). Each phase ends
at its milestone and starts where the one before ended, in the order they happened: an iPXE handed a root-path
attaches the SAN disk (logging in, reading its first sectors) before it fetches its script, as the lab's PCs
do, so its waterfall reads DHCP → iSCSI login → first READ → TFTP/HTTP → OS login (the last one the firmware
loading and starting the OS from the disk); a chain-loading PXE ROM's reads DHCP → TFTP/HTTP → iSCSI login →
.... A milestone the timeline lacks (a PC still booting, a boot with no file over TFTP or HTTP) leaves its
phase out. Pure: a list of timeline steps in, phases or SVG text out.
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
    discover = _first(steps, ("DHCP discover", "DHCP offer"))
    fw = _first(steps, ("iSCSI login (firmware)",))
    read = _first(steps, ("first READ",), after=fw["t"] if fw else -1.0)
    os_login = _first(steps, ("iSCSI login (OS)",), after=(read or fw or {"t": -1.0})["t"])
    # the files the firmware loaded (before or after it attached the disk); any after the OS's login are the OS's
    files = [s for s in steps if s["step"] in ("TFTP file", "HTTP file") and (os_login is None or s["t"] <= os_login["t"])]
    ack = _first(steps, ("DHCP ack",))
    milestones = [
        ("DHCP", ack, ack.get("detail", "") if ack else ""),
        ("TFTP/HTTP", files[-1] if files else None, ", ".join(s.get("detail", "") for s in files)),
        ("iSCSI login", fw, fw.get("detail", "") if fw else ""),
        ("first READ", read, read.get("detail", "") if read else ""),
        ("OS login", os_login, os_login.get("detail", "") if os_login else ""),
    ]
    out: list[Phase] = []
    start = discover["t"] if discover else steps[0]["t"]
    # in the order they happened; a tie keeps the usual order (sorted() is stable)
    for name, step, detail in sorted((m for m in milestones if m[1] is not None), key=lambda m: m[1]["t"]):
        out.append(Phase(name, start, step["t"], detail))
        start = step["t"]
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
