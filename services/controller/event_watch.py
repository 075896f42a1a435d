"""`events-wait`: a request held until events it asks for are filed (a long poll), so `bootfleet events
--follow` is pushed by the controller instead of polling the event store.

A watch is the events-list query (`after_id`, `type`, `mac`, `op`) with a deadline. The loop calls `filed()`
after each batch of events is stored: the watches whose type the batch touches run their query once, and
those it finds anything for are answered. At the deadline a watch is answered empty (result 3), and the
client asks again with the same `after_id`. Between batches nothing is queried.

Sans-IO: the clock is passed in; the query is a callable; answers are handed back as (envelope, answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Reply = tuple[list[bytes], dict[str, Any]]
Query = Callable[..., list[dict[str, Any]]]
Answer = Callable[[list[dict[str, Any]], int], dict[str, Any]]  # (events, last id looked at) -> the answer

MAX_WAIT = 60.0  # seconds a watch may be held (the client asks again)


def matches_type(wanted: str | None, type: str) -> bool:
    """events-list's type filter: a type, or a prefix of dotted words (`dhcp` matches dhcp.lease.granted)."""
    return not wanted or type == wanted or type.startswith(wanted + ".")


def select(rows: list[dict[str, Any]], op: str | None) -> list[dict[str, Any]]:
    """Only the events of one long operation (fields.op), when asked (progress of image import, resync...)."""
    return rows if not op else [r for r in rows if r["fields"].get("op") == op]


@dataclass
class Watch:
    envelope: list[bytes]
    query: dict[str, Any]  # after_id, type, mac, limit: events-list's arguments
    op: str | None
    deadline: float


class EventWatches:
    def __init__(self) -> None:
        self._watching: list[Watch] = []

    def __len__(self) -> int:
        return len(self._watching)

    def add(self, watch: Watch) -> None:
        self._watching.append(watch)

    def filed(self, types: set[str], query: Query, answer: Answer) -> list[Reply]:
        """After a batch of events of `types` was stored: answer the watches that now find events."""
        done: list[Reply] = []
        for w in list(self._watching):
            if not any(matches_type(w.query.get("type"), t) for t in types):
                continue
            rows = query(**w.query)
            if not rows:
                continue
            w.query["after_id"] = rows[-1]["id"]  # seen: other operations' events are not looked at twice
            picked = select(rows, w.op)
            if picked:
                self._watching.remove(w)
                done.append((w.envelope, answer(picked, w.query["after_id"])))
        return done

    def expired(self, now: float, answer: Answer) -> list[Reply]:
        done = [w for w in self._watching if w.deadline <= now]
        for w in done:
            self._watching.remove(w)
        return [(w.envelope, answer([], w.query["after_id"])) for w in done]
