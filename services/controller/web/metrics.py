"""`/metrics`: the controller's picture in Prometheus' text format, rendered at each scrape.

Nothing is counted here: every value comes from the answers of the control commands the CLI also reads
(`status-get`: each process's heartbeat counters, the events received by type and an iSCSI process's summed
io_stats; `client-list`: per PC; `lease-list` and `config-get dhcp`: pool use; `image-list` when the controller
has it). prometheus_client builds the exposition (escaping, `# HELP`/`# TYPE`, histogram series, the
OpenMetrics variant when asked) from families made here per scrape, in a registry of its own (no process-wide
default collectors). Counters of a service process start again from 0 when it restarts; Prometheus' rate()
takes that as a reset.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
P = ("service", "instance")  # the labels of a service process

# (metric, help, counter key in the process's heartbeat, extra labels)
DHCP_COUNTERS = [
    ("bootfleet_dhcp_messages_received_total", "DHCP messages received, by message type", "discovers", {"type": "discover"}),
    ("bootfleet_dhcp_messages_received_total", "", "requests", {"type": "request"}),
    ("bootfleet_dhcp_messages_received_total", "", "declines", {"type": "decline"}),
    ("bootfleet_dhcp_messages_received_total", "", "releases", {"type": "release"}),
    ("bootfleet_dhcp_messages_received_total", "", "informs", {"type": "inform"}),
    ("bootfleet_dhcp_replies_total", "DHCP replies sent, by message type", "offers", {"type": "offer"}),
    ("bootfleet_dhcp_replies_total", "", "acks", {"type": "ack"}),
    ("bootfleet_dhcp_replies_total", "", "naks", {"type": "nak"}),
    ("bootfleet_dhcp_naks_total", "DHCPNAKs sent", "naks", {}),
    ("bootfleet_dhcp_ignored_total", "DHCP messages ignored (not ours, malformed, other server)", "ignored", {}),
    ("bootfleet_dhcp_pool_exhausted_total", "DISCOVERs left without an offer: the pool was full", "exhausted", {}),
    ("bootfleet_dhcp_unknown_clients_total", "messages from MACs a known_clients_only scope refuses", "unknown_clients", {}),
]
TFTP_COUNTERS = [
    ("bootfleet_tftp_requests_total", "TFTP read/write requests received", "requests", {}),
    ("bootfleet_tftp_transfers_total", "TFTP transfers, by how they ended", "started", {"result": "started"}),
    ("bootfleet_tftp_transfers_total", "", "finished", {"result": "finished"}),
    ("bootfleet_tftp_transfers_total", "", "failed", {"result": "failed"}),
    ("bootfleet_tftp_refused_total", "TFTP requests refused (missing file, outside the root, busy)", "refused", {}),
    ("bootfleet_tftp_sent_bytes_total", "TFTP payload bytes sent", "bytes_sent", {}),
    ("bootfleet_tftp_retransmissions_total", "TFTP DATA packets sent again after a timeout", "retransmits", {}),
    ("bootfleet_http_requests_total", "HTTP requests to the TFTP service's HTTP listener", "http_requests", {}),
    ("bootfleet_http_sent_bytes_total", "HTTP body bytes sent", "http_bytes_sent", {}),
    ("bootfleet_http_failures_total", "HTTP transfers that failed", "http_failed", {}),
]
GAUGES = [
    ("bootfleet_dhcp_leases", "leases this DHCP process holds in its store", "dhcp", "leases"),
    ("bootfleet_tftp_active_transfers", "TFTP transfers in progress", "tftp", "active"),
    ("bootfleet_iscsi_sessions", "iSCSI sessions logged in", "iscsi_target", "sessions"),
    ("bootfleet_iscsi_connections", "iSCSI TCP connections open", "iscsi_target", "connections"),
]


def _pc(c: dict[str, Any]) -> str:
    return c.get("name") or c["mac"]


def _overlay_bytes(c: dict[str, Any]) -> float | None:
    """The PC's overlay size, from whichever field the client rows carry (images, issue 13)."""
    for key in ("overlay_bytes", "overlay_size", "overlay_allocated"):
        if isinstance(c.get(key), (int, float)):
            return c[key]
    overlay = c.get("overlay")
    if isinstance(overlay, dict) and isinstance(overlay.get("allocated"), (int, float)):
        return overlay["allocated"]
    return overlay if isinstance(overlay, (int, float)) and not isinstance(overlay, bool) else None


def _pool_sizes(dhcp: dict[str, Any] | None) -> dict[str, int]:
    sizes = {}
    for scope in (dhcp or {}).get("scopes") or []:
        total = 0
        for r in scope.get("ranges") or []:
            total += int(ipaddress.IPv4Address(r["end"])) - int(ipaddress.IPv4Address(r["start"])) + 1
        sizes[scope["name"]] = total
    return sizes


def families(data: dict[str, Any]) -> list[Metric]:
    """Every metric family from the command answers in `data`: `status` (status-get's arguments), `clients`,
    `leases`, `dhcp` (config-get dhcp's value), `images` (image-list's arguments, None when unsupported)."""
    status = data.get("status") or {}
    controller = status.get("controller") or {}
    processes = status.get("processes") or []
    revision = controller.get("revision")
    fams: dict[str, Metric] = {}

    def fam(kind, name, doc, labels):
        if name not in fams:
            fams[name] = kind(name, doc or name, labels=labels)
        return fams[name]

    fam(GaugeMetricFamily, "bootfleet_config_revision", "the running configuration's revision", []).add_metric([], revision or 0)
    fam(CounterMetricFamily, "bootfleet_controller_events_received", "events the controller received from every process", []).add_metric(
        [], controller.get("events_received", 0))
    fam(CounterMetricFamily, "bootfleet_controller_bad_messages", "bus messages the controller dropped as malformed", []).add_metric(
        [], controller.get("bad_messages", 0))
    fam(GaugeMetricFamily, "bootfleet_controller_events_stored", "events in the event store", []).add_metric([], controller.get("events_stored", 0))

    for p in processes:
        lv = [p["service"], str(p["instance"])]
        health = p.get("health") or ""
        fam(GaugeMetricFamily, "bootfleet_service_up", "1 when the process beats on the running revision (health ok)", P).add_metric(
            lv, 1 if health == "ok" else 0)
        if p.get("revision") is not None:
            fam(GaugeMetricFamily, "bootfleet_service_revision", "the revision the process has applied", P).add_metric(lv, p["revision"])
            if revision is not None:
                fam(GaugeMetricFamily, "bootfleet_bus_revision_lag", "revisions the process is behind the running one", P).add_metric(
                    lv, max(0, revision - p["revision"]))
        if p.get("last_beat") is not None:
            fam(GaugeMetricFamily, "bootfleet_service_heartbeat_age_seconds", "seconds since the process's last heartbeat", P).add_metric(
                lv, p["last_beat"])
        for key, name, doc in (
            ("events_emitted", "bootfleet_bus_events_emitted", "events the process emitted"),
            ("events_dropped", "bootfleet_bus_events_dropped", "events the process dropped (its queues were full)"),
            ("events_received", "bootfleet_bus_events_received", "events of the process the controller received"),
        ):
            if key in p:
                fam(CounterMetricFamily, name, doc, P).add_metric(lv, p[key])
        for type_, n in sorted((p.get("events_by_type") or {}).items()):
            fam(CounterMetricFamily, "bootfleet_events", "events received, by process and type", [*P, "type"]).add_metric([*lv, type_], n)
        counters = p.get("counters") or {}
        table = DHCP_COUNTERS if p["service"] == "dhcp" else TFTP_COUNTERS if p["service"] == "tftp" else []
        for name, doc, key, extra in table:
            if key in counters:
                fam(CounterMetricFamily, name.removesuffix("_total"), doc, [*P, *extra]).add_metric([*lv, *extra.values()], counters[key])
        for name, doc, service, key in GAUGES:
            if p["service"] == service and key in counters:
                fam(GaugeMetricFamily, name, doc, P).add_metric(lv, counters[key])
        if p["service"] == "iscsi_target":
            by_type = p.get("events_by_type") or {}
            fam(CounterMetricFamily, "bootfleet_iscsi_logins", "iSCSI logins accepted", P).add_metric(lv, by_type.get("iscsi.login", 0))
            fam(CounterMetricFamily, "bootfleet_iscsi_login_failures", "iSCSI logins refused", P).add_metric(lv, by_type.get("iscsi.login.failed", 0))
            io = p.get("iscsi_io")
            if io:
                cmds = fam(CounterMetricFamily, "bootfleet_iscsi_commands", "SCSI commands, by opcode (io_stats)", [*P, "op"])
                for op, n in sorted((io.get("ops") or {}).items()):
                    cmds.add_metric([*lv, op], n)
                classes = fam(CounterMetricFamily, "bootfleet_iscsi_commands_by_class",
                              "SCSI commands: reads and writes that moved data, and the rest (io_stats)", [*P, "class"])
                for name, key in (("read", "reads"), ("write", "writes"), ("other", "others")):
                    classes.add_metric([*lv, name], io[key])
                fam(CounterMetricFamily, "bootfleet_iscsi_process_read_bytes", "bytes read through the process", P).add_metric(lv, io["read_bytes"])
                fam(CounterMetricFamily, "bootfleet_iscsi_process_write_bytes", "bytes written through the process", P).add_metric(lv, io["write_bytes"])
                cumulative, buckets = 0, []
                for bound, n in zip(io["latency_bounds"], io["latency_buckets"]):
                    cumulative += n
                    buckets.append((repr(float(bound)), cumulative))
                buckets.append(("+Inf", io["latency_count"]))
                fam(HistogramMetricFamily, "bootfleet_iscsi_command_latency_seconds",
                    "SCSI command latency, from its last byte received to its response queued", P).add_metric(
                    lv, buckets, io["latency_sum"])

    clients = data.get("clients") or []
    for c in clients:
        lv = [_pc(c), c["mac"]]
        fam(CounterMetricFamily, "bootfleet_iscsi_read_bytes", "bytes a PC read from its disk (io_stats)", ["pc", "mac"]).add_metric(
            lv, c.get("read_bytes", 0))
        fam(CounterMetricFamily, "bootfleet_iscsi_write_bytes", "bytes a PC wrote to its disk (io_stats)", ["pc", "mac"]).add_metric(
            lv, c.get("write_bytes", 0))
        fam(CounterMetricFamily, "bootfleet_pc_boots", "power-ons seen (first DHCP discover after silence)", ["pc", "mac"]).add_metric(
            lv, c.get("boots", 0))
        if c.get("last_boot"):
            fam(GaugeMetricFamily, "bootfleet_pc_last_boot_timestamp_seconds", "when the PC last powered on", ["pc", "mac"]).add_metric(
                lv, c["last_boot"])
        fam(GaugeMetricFamily, "bootfleet_pc_state", "1 for the PC's current state", ["pc", "mac", "state"]).add_metric(
            [*lv, c.get("state") or "unknown"], 1)
        size = _overlay_bytes(c)
        if size is not None:
            fam(GaugeMetricFamily, "bootfleet_pc_overlay_bytes", "bytes the PC's overlay takes on disk", ["pc", "mac"]).add_metric(lv, size)

    sizes = _pool_sizes(data.get("dhcp"))
    used: dict[str, int] = dict.fromkeys(sizes, 0)
    for lease in data.get("leases") or []:
        if lease.get("state", "bound") == "bound" and lease.get("scope") in used:
            used[lease["scope"]] += 1
    for scope, size in sorted(sizes.items()):
        fam(GaugeMetricFamily, "bootfleet_dhcp_pool_addresses", "addresses in the scope's ranges", ["scope"]).add_metric([scope], size)
        fam(GaugeMetricFamily, "bootfleet_dhcp_pool_used_addresses", "bound leases in the scope", ["scope"]).add_metric([scope], used[scope])

    images = data.get("images")
    if images is not None:
        for image in images.get("images") or []:
            fam(GaugeMetricFamily, "bootfleet_image_versions", "versions an image keeps", ["image"]).add_metric(
                [image["name"]], len(image.get("versions") or []))
            if image.get("current") is not None:
                fam(GaugeMetricFamily, "bootfleet_image_current_version", "the version PCs get at power-on", ["image"]).add_metric(
                    [image["name"]], image["current"])
    per_version: dict[tuple[str, str], int] = {}
    for c in clients:
        if c.get("image") is not None and c.get("version") is not None:
            key = (str(c["image"]), str(c["version"]))
            per_version[key] = per_version.get(key, 0) + 1
    for (image, version), n in sorted(per_version.items()):
        fam(GaugeMetricFamily, "bootfleet_image_pcs", "PCs running a version of an image", ["image", "version"]).add_metric(
            [image, version], n)
    return list(fams.values())


class _Snapshot:
    def __init__(self, fams: Iterable[Metric]):
        self.fams = list(fams)

    def collect(self):
        return self.fams


def render(data: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families(data)))
    return generate_latest(registry)
