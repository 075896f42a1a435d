"""PC identity and enrolment on the controller: what a PC said of itself (DHCP options 97, 94, 93) on its row,
`new` for a PC nobody configured, `client-assign` adopting it as a new revision, and a ProxyDHCP boot's
timeline (the address learned from the PC's REQUEST to the site's server maps its TFTP events to it)."""

import pytest

from services.controller.commands import ERROR, SUCCESS, dispatch
from services.controller.fleet import timeline
from services.controller.io_loop import Controller

MAC = "52:54:00:00:00:42"
UUID = "00112233-4455-6677-8899-aabbccddeeff"


@pytest.fixture
def controller(tmp_path):
    c = Controller(tmp_path / "state", None)
    yield c
    c.close()


def test_a_new_pc_shows_its_identity_and_is_adopted_by_client_assign(controller):
    controller.fleet.clients.observe("dhcp.discover", {"mac": MAC, "client_class": "pxe-efi", "arch": 7, "uuid": UUID,
                                                       "nic": "undi-3.16", "firmware": "uefi", "mode": "proxy"}, 1000.0)
    (row,) = dispatch(controller.facade, [], "client-list", {})["arguments"]["clients"]
    assert row["state"] == "new" and row["progress"] == "dhcp"
    assert (row["mac"], row["uuid"], row["firmware"], row["nic"], row["arch"]) == (MAC, UUID, "uefi", "undi-3.16", 7)

    answer = dispatch(controller.facade, [], "client-assign", {"mac": MAC.upper(), "name": "lab-7"})
    assert answer["result"] == SUCCESS, answer
    first = answer["arguments"]["revision"]
    (entry,) = [c for c in controller.store.data["clients"] if c["mac"] == MAC]
    assert entry["name"] == "lab-7" and entry["lun"] == 0
    answer = dispatch(controller.facade, [], "client-assign", {"mac": MAC, "lun": 3})
    assert answer["result"] == SUCCESS and answer["arguments"]["revision"] == first + 1
    (entry,) = [c for c in controller.store.data["clients"] if c["mac"] == MAC]
    assert (entry["name"], entry["lun"]) == ("lab-7", 3)  # the name given before stays
    (row,) = dispatch(controller.facade, [], "client-list", {})["arguments"]["clients"]
    assert row["state"] == "dhcp" and row["name"] == "lab-7" and row["uuid"] == UUID
    got = dispatch(controller.facade, [], "client-get", {"mac": MAC})["arguments"]["client"]
    assert got["uuid"] == UUID and got["firmware"] == "uefi"


def test_client_assign_refuses_what_the_config_refuses_and_changes_nothing(controller):
    before = controller.store.revision
    answer = dispatch(controller.facade, [], "client-assign", {"mac": MAC, "lun": 99999})
    assert answer["result"] == ERROR and "lun" in answer["text"], answer
    assert dispatch(controller.facade, [], "client-assign", {"mac": MAC})["result"] == ERROR
    assert controller.store.revision == before


def test_proxy_boot_timeline_maps_the_address_from_the_site_server(controller):
    clients = controller.fleet.clients
    events = [
        ("dhcp.discover", {"mac": MAC, "client_class": "ipxe", "arch": 0, "firmware": "bios", "mode": "proxy"}),
        ("dhcp.proxy.offered", {"mac": MAC, "client_class": "ipxe", "bootfile": "boot.ipxe-52-54-00-00-00-42",
                                "root_path": None, "confirm_on_4011": False}),
        ("dhcp.proxy.address", {"mac": MAC, "ip": "10.77.0.150"}),
        ("tftp.transfer.finished", {"ip": "10.77.0.150", "file": "boot.ipxe-52-54-00-00-00-42"}),
    ]
    stored = []
    for n, (kind, fields) in enumerate(events):
        clients.observe(kind, fields, 1000.0 + n)
        stored.append({"type": kind, "fields": fields, "ts": 1000.0 + n})
    row = clients.by_mac[MAC]
    assert row.ip == "10.77.0.150" and clients.mac_of({"ip": "10.77.0.150"}) == MAC
    steps = [(s["step"], s["detail"]) for s in timeline(stored)]
    assert steps == [("DHCP discover", ""), ("ProxyDHCP offer", "boot.ipxe-52-54-00-00-00-42"),
                     ("DHCP address (site server)", "10.77.0.150"), ("TFTP file", "boot.ipxe-52-54-00-00-00-42")]
