"""What counts as a PC's power-on (issue 13, services/controller/pcboot.py), sans-IO: the DHCP core's own
events fed to PcBoots. The firmware's discover and its loader fetch count; the running OS's DHCP (a plain
discover after a link blip, a renewal) never does; a power-on known only from the iPXE script after the
firmware's login of that boot gives no new key (the disk never changes within one power-on)."""

from __future__ import annotations

import socket
import struct

from services.controller.pcboot import BOOT_GAP, LATE_LOGIN, PcBoots
from services.dhcp import options as opt
from services.dhcp import packet as pk
from services.dhcp.core import DhcpCore
from services.dhcp.lease_table import MemoryLeaseTable
from shared.config.loader import config_from_dict
from tests.dhcp.test_core import IFACE, IPXE, PXE_BIOS

MAC = "52:54:00:00:00:01"
TARGET = "iqn.2026-12.org.bootfleet:win10.pc1"
CONFIG = config_from_dict({
    "boot": {"server": "10.0.0.1"},
    "images": [{"name": "win10"}],
    "clients": [{"mac": MAC, "name": "pc1", "image": "win10"}],
    "dhcp": {"interfaces": [{"name": "eth0"}],
             "scopes": [{"name": "lan", "subnet": "10.0.0.0/24", "interface": "eth0",
                         "ranges": [{"start": "10.0.0.100", "end": "10.0.0.120"}]}]},
})


class Store(dict):
    def set(self, key, val):
        self[key] = val
        return 0


class Images:
    def exists(self, name):
        return True

    def info(self, name):
        return type("Info", (), {"current": 1})()

    def overlay_base(self, name, pc):
        return None


class Pc:
    """One PC on an image as the controller sees it: the DHCP core answers its packets, every event of the
    core goes to PcBoots, as the controller's loop would pass it."""

    def __init__(self, tmp_path):
        self.boots = PcBoots(Store(), Images(), tmp_path / "pcboot.json", lambda f: f.get("mac"))
        self.boots.reconfigure(CONFIG)
        self.dhcp = DhcpCore(CONFIG, MemoryLeaseTable())
        self.t = 1_800_000_000.0
        self.tsih = 0
        self.ip = None

    @property
    def boot(self) -> int:
        return self.boots.keys[MAC]["boot"]

    def feed(self, type, fields, dt=0.5):
        self.t += dt
        self.boots.observe(type, fields, self.t, instance=0, service="x")

    def dhcp_packet(self, mtype, options, dt=0.5):
        self.t += dt
        mac = bytes.fromhex(MAC.replace(":", ""))
        options = dict(options)
        if mtype == pk.REQUEST:
            options[opt.REQUESTED_ADDRESS] = socket.inet_aton(self.ip)
        reply = self.dhcp.handle(pk.parse(pk.build_request(mtype, mac, options=options)), IFACE, self.t)
        self.dhcp.leases.commit()
        if reply is not None:
            msg = pk.parse(reply.data)
            self.ip = socket.inet_ntoa(struct.pack("!I", msg.yiaddr)) if msg.yiaddr else self.ip
        for e in self.dhcp.take_events():
            self.boots.observe(e.type, e.fields(), self.t, instance=0, service="dhcp")

    def fetch(self, file, dt=0.5, proto="tftp"):
        self.feed(f"{proto}.transfer.finished", {"ip": self.ip, "mac": MAC, "file": file}, dt)

    def login(self, dt=0.5):
        self.tsih += 1
        self.feed("iscsi.login", {"ip": self.ip, "target": TARGET, "tsih": self.tsih, "session_type": "Normal"}, dt)

    def firmware_boot(self, dt):
        """PXE ROM discover, the loader, iPXE's discover, then iPXE's login and its script."""
        self.dhcp_packet(pk.DISCOVER, PXE_BIOS, dt)
        self.dhcp_packet(pk.REQUEST, PXE_BIOS)
        self.fetch("undionly.kpxe")
        self.dhcp_packet(pk.DISCOVER, IPXE)
        self.dhcp_packet(pk.REQUEST, IPXE)
        self.fetch("boot.ipxe")
        self.login()


def test_the_running_oss_own_dhcp_is_never_a_power_on(tmp_path):
    pc = Pc(tmp_path)
    first = pc.boot
    pc.firmware_boot(dt=BOOT_GAP + 1)
    assert pc.boot == first + 1
    pc.login(dt=5)  # the OS logs in (iPXE's session handed over)
    booted = pc.boot
    # the OS's DHCP client: a plain discover after a link blip (no option 60/77/93), one that names its own
    # vendor class, a renewal, a rebinding broadcast, long after and right after its logins
    for dt in (1, BOOT_GAP + 5):
        pc.dhcp_packet(pk.DISCOVER, {}, dt)
        pc.dhcp_packet(pk.REQUEST, {})
        pc.dhcp_packet(pk.DISCOVER, {opt.VENDOR_CLASS: b"MSFT 5.0"}, dt)
        pc.dhcp_packet(pk.REQUEST, {opt.VENDOR_CLASS: b"MSFT 5.0"}, dt)
        pc.dhcp_packet(pk.DISCOVER, {opt.VENDOR_CLASS: b"udhcp 1.36.1"}, dt)
        pc.login(dt)  # it reconnects after the blip: still the same power-on
    assert pc.boot == booted
    # a hard reset seconds later: the firmware's discover is a power-on (it logged in since the last one)
    pc.firmware_boot(dt=2)
    assert pc.boot == booted + 1


def test_the_loader_fetch_counts_when_no_discover_is_seen(tmp_path):
    """Another DHCP server answers: the PXE ROM's fetch of iPXE from us comes before any login."""
    pc = Pc(tmp_path)
    first = pc.boot
    pc.fetch("undionly.kpxe", dt=BOOT_GAP + 1)
    assert pc.boot == first + 1
    pc.fetch("boot.ipxe")  # the same boot's script
    pc.login()
    assert pc.boot == first + 1
    pc.fetch("snponly.efi", dt=3, proto="http")  # a reboot, seconds later, by UEFI HTTP boot
    assert pc.boot == first + 2


def test_a_script_after_the_firmwares_login_of_that_boot_is_too_late(tmp_path):
    pc = Pc(tmp_path)
    first = pc.boot
    # root-path from another DHCP server, iPXE in the NIC's ROM: iPXE logs in, then fetches the script
    pc.login(dt=BOOT_GAP + 1)
    pc.fetch("boot.ipxe", dt=1)
    assert pc.boot == first  # the firmware was served the disk as it was: no new key for this boot
    pc.login(dt=5)  # the OS's login: the same power-on
    assert pc.boot == first
    # a script fetched first (its root-path is in the script), then the login: a power-on in time
    pc.fetch("boot.ipxe", dt=LATE_LOGIN + 60)
    assert pc.boot == first + 1
    pc.login()
    # the next boot's discover is a reboot, even seconds later (the firmware logged in since)
    pc.dhcp_packet(pk.DISCOVER, IPXE, 3)
    assert pc.boot == first + 2
