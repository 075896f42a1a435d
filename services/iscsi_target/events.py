"""The events the iSCSI target reports: one dataclass per event type (see shared/events.py).

The connection core (connection.py) builds them and hands them out through `Connection.take_events()`;
the I/O loop passes each to the service (service.py), which adds the PC's MAC when DHCP told us one and
sends it with `ctx.emit(event)`. Field names and values are the wire contract the controller reads
(services/controller/fleet.py, docs/iscsi.md "Events").

`Error` and `SessionEnd` are `local`: the service handles them (logs a fault; sends a session's last I/O
statistics) and never sends them to the controller.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from shared import events as bus
from shared.events import Event, event


class _AboutPc(Event):
    """An event about one PC: `mac` is filled in by the service and sent only when known."""

    __slots__ = ()

    def fields(self) -> dict[str, Any]:
        out = Event.fields(self)
        if out.get("mac") is None:
            out.pop("mac", None)
        return out

    def with_mac(self, mac: str) -> "_AboutPc":
        return dataclasses.replace(self, mac=mac)


@event
class Login(_AboutPc):
    type: ClassVar[str] = bus.ISCSI_LOGIN
    ip: str
    initiator: str
    target: str  # "" for a discovery session
    isid: str  # "0x" and 12 hex digits
    tsih: int
    session_type: str  # Normal | Discovery
    auth: str  # None | CHAP
    user: str
    reinstated: bool
    header_digest: str  # CRC32C | None
    data_digest: str
    mac: str | None = None


@event
class LoginFailed(_AboutPc):
    type: ClassVar[str] = bus.ISCSI_LOGIN_FAILED
    ip: str
    initiator: str
    target: str
    reason: str
    status: str  # "0x" and 4 hex digits: status class and detail
    mac: str | None = None


@event
class Logout(_AboutPc):
    type: ClassVar[str] = bus.ISCSI_LOGOUT
    ip: str
    initiator: str
    target: str
    tsih: int
    reason: str
    mac: str | None = None


@event
class FirstRead(_AboutPc):
    type: ClassVar[str] = bus.ISCSI_FIRST_READ
    ip: str
    initiator: str
    target: str
    tsih: int
    lun: int
    mac: str | None = None


@event
class IoStats(_AboutPc):
    """One LUN of one session over one interval: commands, bytes, latency (the mean in µs, the sum in ns, and the
    commands per latency bucket, shared/iscsi_latency.py's bounds in order, the last one above them all), and
    the commands by opcode name (scsi/opcodes.py: READ_10, ..., an unnamed one as 0xC1)."""

    type: ClassVar[str] = bus.ISCSI_IO_STATS
    ip: str
    initiator: str
    target: str
    tsih: int
    lun: int
    reads: int
    writes: int
    others: int
    read_bytes: int
    write_bytes: int
    latency_us_avg: float
    latency_sum_ns: int = 0
    latency_buckets: list[int] = dataclasses.field(default_factory=list)
    ops: dict[str, int] = dataclasses.field(default_factory=dict)
    mac: str | None = None


@event
class Error(Event):
    """A fault the connection survived (the SCSI layer raised, a Data-Out sequence error): logged."""

    type: ClassVar[str] = "iscsi.error"
    local: ClassVar[bool] = True
    where: str
    error: str
    level: str = "error"  # error | warning


@event
class SessionEnd(Event):
    """A session ended: the service sends its last I/O statistics."""

    type: ClassVar[str] = "iscsi.session_end"
    local: ClassVar[bool] = True
    session: object  # session.Session


# ---------------------------------------------------------------------------------------------- PCs on images
@event
class OverlayReset(Event):
    """A PC's discard overlay emptied at its power-on (pc_disks.py): it starts clean on `version`."""

    type: ClassVar[str] = bus.IMAGE_OVERLAY_RESET
    mac: str
    pc: str
    image: str
    version: int
    reason: str  # power-on (here); the controller sends operator / published for its own resets


@event
class QuotaThreshold(Event):
    """A PC's overlay reached its soft threshold (its initiator gets the 38h/07h unit attention)."""

    type: ClassVar[str] = bus.IMAGE_QUOTA_THRESHOLD
    mac: str
    pc: str
    image: str
    used: int  # bytes allocated in the overlay
    quota: int


@event
class QuotaReached(Event):
    """A PC's write refused for space (DATA PROTECT 27h/07h): its quota, or the store's free-space reserve."""

    type: ClassVar[str] = bus.IMAGE_QUOTA_REACHED
    mac: str
    pc: str
    image: str
    used: int
    quota: int | None
    reason: str  # quota | reserve | enospc


# ---------------------------------------------------------------------------------------------- mirrors (RAID-1)
@event
class MirrorLegDropped(Event):
    """A mirror LUN's leg failed (I/O error, file gone, disk full) and is out; the LUN serves from the other.
    `bootfleet lun resync TARGET LUN` rebuilds it."""

    type: ClassVar[str] = bus.ISCSI_MIRROR_LEG_DROPPED
    target: str
    lun: int
    leg: int  # 0 or 1, as listed in backstore.legs
    name: str  # the leg's file or device
    reason: str
    mirror: str  # the mirror's id (its state file <state>/mirrors/<id>.json)


@event
class MirrorResynced(Event):
    """A dropped leg rebuilt by a resync (operation `op`): both legs in sync again."""

    type: ClassVar[str] = bus.ISCSI_MIRROR_RESYNCED
    target: str
    lun: int
    leg: int
    name: str
    mirror: str
    bytes: int  # copied
    seconds: float
    op: str
