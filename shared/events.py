"""The events services push to the controller: one dataclass per event type, one way to emit it.

An event on the bus is a msgpack map {"type", "v", "ts", "service", "instance", "fields"}; see
docs/architecture.md. A core builds an `Event` (a dataclass whose class knows its bus name, `type`) and
hands it out through its `take_events()`; the service passes it to `ServiceContext.emit(event)`, which sends
`event.type` and `event.fields()` to the controller. Fields named `mac` and `ip` let the controller put an event
on a client's timeline.

The type strings below are the wire contract the controller matches on (services/controller/fleet.py,
leases.py, and lease-release in commands.py);
each service's own `events.py` holds the dataclasses of the events it emits, named after these strings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

# DHCP
LEASE_OFFERED = "dhcp.lease.offered"
LEASE_GRANTED = "dhcp.lease.granted"
LEASE_RENEWED = "dhcp.lease.renewed"
LEASE_RELEASED = "dhcp.lease.released"
LEASE_DECLINED = "dhcp.lease.declined"
LEASE_EXPIRED = "dhcp.lease.expired"
DHCP_DISCOVER = "dhcp.discover"
DHCP_NAK = "dhcp.nak"
DHCP_UNKNOWN_CLIENT = "dhcp.unknown_client"
DHCP_POOL_EXHAUSTED = "dhcp.pool_exhausted"
DHCP_PROXY_OFFERED = "dhcp.proxy.offered"  # dhcp.mode: proxy (services/dhcp/proxy.py)
DHCP_PROXY_ACK = "dhcp.proxy.ack"
DHCP_PROXY_ADDRESS = "dhcp.proxy.address"

# TFTP
TFTP_STARTED = "tftp.transfer.started"
TFTP_FINISHED = "tftp.transfer.finished"
TFTP_FAILED = "tftp.transfer.failed"

# HTTP (the TFTP service's HTTP listener: services/tftp/http_core.py)
HTTP_FINISHED = "http.transfer.finished"
HTTP_FAILED = "http.transfer.failed"

# iSCSI
ISCSI_LOGIN = "iscsi.login"
ISCSI_LOGOUT = "iscsi.logout"
ISCSI_LOGIN_FAILED = "iscsi.login.failed"
ISCSI_FIRST_READ = "iscsi.first_read"
ISCSI_IO_STATS = "iscsi.io_stats"
ISCSI_MIRROR_LEG_DROPPED = "iscsi.mirror.leg_dropped"  # a RAID-1 leg failed and is out (docs/iscsi.md, "Mirrors")
ISCSI_MIRROR_RESYNCED = "iscsi.mirror.resynced"  # a dropped leg rebuilt by lun-resync: the mirror is whole again

# Service lifecycle: sent by shared/managed.py (a managed process; standalone, nothing is sent)
SERVICE_STARTED = "service.started"
SERVICE_APPLIED = "service.applied"
SERVICE_APPLY_FAILED = "service.apply_failed"
SERVICE_STOPPING = "service.stopping"

# Images (issue 13, docs/images.md): the iSCSI target's overlay reset at power-on and quota events, the
# controller's publish, rollback and operator resets
IMAGE_OVERLAY_RESET = "image.overlay.reset"
IMAGE_QUOTA_THRESHOLD = "image.quota.threshold"
IMAGE_QUOTA_REACHED = "image.quota.reached"
IMAGE_VERSION_PUBLISHED = "image.version.published"
IMAGE_ROLLBACK = "image.rollback"

# The controller's web server (services/controller/web/host.py): a revision's web section applied, or not (the
# previous server serves on)
WEB_APPLIED = "web.applied"
WEB_APPLY_FAILED = "web.apply_failed"

# Long operations (image import/export, LUN resync...): progress and the end, tied by `op`, an id the requester
# chose; `bootfleet` follows them with events-wait (docs/control.md, "Long operations")
OPERATION_PROGRESS = "operation.progress"
OPERATION_FINISHED = "operation.finished"


@dataclasses.dataclass(slots=True, kw_only=True)
class Event:
    """Base of every event. A subclass sets `type` (its bus name) and declares its fields.

    Events are values: nobody changes one after it is built. They are not `frozen` dataclasses all the same,
    since a frozen one costs twice as much to build (1.1 us against 0.44 us for seven fields, measured with
    timeit) and DHCP builds two per exchange."""

    type: ClassVar[str] = ""
    local: ClassVar[bool] = False  # True: handled inside the service, never sent to the controller

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def event(cls: type) -> type:
    """Decorator for event classes: the dataclass options every event uses."""
    return dataclasses.dataclass(slots=True, kw_only=True)(cls)


@event
class ServiceStarted(Event):
    type: ClassVar[str] = SERVICE_STARTED
    pid: int


@event
class ServiceApplied(Event):
    type: ClassVar[str] = SERVICE_APPLIED
    revision: int
    cached: bool = False


@event
class ServiceApplyFailed(Event):
    type: ClassVar[str] = SERVICE_APPLY_FAILED
    revision: int
    reason: str


@event
class ServiceStopping(Event):
    type: ClassVar[str] = SERVICE_STOPPING
    pid: int


@event
class OperationProgress(Event):
    """`done` of `total` `unit`s (total None: not known); sent at most every 1 % or every second."""

    type: ClassVar[str] = OPERATION_PROGRESS
    op: str
    name: str  # the command that started it: image-import, lun-resync
    done: int
    total: int | None = None
    unit: str = "bytes"


@event
class OperationFinished(Event):
    """The end of an operation: `ok`, and one line saying what happened (the error, when not ok)."""

    type: ClassVar[str] = OPERATION_FINISHED
    op: str
    name: str
    ok: bool
    text: str = ""
