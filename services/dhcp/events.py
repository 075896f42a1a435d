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


@event
class Nak(Event):
    type: ClassVar[str] = bus.DHCP_NAK
    mac: str
    ip: str | None
    reason: str
    scope: str | None


@event
class UnknownClient(Event):
    """A client turned away by a `known_clients_only` scope."""

    type: ClassVar[str] = bus.DHCP_UNKNOWN_CLIENT
    mac: str
    scope: str


@event
class PoolExhausted(Event):
    type: ClassVar[str] = bus.DHCP_POOL_EXHAUSTED
    mac: str
    scope: str
