"""The result of one SCSI command, as the transport sends it."""

from __future__ import annotations


class ScsiResponse:
    """status: 0 GOOD, 2 CHECK CONDITION, 0x18 RESERVATION CONFLICT (0x04 CONDITION MET);
    sense: 18 bytes of fixed-format sense or None; data: the Data-In payload as a list of buffers,
    already cut to the CDB's allocation length."""

    __slots__ = ("status", "sense", "data")

    def __init__(self, status: int = 0, sense: bytes | None = None, data=None):
        self.status = status
        self.sense = sense
        self.data = data if data is not None else []

    def __repr__(self) -> str:
        size = sum(len(d) for d in self.data)
        return f"ScsiResponse(status={self.status:#04x}, sense={self.sense.hex() if self.sense else None}, {size} bytes)"


def good(data: bytes | memoryview | None = None, alloc: int | None = None) -> ScsiResponse:
    """GOOD with optional Data-In, cut to the allocation length."""
    if data is None:
        return ScsiResponse(0, None, [])
    if alloc is not None and len(data) > alloc:
        data = data[:alloc]
    return ScsiResponse(0, None, [data] if len(data) else [])
