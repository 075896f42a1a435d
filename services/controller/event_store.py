"""Events from every service, kept in SQLite (WAL) with retention by age and by count.

Writes come in batches (all events that arrived in one turn of the controller's loop, one transaction), so a
flood costs one commit per batch, not per event. `synchronous=NORMAL` in WAL mode survives `kill -9` of the
controller; events are a record, not state a client depends on.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    service TEXT NOT NULL,
    instance INTEGER NOT NULL,
    type TEXT NOT NULL,
    mac TEXT,
    ip TEXT,
    fields TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE INDEX IF NOT EXISTS events_type ON events(type, ts);
CREATE INDEX IF NOT EXISTS events_mac ON events(mac, ts);
"""


class EventStore:
    def __init__(self, path: Path, retention_days: float = 7.0, max_rows: int = 1_000_000):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.retention_days = retention_days
        self.max_rows = max_rows

    def add_many(self, events: Iterable[dict[str, Any]]) -> int:
        rows = [
            (
                e["ts"],
                e["service"],
                e["instance"],
                e["type"],
                e["fields"].get("mac"),
                e["fields"].get("ip"),
                json.dumps(e["fields"], default=str),
            )
            for e in events
        ]
        if rows:
            with self.db:
                self.db.executemany(
                    "INSERT INTO events (ts, service, instance, type, mac, ip, fields) VALUES (?,?,?,?,?,?,?)", rows
                )
        return len(rows)

    def prune(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self.db:
            cur = self.db.execute("DELETE FROM events WHERE ts < ?", (now - self.retention_days * 86400,))
            removed = cur.rowcount
            cur = self.db.execute(
                "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (self.max_rows,)
            )
            return removed + cur.rowcount

    def query(
        self,
        *,
        after_id: int = 0,
        since: float | None = None,
        type: str | None = None,
        mac: str | None = None,
        ips: list[str] | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        where, args = ["id > ?"], [after_id]
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if type:
            # a prefix selects a family: `dhcp` or `dhcp.lease` match dhcp.lease.granted
            where.append("(type = ? OR type LIKE ?)")
            args += [type, type + ".%"]
        if mac and ips:
            # a PC's events: those naming its MAC, and those that know only one of its addresses
            marks = ",".join("?" * len(ips))
            where.append(f"(mac = ? OR (mac IS NULL AND ip IN ({marks})))")
            args += [mac, *ips]
        elif mac:
            where.append("mac = ?")
            args.append(mac)
        order = "ASC" if after_id or since is not None else "DESC"
        sql = f"SELECT id, ts, service, instance, type, fields FROM events WHERE {' AND '.join(where)} ORDER BY id {order} LIMIT ?"
        rows = self.db.execute(sql, (*args, limit)).fetchall()
        if order == "DESC":
            rows.reverse()
        return [
            {"id": r[0], "ts": r[1], "service": r[2], "instance": r[3], "type": r[4], "fields": json.loads(r[5])}
            for r in rows
        ]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self) -> None:
        self.db.close()
