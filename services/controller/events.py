"""The events the controller files itself (shared/events.py names them): image changes its commands make, and
its web server's restarts on a revision that changes the `web` section.

They reach the event store as if a service had sent them (`Controller.emit`, service `controller`), so
`bootfleet events --type image` shows them beside the iSCSI target's own resets and quota events.
"""

from __future__ import annotations

from typing import ClassVar

from shared import events as bus
from shared.events import Event, event


@event
class VersionPublished(Event):
    """`image publish`: the super PC's overlay became version `version`, now current."""

    type: ClassVar[str] = bus.IMAGE_VERSION_PUBLISHED
    image: str
    version: int
    pc: str  # the super PC whose overlay it was
    size: int  # bytes the new version takes on disk


@event
class Rollback(Event):
    """`image rollback`: an older version is current again (PCs get it at their next power-on)."""

    type: ClassVar[str] = bus.IMAGE_ROLLBACK
    image: str
    version: int


@event
class OverlayReset(Event):
    """A PC's overlay emptied by the controller: `client reset` (operator) or the publish that used it."""

    type: ClassVar[str] = bus.IMAGE_OVERLAY_RESET
    mac: str
    pc: str
    image: str
    version: int | None  # the version the overlay sat on (None: it had none)
    reason: str  # operator | published


@event
class WebApplied(Event):
    """A revision's `web` section serves: the web server restarted on it (or turned off: state off, no url)."""

    type: ClassVar[str] = bus.WEB_APPLIED
    revision: int
    state: str  # running | off
    url: str | None = None


@event
class WebApplyFailed(Event):
    """A revision's `web` section could not start a server: `url`, the previous one, serves on (None: none does)."""

    type: ClassVar[str] = bus.WEB_APPLY_FAILED
    revision: int
    reason: str
    url: str | None = None
