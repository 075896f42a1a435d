"""Requests the controller answers later: command keys asked of services, and CLI requests waiting for an event.

- `CommandKeys`: `command/<service>/<id>` -> `{name, args, ts}` in the replicated store asks every process of a
  service to perform an operation once (`BaseService.command`); the key is removed after `COMMAND_TTL`, long
  enough for a service restarting meanwhile to still see it.
- `Waiters`: a CLI request answered when a matching event arrives (the one the command causes), or with an
  error at its deadline.

Sans-IO: the clock is passed in; answers are handed back as (envelope, answer) for the loop to send.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from shared.bus import message as m

COMMAND_TTL = 60.0  # seconds a command key stays in the store

Reply = tuple[list[bytes], dict[str, Any]]


class Store(Protocol):
    def set(self, key: str, val: Any) -> int: ...


class CommandKeys:
    def __init__(self, store: Store):
        self.store = store
        self._live: deque[tuple[float, str]] = deque()  # (expiry, key), oldest first

    def send(self, service: str, name: str, args: dict[str, Any], now: float) -> str:
        key = m.command_prefix(service) + uuid.uuid4().hex[:12]
        self.store.set(key, {"name": name, "args": args, "ts": now})
        self._live.append((now + COMMAND_TTL, key))
        return key

    def expire(self, now: float) -> None:
        while self._live and self._live[0][0] <= now:
            self.store.set(self._live.popleft()[1], None)


@dataclass
class Waiter:
    envelope: list[bytes]
    match: Callable[[dict[str, Any]], bool]
    deadline: float
    on_event: Callable[[dict[str, Any]], dict[str, Any]]
    on_timeout: Callable[[], dict[str, Any]]


class Waiters:
    def __init__(self) -> None:
        self._waiting: list[Waiter] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, waiter: Waiter) -> None:
        self._waiting.append(waiter)

    def matched(self, msg: dict[str, Any]) -> list[Reply]:
        """The answers of the waiters this event completes (each answered once)."""
        if not self._waiting:
            return []
        done = [w for w in self._waiting if w.match(msg)]
        for w in done:
            self._waiting.remove(w)
        return [(w.envelope, w.on_event(msg)) for w in done]

    def expired(self, now: float) -> list[Reply]:
        done = [w for w in self._waiting if w.deadline <= now]
        for w in done:
            self._waiting.remove(w)
        return [(w.envelope, w.on_timeout()) for w in done]
