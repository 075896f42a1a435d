"""The controller's live picture of the fleet, built from heartbeats and events (sans-IO: time is passed in).

- `ServiceTable`: one row per service process (service, instance, pid): applied revision, last heartbeat,
  counters, and events emitted/dropped (from its heartbeats) against events received here.
- `ClientTable`: one row per PC seen on the bus or named in `clients[]`: IP, state, last boot. A PC's IP
  links its iSCSI and TFTP events (which know only the address) to its MAC.
- `IoTally`: an iSCSI process's commands (by class and by opcode), bytes and latency buckets, summed from its
  io_stats events.
- `Fleet`: both tables, what the controller and its command handlers see.
- `timeline()`: one PC's last boot, step by step, with the time since power-on (its first DHCP discover
  after a quiet spell).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from shared import events as ev
from shared.iscsi_latency import BUCKETS, LATENCY_BOUNDS

BOOT_GAP = 60.0  # seconds of silence from a PC that separate two boots
RATE_WINDOW = 30.0  # seconds of io_stats a PC's read/write rate is the mean over


@dataclass
class IoTally:
    """iSCSI commands by opcode class and by opcode, bytes, and latency, from io_stats events (each a LUN's interval).

    The latency buckets are the target's own per-command counts (shared/iscsi_latency.py's bounds), added up. An
    event without them (from a target older than they are) counts its interval's commands at its mean latency."""

    reads: int = 0
    writes: int = 0
    others: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * BUCKETS)  # not cumulative; the last: > 1 s
    latency_sum: float = 0.0  # seconds
    ops: dict[str, int] = field(default_factory=dict)  # commands by opcode name (READ_10, 0xC1)

    def add(self, f: dict[str, Any]) -> None:
        reads, writes, others = int(f.get("reads") or 0), int(f.get("writes") or 0), int(f.get("others") or 0)
        self.reads += reads
        self.writes += writes
        self.others += others
        self.read_bytes += int(f.get("read_bytes") or 0)
        self.write_bytes += int(f.get("write_bytes") or 0)
        buckets = f.get("latency_buckets")
        if isinstance(buckets, list) and len(buckets) == BUCKETS:
            for i, n in enumerate(buckets):
                self.latency_buckets[i] += int(n)
            self.latency_sum += int(f.get("latency_sum_ns") or 0) / 1e9
        elif reads + writes + others:
            mean = float(f.get("latency_us_avg") or 0.0) / 1e6
            self.latency_buckets[bisect_left(LATENCY_BOUNDS, mean)] += reads + writes + others
            self.latency_sum += mean * (reads + writes + others)
        for name, n in (f.get("ops") or {}).items():
            self.ops[str(name)] = self.ops.get(str(name), 0) + int(n)

    @property
    def latency_count(self) -> int:
        return sum(self.latency_buckets)

    def as_dict(self) -> dict[str, Any]:
        return dict(reads=self.reads, writes=self.writes, others=self.others, read_bytes=self.read_bytes,
                    write_bytes=self.write_bytes, latency_buckets=list(self.latency_buckets),
                    latency_bounds=list(LATENCY_BOUNDS), latency_count=self.latency_count,
                    latency_sum=round(self.latency_sum, 9), ops=dict(sorted(self.ops.items())))


@dataclass
class ServiceRow:
    service: str
    instance: int
    pid: int
    started: float
    revision: int = -1
    last_beat: float = 0.0
    emitted: int = 0
    dropped: int = 0
    received: int = 0
    controller: bool = True
    failed: dict[str, Any] | None = None  # {revision, reason}: the last revision it could not apply
    counters: dict[str, Any] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)  # events received, by type
    io: IoTally | None = None  # an iSCSI process's io_stats, summed

    def healthy(self, now: float, timeout: float) -> bool:
        """A heartbeat within `timeout` seconds."""
        return now - self.last_beat <= timeout

    def health(self, now: float, timeout: float, revision: int) -> str:
        """`ok` (on `revision`), `failed: <reason>` (its last apply failed), `stale` (older revision), `silent`."""
        if not self.healthy(now, timeout):
            return "silent"
        if self.failed:
            return f"failed: {self.failed['reason']}"
        return "ok" if self.revision == revision else "stale"


class ServiceTable:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], ServiceRow] = {}

    def _row(self, service: str, instance: int, pid: int, started: float = 0.0) -> ServiceRow:
        row = self.rows.get((service, instance))
        if row is None or row.pid != pid:  # a new process replaced the old one
            row = ServiceRow(service, instance, pid, started)
            self.rows[(service, instance)] = row
        return row

    def beat(self, msg: dict[str, Any], now: float) -> ServiceRow:
        row = self._row(msg["service"], msg["instance"], msg["pid"], msg.get("started", now))
        row.revision = msg["revision"]
        row.last_beat = now
        row.emitted = msg["emitted"]
        row.dropped = msg["dropped"]
        row.counters = msg.get("counters") or {}
        row.controller = bool(msg.get("controller", True))
        row.failed = msg.get("failed")
        return row

    def event(self, msg: dict[str, Any]) -> None:
        row = self._row(msg["service"], msg["instance"], msg.get("pid", 0), msg["ts"])
        row.received += 1
        type = msg.get("type", "")  # a validated bus event always has one
        row.by_type[type] = row.by_type.get(type, 0) + 1
        if type == ev.ISCSI_IO_STATS:
            if row.io is None:
                row.io = IoTally()
            row.io.add(msg["fields"])

    def forget(self, service: str, keep: int) -> None:
        """Drop rows of instances scaled away (instance >= keep)."""
        for key in [k for k in self.rows if k[0] == service and k[1] >= keep]:
            del self.rows[key]


# What each event says about the state of a PC.
_STATE = {
    ev.DHCP_DISCOVER: "dhcp",
    ev.LEASE_OFFERED: "dhcp",
    ev.LEASE_GRANTED: "address",
    ev.LEASE_RENEWED: "address",
    ev.TFTP_STARTED: "loading",
    ev.TFTP_FINISHED: "loaded",
    ev.TFTP_FAILED: "tftp failed",
    ev.HTTP_FINISHED: "loaded",
    ev.ISCSI_LOGIN: "booting",
    ev.ISCSI_FIRST_READ: "booting",
    ev.ISCSI_LOGIN_FAILED: "login failed",
    ev.LEASE_RELEASED: "off",
    ev.LEASE_EXPIRED: "off",
    ev.DHCP_NAK: "nak",
    ev.DHCP_PROXY_OFFERED: "dhcp",  # dhcp.mode: proxy: the boot part came from us, the address from the site
    ev.DHCP_PROXY_ACK: "dhcp",
    ev.DHCP_PROXY_ADDRESS: "address",
}


def _normal_session(fields: dict[str, Any]) -> bool:
    """RFC 7143 SessionType is `Normal` or `Discovery`; only normal sessions boot anything."""
    return str(fields.get("session_type", "Normal")).lower() == "normal"


@dataclass
class ClientRow:
    mac: str
    ip: str | None = None
    state: str = "never seen"
    last_event: float = 0.0
    last_boot: float | None = None
    logins: int = 0  # iSCSI logins since the last boot: 1 = firmware, 2 = the OS took over
    boots: int = 0  # power-ons seen (in the events kept)
    read_bytes: int = 0  # iSCSI bytes read and written (io_stats events)
    write_bytes: int = 0
    recent_io: list[tuple[float, int, int]] = field(default_factory=list)  # (ts, read, written) in RATE_WINDOW
    identity: dict[str, Any] = field(default_factory=dict)  # what the PC said of itself: uuid (option 97), nic (94), arch (93), firmware

    def rates(self, now: float) -> tuple[float, float]:
        """Bytes per second read and written, the mean over the last RATE_WINDOW seconds."""
        recent = [(r, w) for ts, r, w in self.recent_io if ts > now - RATE_WINDOW]
        return sum(r for r, _ in recent) / RATE_WINDOW, sum(w for _, w in recent) / RATE_WINDOW

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        read_rate, write_rate = self.rates(now if now is not None else self.last_event)
        return dict(
            mac=self.mac, ip=self.ip, state=self.state, last_event=self.last_event, last_boot=self.last_boot,
            boots=self.boots, read_bytes=self.read_bytes, write_bytes=self.write_bytes,
            read_rate=round(read_rate, 1), write_rate=round(write_rate, 1),
        )


IDENTITY = ("uuid", "nic", "arch", "firmware")  # fields of DHCP events a PC's row keeps (dhcp.discover, unknown_client)


class ClientTable:
    def __init__(self) -> None:
        self.by_mac: dict[str, ClientRow] = {}
        self.mac_by_ip: dict[str, str] = {}

    def mac_of(self, fields: dict[str, Any]) -> str | None:
        mac = fields.get("mac")
        if mac:
            return str(mac).lower()
        ip = fields.get("ip")
        return self.mac_by_ip.get(ip) if ip else None

    def observe(self, type: str, fields: dict[str, Any], ts: float) -> ClientRow | None:
        mac = self.mac_of(fields)
        if mac is None:
            return None
        row = self.by_mac.get(mac)
        if row is None:
            row = self.by_mac[mac] = ClientRow(mac)
        if type in (ev.DHCP_DISCOVER, ev.LEASE_OFFERED) and (
            row.last_boot is None or ts - row.last_event > BOOT_GAP or row.state in ("off", "never seen")
            # the firmware DHCPing again once this boot logged in: a reboot, however quick (pcboot.py's rule)
            or (type == ev.DHCP_DISCOVER and row.logins > 0)
        ):
            row.last_boot = ts
            row.logins = 0
            row.boots += 1
        if type.startswith("dhcp."):
            for key in IDENTITY:
                if fields.get(key) is not None:
                    row.identity[key] = fields[key]
        ip = fields.get("ip")
        if type in (ev.LEASE_GRANTED, ev.LEASE_RENEWED, ev.LEASE_OFFERED, ev.DHCP_PROXY_ADDRESS, ev.DHCP_PROXY_ACK) and ip:
            row.ip = ip
            self.mac_by_ip[ip] = mac
        elif type in (ev.LEASE_RELEASED, ev.LEASE_EXPIRED) and ip:
            self.mac_by_ip.pop(ip, None)
        if type == ev.ISCSI_LOGIN and _normal_session(fields):
            row.logins += 1
        elif type == ev.ISCSI_IO_STATS:
            r, w = int(fields.get("read_bytes") or 0), int(fields.get("write_bytes") or 0)
            row.read_bytes += r
            row.write_bytes += w
            row.recent_io = [x for x in row.recent_io if x[0] > ts - RATE_WINDOW] + [(ts, r, w)]
        state = _STATE.get(type)
        if state:
            row.state = "running" if state == "booting" and row.logins >= 2 else state
        row.last_event = ts
        return row

    def ensure(self, mac: str) -> ClientRow:
        return self.by_mac.setdefault(mac, ClientRow(mac))


# Steps of a boot timeline, in the words people use, by event type.
_STEP = {
    ev.DHCP_DISCOVER: "DHCP discover",
    ev.LEASE_OFFERED: "DHCP offer",
    ev.LEASE_GRANTED: "DHCP ack",
    ev.LEASE_RENEWED: "DHCP renew",
    ev.DHCP_PROXY_OFFERED: "ProxyDHCP offer",
    ev.DHCP_PROXY_ACK: "ProxyDHCP ack (port 4011)",
    ev.DHCP_PROXY_ADDRESS: "DHCP address (site server)",
    ev.TFTP_STARTED: "TFTP start",
    ev.TFTP_FINISHED: "TFTP file",
    ev.TFTP_FAILED: "TFTP failed",
    ev.HTTP_FINISHED: "HTTP file",
    ev.ISCSI_LOGIN: "iSCSI login",
    ev.ISCSI_FIRST_READ: "first READ",
    ev.ISCSI_LOGIN_FAILED: "iSCSI login failed",
    ev.ISCSI_LOGOUT: "iSCSI logout",
}


def timeline(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last boot among `events` (one PC's, oldest first): steps with seconds since power-on.

    Power-on is taken as the first DHCP discover after BOOT_GAP seconds of silence, or a DHCP discover (only
    booting clients' are reported) once the boot has logged in to iSCSI; the second iSCSI login of a boot is
    the OS's own initiator taking over from the firmware's.
    """
    relevant = [e for e in events if e["type"] in _STEP]
    if not relevant:
        return []
    start_index = 0
    logged_in = False  # this boot has logged in: a firmware discover now is a reboot, however soon
    for i, e in enumerate(relevant):
        if e["type"] in (ev.DHCP_DISCOVER, ev.LEASE_OFFERED) and (
            i == 0 or e["ts"] - relevant[i - 1]["ts"] > BOOT_GAP or (e["type"] == ev.DHCP_DISCOVER and logged_in)
        ):
            start_index = i
            logged_in = False
        elif e["type"] == ev.ISCSI_LOGIN and _normal_session(e["fields"]):
            logged_in = True
    boot = relevant[start_index:]
    t0 = boot[0]["ts"]
    steps, logins = [], 0
    for e in boot:
        step = _STEP[e["type"]]
        detail = ""
        f = e["fields"]
        if e["type"] == ev.ISCSI_LOGIN:
            if not _normal_session(f):
                continue  # discovery sessions are not part of the boot
            logins += 1
            step = "iSCSI login (firmware)" if logins == 1 else "iSCSI login (OS)"
            detail = f.get("initiator", "")
            digests = [f"{kind} {f[key]}" for kind, key in (("header", "header_digest"), ("data", "data_digest"))
                       if f.get(key) not in (None, "None")]
            if digests:
                detail += f" (digests: {', '.join(digests)})"
        elif e["type"] in (ev.TFTP_STARTED, ev.TFTP_FINISHED, ev.TFTP_FAILED, ev.HTTP_FINISHED):
            detail = f.get("file", "")
            if e["type"] == ev.TFTP_FAILED:
                detail += f" ({f.get('reason', '')})"
        elif e["type"] in (ev.LEASE_GRANTED, ev.LEASE_OFFERED, ev.DHCP_PROXY_ADDRESS):
            detail = f.get("ip", "")
        elif e["type"] in (ev.DHCP_PROXY_OFFERED, ev.DHCP_PROXY_ACK):
            detail = f.get("bootfile") or ""
        elif e["type"] == ev.ISCSI_FIRST_READ:
            detail = f"{f.get('target', '')} lun {f.get('lun', 0)}"
        steps.append({"t": round(e["ts"] - t0, 3), "ts": e["ts"], "step": step, "detail": detail, "type": e["type"]})
    return steps


@dataclass
class Fleet:
    """The live picture: service processes (from heartbeats) and PCs (from events)."""

    services: ServiceTable = field(default_factory=ServiceTable)
    clients: ClientTable = field(default_factory=ClientTable)
