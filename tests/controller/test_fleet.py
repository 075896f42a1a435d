"""The fleet view: service rows from heartbeats, client rows and boot timelines from events."""

from shared import events as ev
from services.controller.fleet import ClientTable, ServiceTable, timeline

MAC = "52:54:00:00:00:01"


def event(ts, type, **fields):
    return {"ts": ts, "type": type, "fields": fields, "service": "x", "instance": 0, "id": int(ts * 1000)}


BOOT = [
    event(100.0, ev.DHCP_DISCOVER, mac=MAC),
    event(100.2, ev.LEASE_OFFERED, mac=MAC, ip="10.0.0.5"),
    event(100.4, ev.LEASE_GRANTED, mac=MAC, ip="10.0.0.5"),
    event(100.9, ev.TFTP_FINISHED, ip="10.0.0.5", file="boot.ipxe"),
    event(101.3, ev.ISCSI_LOGIN, ip="10.0.0.5", initiator="iqn.2010-04.org.ipxe:x", session_type="Normal"),
    event(101.4, ev.ISCSI_FIRST_READ, ip="10.0.0.5", target="iqn.t", lun=0),
    event(104.0, ev.ISCSI_LOGIN, ip="10.0.0.5", initiator="iqn.1993-08.org.debian:01", session_type="normal",
          header_digest="CRC32C", data_digest="None"),
]


def test_timeline_of_the_last_boot():
    older = [event(10.0, ev.DHCP_DISCOVER, mac=MAC), event(10.5, ev.LEASE_GRANTED, mac=MAC, ip="10.0.0.5")]
    steps = timeline(older + BOOT)
    assert [s["step"] for s in steps] == [
        "DHCP discover", "DHCP offer", "DHCP ack", "TFTP file", "iSCSI login (firmware)", "first READ", "iSCSI login (OS)",
    ]
    assert steps[0]["t"] == 0 and steps[-1]["t"] == 4.0
    assert steps[4]["detail"] == "iqn.2010-04.org.ipxe:x"  # no digest fields: nothing said
    assert steps[-1]["detail"] == "iqn.1993-08.org.debian:01 (digests: header CRC32C)"


def test_a_quick_reboot_is_a_new_boot_once_the_last_one_logged_in():
    again = [event(110.0 + e["ts"] - 100.0, e["type"], **e["fields"]) for e in BOOT]  # 6 s after the OS login
    steps = timeline(BOOT + again)
    assert steps[0]["ts"] == 110.0 and [s["step"] for s in steps].count("iSCSI login (OS)") == 1
    table = ClientTable()
    for e in BOOT + again:
        table.observe(e["type"], e["fields"], e["ts"])
    assert table.by_mac[MAC].last_boot == 110.0 and table.by_mac[MAC].boots == 2
    retransmit = [event(100.0, ev.DHCP_DISCOVER, mac=MAC), event(101.0, ev.DHCP_DISCOVER, mac=MAC)]
    assert len(timeline(retransmit)) == 2 and timeline(retransmit)[0]["ts"] == 100.0  # one boot


def test_client_table_links_addresses_to_macs():
    table = ClientTable()
    for e in BOOT:
        table.observe(e["type"], e["fields"], e["ts"])
    row = table.by_mac[MAC]
    assert row.ip == "10.0.0.5" and row.last_boot == 100.0
    assert row.state == "running"  # the OS logged in: the second login
    table.observe(ev.LEASE_RELEASED, {"mac": MAC, "ip": "10.0.0.5"}, 200.0)
    assert row.state == "off" and "10.0.0.5" not in table.mac_by_ip


def test_service_table_replaces_a_restarted_process():
    table = ServiceTable()
    beat = {"service": "tftp", "instance": 0, "pid": 10, "started": 1.0, "revision": 3, "emitted": 5, "dropped": 0}
    table.beat(beat, now=2.0)
    table.event({"service": "tftp", "instance": 0, "pid": 10, "ts": 2.0})
    assert table.rows[("tftp", 0)].received == 1
    table.beat({**beat, "pid": 11, "revision": 4}, now=3.0)
    row = table.rows[("tftp", 0)]
    assert row.pid == 11 and row.revision == 4 and row.received == 0
