"""The events the DHCP service sends the controller, one dataclass each (see shared/events.py).

The core builds them and hands them out through `DhcpCore.take_events()`; the service emits them with
`ctx.emit(event)`. Field names and values are the wire contract services/controller/fleet.py reads: `mac` and
`ip` (dotted quad) put an event on a client's timeline; times (`expires`, `until`) are unix seconds.
"""

from __future__ import annotations

from typing import Any, ClassVar

from shared import events as bus
from shared.events import Event, event


@event
class LeaseOffered(Event):
    type: ClassVar[str] = bus.LEASE_OFFERED
    mac: str
    ip: str
    scope: str
    client_class: str


@event
class LeaseGranted(Event):
    """An ACK that starts a lease, also for a PC that boots again with its old address."""

    type: ClassVar[str] = bus.LEASE_GRANTED
    mac: str
    ip: str
    scope: str
    expires: float
    client_class: str
    bootfile: str | None
    root_path: str | None


@event
class LeaseRenewed(Event):
    """An ACK to a RENEWING or REBINDING client (ciaddr set, no server identifier) for its own lease."""

    type: ClassVar[str] = bus.LEASE_RENEWED
    mac: str
    ip: str
    expires: float


@event
class LeaseReleased(Event):
    """A RELEASE from the client, or `by="operator"` (`bootfleet lease release MAC`)."""

    type: ClassVar[str] = bus.LEASE_RELEASED
    mac: str
    ip: str
    by: str | None = None

    def fields(self) -> dict[str, Any]:
        # a client's own release carries no `by` on the wire
        if self.by is None:
            return {"mac": self.mac, "ip": self.ip}
        return {"mac": self.mac, "ip": self.ip, "by": self.by}


@event
class LeaseDeclined(Event):
    type: ClassVar[str] = bus.LEASE_DECLINED
    mac: str
    ip: str
    until: float  # end of the address's quarantine


@event
class LeaseExpired(Event):
    type: ClassVar[str] = bus.LEASE_EXPIRED
    mac: str
    ip: str


@event
class Discover(Event):
    """A DISCOVER from a booting client (PXE ROM or iPXE); plain clients' are not reported."""

    type: ClassVar[str] = bus.DHCP_DISCOVER
    mac: str
    client_class: str
    arch: int | None
    uuid: str | None = None  # option 97 (identity.py)
    nic: str | None = None  # option 94, e.g. undi-3.16
    firmware: str | None = None  # bios, uefi, uefi-http (from option 93; iPXE sends it too)
    mode: str = "server"  # dhcp.mode of the server that saw it


@event
class Nak(Event):
    type: ClassVar[str] = bus.DHCP_NAK
    mac: str
    ip: str | None
    reason: str
    scope: str | None


@event
class UnknownClient(Event):
    """A client turned away: a `known_clients_only` scope, or `boot.unknown: ignore`."""

    type: ClassVar[str] = bus.DHCP_UNKNOWN_CLIENT
    mac: str
    scope: str  # `proxy` in proxy mode
    uuid: str | None = None
    firmware: str | None = None


@event
class ProxyOffered(Event):
    """A ProxyDHCPOFFER (no address) to a PXE or iPXE client's DISCOVER; `confirm_on_4011`: UEFI firmware,
    asked to confirm with a REQUEST to port 4011."""

    type: ClassVar[str] = bus.DHCP_PROXY_OFFERED
    mac: str
    client_class: str
    bootfile: str | None
    root_path: str | None
    confirm_on_4011: bool


@event
class ProxyAck(Event):
    """A DHCPACK from port 4011 (no address) to a PXE client's REQUEST there; `ip` is its ciaddr."""

    type: ClassVar[str] = bus.DHCP_PROXY_ACK
    mac: str
    ip: str | None
    client_class: str
    bootfile: str | None
    root_path: str | None


@event
class ProxyAddress(Event):
    """The address a PC took from the site's DHCP server, as its REQUEST (option 50, or ciaddr on port 4011)
    shows it: lets the controller map TFTP and iSCSI events, which carry the address, to the PC."""

    type: ClassVar[str] = bus.DHCP_PROXY_ADDRESS
    mac: str
    ip: str


@event
class PoolExhausted(Event):
    type: ClassVar[str] = bus.DHCP_POOL_EXHAUSTED
    mac: str
    scope: str
