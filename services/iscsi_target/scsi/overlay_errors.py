"""The errors of a PC's overlay disk (services/iscsi_target/scsi/overlay.py and base_image.py)."""

from __future__ import annotations

from services.iscsi_target.scsi.backstore import BackstoreError


class OverlayError(BackstoreError):
    """The overlay cannot be opened or used (the message names the file and why)."""


class OverlayFull(OverlayError):
    """A write refused for lack of space, raised before anything of it was written (except `enospc`).

    reason: "quota" (the overlay's own quota), "reserve" (the image store's free-space reserve), or
    "enospc" (the file system itself). The iSCSI layer answers DATA PROTECT, SPACE ALLOCATION FAILED
    WRITE PROTECT (27h/07h): `sense_key` and `asc_ascq` below.
    """

    sense_key = 0x07          # DATA PROTECT
    asc_ascq = (0x27, 0x07)   # SPACE ALLOCATION FAILED WRITE PROTECT

    def __init__(self, path: str, reason: str, needed: int, used: int, limit: int | None):
        self.path, self.reason, self.needed, self.used, self.limit = path, reason, needed, used, limit
        what = {"quota": f"quota of {limit} bytes", "reserve": "image store's free-space reserve",
                "enospc": "file system (ENOSPC)"}[reason]
        super().__init__(f"{path}: {needed} more bytes would pass the {what} ({used} bytes in use)")
