"""The events the TFTP service sends to the controller: one dataclass per shape on the wire.

A read and an upload carry different fields under the same bus name (an upload says `upload=True`, a read its
`retransmits`), and a refused request says its error `code` where a failed transfer says the `bytes` it sent;
the controller (services/controller/fleet.py) reads `ip`, `mac`, `file` and `reason`. Each shape is its own
class, so a field is never sent where it was not before.
"""

from __future__ import annotations

from typing import ClassVar

from shared import events as bus
from shared.events import Event, event


@event
class TransferStarted(Event):
    type: ClassVar[str] = bus.TFTP_STARTED
    ip: str
    port: int
    file: str
    mac: str | None
    blksize: int
    windowsize: int
    tsize: int
    mode: str


@event
class UploadStarted(Event):
    type: ClassVar[str] = bus.TFTP_STARTED
    ip: str
    port: int
    file: str
    mac: str | None
    blksize: int
    windowsize: int
    tsize: int | None  # what the client announced, None when it did not
    mode: str
    upload: bool = True


@event
class TransferFinished(Event):
    type: ClassVar[str] = bus.TFTP_FINISHED
    ip: str
    file: str
    mac: str | None
    bytes: int
    duration: float  # seconds
    blksize: int
    windowsize: int
    retransmits: int


@event
class UploadFinished(Event):
    type: ClassVar[str] = bus.TFTP_FINISHED
    ip: str
    file: str
    mac: str | None
    bytes: int
    duration: float  # seconds
    blksize: int
    windowsize: int
    upload: bool = True


@event
class RequestRefused(Event):
    """A request answered with an ERROR and no transfer (not a malformed one: those are only counted)."""

    type: ClassVar[str] = bus.TFTP_FAILED
    ip: str
    port: int
    file: str
    mac: str | None
    reason: str
    code: int


@event
class TransferFailed(Event):
    type: ClassVar[str] = bus.TFTP_FAILED
    ip: str
    port: int
    file: str
    mac: str | None
    reason: str
    bytes: int  # sent before it failed


@event
class HttpTransferFinished(Event):
    """A GET or HEAD answered: `bytes` of body sent (0 for HEAD and 304), in `duration` seconds."""

    type: ClassVar[str] = bus.HTTP_FINISHED
    ip: str
    port: int
    file: str
    mac: str | None
    method: str
    status: int  # 200, 206 or 304
    bytes: int
    duration: float
    range: str | None  # "first-last" of a 206


@event
class HttpTransferFailed(Event):
    """A request refused (4xx, 5xx: `status`) or a body cut short (`status` of what was being sent)."""

    type: ClassVar[str] = bus.HTTP_FAILED
    ip: str
    port: int
    file: str
    mac: str | None
    status: int
    reason: str
    bytes: int
