"""/metrics rendered from command answers: names, labels, types, values (parsed back with prometheus_client)."""

from prometheus_client.parser import text_string_to_metric_families

from services.controller.fleet import ClientTable, IoTally, ServiceTable
from services.controller.web import metrics
from shared.iscsi_latency import BUCKETS, LATENCY_BOUNDS

STATUS = {
    "controller": {"pid": 1, "revision": 4, "events_received": 120, "events_stored": 118, "bad_messages": 2},
    "processes": [
        {"service": "dhcp", "instance": 0, "state": "RUNNING", "revision": 4, "health": "ok", "last_beat": 0.3,
         "events_emitted": 50, "events_dropped": 1, "events_received": 49,
         "counters": {"discovers": 7, "requests": 6, "offers": 7, "acks": 5, "naks": 1, "leases": 3},
         "events_by_type": {"dhcp.lease.granted": 5}},
        {"service": "tftp", "instance": 1, "state": "RUNNING", "revision": 3, "health": "stale", "last_beat": 0.1,
         "counters": {"requests": 9, "started": 8, "finished": 7, "failed": 1, "bytes_sent": 123456, "retransmits": 4, "active": 0}},
        {"service": "iscsi_target", "instance": 0, "state": "RUNNING", "revision": 4, "health": "ok", "last_beat": 0.2,
         "counters": {"sessions": 2}, "events_by_type": {"iscsi.login": 3, "iscsi.login.failed": 1},
         "iscsi_io": None},
    ],
}


def parse(text: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def bucket_counts(**at: int) -> list[int]:
    """An io_stats event's latency_buckets: `at` maps a bound's index (b0 .. b13, inf) to its count."""
    counts = [0] * BUCKETS
    for key, n in at.items():
        counts[-1 if key == "inf" else int(key[1:])] = n
    return counts


def io_tally() -> dict:
    """Two intervals as the target sends them (bucket counts, the latency sum, opcodes), and one from a target
    that sent only the mean (its commands counted at it)."""
    t = IoTally()
    t.add({"reads": 10, "writes": 1, "others": 2, "read_bytes": 1000, "write_bytes": 512, "latency_us_avg": 180.0,
           "latency_sum_ns": 13 * 180_000, "latency_buckets": bucket_counts(b2=13),
           "ops": {"READ_10": 10, "WRITE_10": 1, "INQUIRY": 2}})
    t.add({"reads": 20, "writes": 0, "others": 0, "read_bytes": 2345, "write_bytes": 0, "latency_us_avg": 3200.0,
           "latency_sum_ns": 20 * 3_200_000, "latency_buckets": bucket_counts(b6=20), "ops": {"READ_10": 20}})
    t.add({"reads": 0, "writes": 0, "others": 1, "read_bytes": 0, "write_bytes": 0, "latency_us_avg": 2_000_000.0,
           "latency_sum_ns": 2_000_000_000, "latency_buckets": bucket_counts(inf=1), "ops": {"0xC1": 1}})
    t.add({"reads": 4, "writes": 0, "others": 0, "read_bytes": 0, "write_bytes": 0, "latency_us_avg": 40.0})  # mean only
    return t.as_dict()


def test_io_tally_sums_the_target_buckets_and_opcodes():
    io = io_tally()
    assert io["latency_bounds"] == list(LATENCY_BOUNDS) and len(io["latency_buckets"]) == BUCKETS
    assert io["latency_buckets"] == bucket_counts(b0=4, b2=13, b6=20, inf=1)
    assert io["latency_count"] == 38 == io["reads"] + io["writes"] + io["others"]
    assert abs(io["latency_sum"] - (13 * 180e-6 + 20 * 3.2e-3 + 2.0 + 4 * 40e-6)) < 1e-9
    assert io["ops"] == {"0xC1": 1, "INQUIRY": 2, "READ_10": 30, "WRITE_10": 1}
    odd = IoTally()
    odd.add({"reads": 2, "latency_us_avg": 70.0, "latency_buckets": [1, 1]})  # not this controller's bounds: the mean
    assert odd.latency_buckets == bucket_counts(b1=2)


def test_process_counters_pc_bytes_pool_use_and_bus_lag():
    status = {**STATUS, "processes": [*STATUS["processes"][:2], {**STATUS["processes"][2], "iscsi_io": io_tally()}]}
    clients = [{"mac": "52:54:00:00:00:01", "name": "pc1", "state": "running", "read_bytes": 3345, "write_bytes": 512,
                "boots": 2, "last_boot": 1795000000.0, "image": "win11", "version": 3, "overlay_bytes": 4096},
               {"mac": "52:54:00:00:00:02", "name": None, "state": "dhcp", "read_bytes": 0, "write_bytes": 0, "boots": 1}]
    dhcp = {"scopes": [{"name": "lab", "ranges": [{"start": "10.0.0.10", "end": "10.0.0.19"}, {"start": "10.0.0.30", "end": "10.0.0.30"}]}]}
    leases = [{"ip": "10.0.0.10", "scope": "lab", "state": "bound"}, {"ip": "10.0.0.11", "scope": "lab", "state": "released"}]
    images = {"images": [{"name": "win11", "current": 3, "versions": [{"n": 1}, {"n": 2}, {"n": 3}]}]}
    got = parse(metrics.render({"status": status, "clients": clients, "leases": leases, "dhcp": dhcp, "images": images}))
    d0 = (("instance", "0"), ("service", "dhcp"))
    assert got[("bootfleet_dhcp_messages_received_total", (*d0[:1], ("service", "dhcp"), ("type", "discover")))] == 7
    assert got[("bootfleet_dhcp_replies_total", (*d0[:1], ("service", "dhcp"), ("type", "nak")))] == 1
    assert got[("bootfleet_dhcp_naks_total", d0)] == 1
    assert got[("bootfleet_dhcp_leases", d0)] == 3
    assert got[("bootfleet_bus_events_dropped_total", d0)] == 1
    t1 = (("instance", "1"), ("service", "tftp"))
    assert got[("bootfleet_tftp_transfers_total", (t1[0], ("result", "failed"), t1[1]))] == 1
    assert got[("bootfleet_tftp_sent_bytes_total", t1)] == 123456
    assert got[("bootfleet_tftp_retransmissions_total", t1)] == 4
    assert got[("bootfleet_bus_revision_lag", t1)] == 1 and got[("bootfleet_service_up", t1)] == 0
    i0 = (("instance", "0"), ("service", "iscsi_target"))
    assert got[("bootfleet_iscsi_logins_total", i0)] == 3 and got[("bootfleet_iscsi_login_failures_total", i0)] == 1
    assert got[("bootfleet_iscsi_commands_total", (i0[0], ("op", "READ_10"), i0[1]))] == 30
    assert got[("bootfleet_iscsi_commands_total", (i0[0], ("op", "0xC1"), i0[1]))] == 1
    assert got[("bootfleet_iscsi_commands_by_class_total", (("class", "read"), *i0))] == 34
    assert got[("bootfleet_iscsi_process_read_bytes_total", i0)] == 3345
    # cumulative buckets: 4 at 40 us, 13 at <= 250 us, 20 at <= 5 ms, one above 1 s; +Inf = count; sum in seconds
    le = lambda bound: got[("bootfleet_iscsi_command_latency_seconds_bucket", (i0[0], ("le", bound), i0[1]))]
    assert (le("5e-05"), le("0.0001"), le("0.00025"), le("0.0025"), le("0.005"), le("1.0"), le("+Inf")) == (4, 4, 17, 17, 37, 37, 38)
    assert got[("bootfleet_iscsi_command_latency_seconds_count", i0)] == 38
    assert abs(got[("bootfleet_iscsi_command_latency_seconds_sum", i0)] - (13 * 180e-6 + 20 * 3.2e-3 + 2.0 + 160e-6)) < 1e-9
    pc1 = (("mac", "52:54:00:00:00:01"), ("pc", "pc1"))
    assert got[("bootfleet_iscsi_read_bytes_total", pc1)] == 3345
    assert got[("bootfleet_iscsi_write_bytes_total", pc1)] == 512
    assert got[("bootfleet_pc_boots_total", pc1)] == 2
    assert got[("bootfleet_pc_overlay_bytes", pc1)] == 4096
    # a PC without a name is labelled by its MAC
    assert got[("bootfleet_pc_boots_total", (("mac", "52:54:00:00:00:02"), ("pc", "52:54:00:00:00:02")))] == 1
    assert got[("bootfleet_dhcp_pool_addresses", (("scope", "lab"),))] == 11
    assert got[("bootfleet_dhcp_pool_used_addresses", (("scope", "lab"),))] == 1
    assert got[("bootfleet_image_versions", (("image", "win11"),))] == 3
    assert got[("bootfleet_image_pcs", (("image", "win11"), ("version", "3")))] == 1
    assert got[("bootfleet_config_revision", ())] == 4
    assert got[("bootfleet_controller_bad_messages_total", ())] == 2


def test_types_and_help_follow_the_exposition_format():
    text = metrics.render({"status": STATUS, "clients": [], "leases": [], "dhcp": None, "images": None}).decode()
    assert "# TYPE bootfleet_dhcp_replies_total counter" in text
    assert "# TYPE bootfleet_bus_revision_lag gauge" in text
    assert "# HELP bootfleet_dhcp_replies_total DHCP replies sent, by message type" in text
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), "a family is written once"
    assert "bootfleet_image_versions" not in text  # no image commands: no image metrics


def test_nothing_known_renders_a_valid_page():
    assert list(text_string_to_metric_families(metrics.render({}).decode()))


def test_label_values_are_escaped():
    clients = [{"mac": "52:54:00:00:00:03", "name": 'a "quoted"\\name\nx', "state": "off", "read_bytes": 1}]
    got = parse(metrics.render({"clients": clients}))
    assert got[("bootfleet_iscsi_read_bytes_total", (("mac", "52:54:00:00:00:03"), ("pc", 'a "quoted"\\name\nx')))] == 1


def test_fleet_counts_what_metrics_read():
    """The tallies behind the metrics: events by type and io_stats per process, bytes and boots per PC."""
    services, clients = ServiceTable(), ClientTable()
    msgs = [
        {"service": "iscsi_target", "instance": 0, "pid": 7, "ts": 100.0, "type": "iscsi.login", "fields": {"ip": "10.0.0.5"}},
        {"service": "iscsi_target", "instance": 0, "pid": 7, "ts": 101.0, "type": "iscsi.io_stats",
         "fields": {"ip": "10.0.0.5", "reads": 4, "writes": 2, "others": 0, "read_bytes": 4096, "write_bytes": 1024, "latency_us_avg": 50.0}},
    ]
    clients.observe("dhcp.discover", {"mac": "52:54:00:00:00:01"}, 99.0)
    clients.observe("dhcp.lease.granted", {"mac": "52:54:00:00:00:01", "ip": "10.0.0.5"}, 99.5)
    for msg in msgs:
        services.event(msg)
        clients.observe(msg["type"], msg["fields"], msg["ts"])
    row = services.rows[("iscsi_target", 0)]
    assert row.by_type == {"iscsi.login": 1, "iscsi.io_stats": 1}
    assert row.io.as_dict()["latency_buckets"][0] == 6 and row.io.read_bytes == 4096  # 50 us: the first bucket (le)
    pc = clients.by_mac["52:54:00:00:00:01"].as_dict(now=105.0)
    assert (pc["read_bytes"], pc["write_bytes"], pc["boots"]) == (4096, 1024, 1)
    assert pc["read_rate"] == round(4096 / 30, 1)
    assert clients.by_mac["52:54:00:00:00:01"].as_dict(now=200.0)["read_rate"] == 0  # nothing in the last 30 s
