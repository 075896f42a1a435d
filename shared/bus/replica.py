"""The Clone pattern's rules on a service's side, sans-IO: messages and time in, what to do out.

Theory of operation. Subscribe first, then ask for a snapshot, so no update falls between the two; updates
with a seq at or below the snapshot's are dropped (already in it), the next one is applied, and one that
skips a number means an update was lost: take a new snapshot. A heartbeat with a new epoch (the controller
restarted) or a seq we have not seen also calls for a snapshot. No word for `timeout` seconds: the
controller is away; the replica stays as it is (the service keeps serving) and the loop keeps asking for a
snapshot until one arrives.

`CloneClient` (clone_client.py) owns the sockets and drives this class; presence changes are read with
`take_presence()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.bus import message as m


@dataclass(frozen=True, slots=True)
class Apply:
    """Apply this change to the local copy (val None: delete the key)."""

    key: str
    val: Any


@dataclass(frozen=True, slots=True)
class Resync:
    """Stop following: take a new snapshot. `reason` is for the log; `lost`: an update was lost (a warning)."""

    reason: str
    lost: bool = True


class Replica:
    def __init__(self, timeout: float = 5.0):
        self.timeout = timeout
        self.epoch: str | None = None
        self.seq = -1
        self.present = False
        self.snapshots = 0  # complete snapshots taken (status, tests)
        self._parts: dict[str, Any] = {}
        self._deadline = 0.0
        self._last_heard = 0.0
        self._presence: list[bool] = []

    def take_presence(self) -> list[bool]:
        """The presence changes since the last call (True: the controller came back), oldest first."""
        out, self._presence = self._presence, []
        return out

    def _set_presence(self, up: bool) -> None:
        if up != self.present:
            self.present = up
            self._presence.append(up)

    # -- a snapshot ---------------------------------------------------------------------------------
    def begin_snapshot(self, now: float) -> None:
        """An `icanhaz` was sent: collect the answer until `timeout` from now."""
        self._parts = {}
        self._deadline = now + self.timeout

    def snapshot_expired(self, now: float) -> bool:
        """True when the snapshot did not arrive in time: the controller is away."""
        if now < self._deadline:
            return False
        self._set_presence(False)
        return True

    def snapshot_message(self, msg: dict[str, Any], now: float) -> dict[str, Any] | None:
        """One message from the snapshot socket; the whole store once `kthxbai` ends it, else None."""
        if msg["t"] == m.KV:
            self._parts[msg["key"]] = msg.get("val")
            return None
        if msg["t"] != m.KTHXBAI:
            return None
        self.epoch, self.seq = msg["epoch"], msg["seq"]
        self.snapshots += 1
        self._last_heard = now
        self._set_presence(True)
        store, self._parts = self._parts, {}
        return store

    # -- following updates --------------------------------------------------------------------------
    def update(self, msg: dict[str, Any], now: float) -> Apply | Resync | None:
        """One message from the publisher: a change to apply, a reason to resnapshot, or None (nothing to do)."""
        self._last_heard = now
        if msg["epoch"] != self.epoch:
            return Resync(f"controller restarted (epoch {msg['epoch']}): resynchronising", lost=False)
        seq = msg["seq"]
        if msg["t"] == m.HUGZ:
            if seq > self.seq:
                return Resync(f"missed updates {self.seq + 1}..{seq}: resynchronising")
            return None
        if msg["t"] != m.KV:
            return None
        if seq <= self.seq:
            return None  # already in our snapshot
        if seq != self.seq + 1:
            return Resync(f"update {seq} arrived after {self.seq}: one was lost, resynchronising")
        self.seq = seq
        return Apply(msg["key"], msg.get("val"))

    def silent(self, now: float) -> bool:
        """True when nothing was heard for `timeout` seconds: the controller is away (resnapshot)."""
        if now - self._last_heard <= self.timeout:
            return False
        self._set_presence(False)
        return True
