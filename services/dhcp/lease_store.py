"""The lease store: SQLite in WAL mode, an in-memory index, writes grouped into one commit per loop turn.

A lease is durable before its ACK leaves: the I/O loop (io_loop.py) calls `commit()` after handling the
datagrams one receive turn returned and before it sends their replies (group commit). `ip` is the primary key,
so after `kill -9` and a restart no address can be bound to two clients. It is the `LeaseTable`
(lease_table.py) the decision core is given in the service; the lease record and its states are defined there.

Readers (the controller's `bootfleet leases`) open the file with `LeaseStore.open_readonly(path)` and call
`list()`; WAL lets them read while the service writes. Several DHCP processes may share one file: each
allocates from its own slice of the pools, and SQLite serialises their commits.
"""

from __future__ import annotations

import heapq
import ipaddress
import sqlite3
import time
from pathlib import Path

from services.dhcp.lease_table import BOUND, HELD, RELEASED, Lease  # noqa: F401 (BOUND, Lease: importers of the store)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    ip        INTEGER PRIMARY KEY,   -- IPv4 address as a 32-bit integer
    mac       TEXT NOT NULL,         -- aa:bb:cc:dd:ee:ff
    client_id BLOB,                  -- option 61, if the client sent one
    scope     TEXT NOT NULL,
    state     TEXT NOT NULL,         -- bound | declined | released | expired
    expires   REAL NOT NULL,         -- unix time
    hostname  TEXT,
    updated   REAL NOT NULL
);
"""  # no index on mac: lookups by MAC use the in-memory index; every index page is one more write per commit

_UPSERT = (
    "INSERT INTO leases (ip, mac, client_id, scope, state, expires, hostname, updated) VALUES (?,?,?,?,?,?,?,?) "
    "ON CONFLICT(ip) DO UPDATE SET mac=excluded.mac, client_id=excluded.client_id, scope=excluded.scope, "
    "state=excluded.state, expires=excluded.expires, hostname=excluded.hostname, updated=excluded.updated"
)
_DELETE = "DELETE FROM leases WHERE ip = ?"


def _set_wal(db: sqlite3.Connection, timeout: float = 10.0) -> None:
    # SQLite answers "database is locked" at once, without its busy handler, when two processes switch a new
    # store to WAL together (scale.dhcp > 1 on a first start): try again until the other one is done
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class LeaseStore:
    """Leases by address and by MAC, mirrored to SQLite. Not thread-safe: one owner (the I/O loop, under its lock)."""

    def __init__(self, path: str | Path, durability: str = "process", readonly: bool = False):
        self.path = str(path)
        self.readonly = readonly
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # one owner at a time (the I/O loop's lock); it may be a thread other than the opener
            self.db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            _set_wal(self.db)
            # NORMAL in WAL mode: a committed transaction survives the process dying (kill -9), not a power cut.
            self.db.execute("PRAGMA synchronous=" + ("FULL" if durability == "power" else "NORMAL"))
            # checkpoints (which fsync the database file) run from `checkpoint()` in another thread, not
            # inside a commit on the serving path
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.db.executescript(_SCHEMA)
            self._checkpointer: sqlite3.Connection | None = None
        self.by_ip: dict[int, Lease] = {}
        self.by_mac: dict[str, list[Lease]] = {}
        self._pending: dict[int, tuple | None] = {}  # ip -> row to upsert, or None to delete
        self._expiry: list[tuple[float, int]] = []  # heap of (expires, ip) of held leases; stale entries skipped
        self.commits = 0
        self.load()

    @classmethod
    def open_readonly(cls, path: str | Path) -> "LeaseStore":
        return cls(path, readonly=True)

    def load(self) -> None:
        self.by_ip.clear()
        self.by_mac.clear()
        self._expiry = []
        try:
            rows = self.db.execute("SELECT ip, mac, client_id, scope, state, expires, hostname FROM leases").fetchall()
        except sqlite3.OperationalError:
            rows = []  # read-only open of a store the service has not created yet
        for row in rows:
            self._index(Lease(*row))

    def _index(self, lease: Lease) -> None:
        old = self.by_ip.get(lease.ip)
        if old is not None and old is not lease:
            self._unindex_mac(old)
        if old is not lease:
            self.by_mac.setdefault(lease.mac, []).append(lease)
        self.by_ip[lease.ip] = lease
        if lease.state in HELD:
            heapq.heappush(self._expiry, (lease.expires, lease.ip))
            if len(self._expiry) > 4 * len(self.by_ip) + 1024:  # renewals leave stale entries: compact
                self._expiry = [(l.expires, l.ip) for l in self.by_ip.values() if l.state in HELD]
                heapq.heapify(self._expiry)

    def due(self, now: float) -> list[Lease]:
        """Held leases whose end is at or before `now` (each once), cheapest first: O(k log n) for k due."""
        out = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires, ip = heapq.heappop(heap)
            lease = self.by_ip.get(ip)
            if lease is not None and lease.state in HELD and lease.expires == expires:
                out.append(lease)
        return out

    def _unindex_mac(self, lease: Lease) -> None:
        lst = self.by_mac.get(lease.mac)
        if lst:
            try:
                lst.remove(lease)
            except ValueError:
                pass
            if not lst:
                del self.by_mac[lease.mac]

    def refresh(self, ip: int) -> Lease | None:
        """Re-read one address from the file (several processes share it); queued local writes win."""
        if ip in self._pending:
            return self.by_ip.get(ip)
        row = self.db.execute(
            "SELECT ip, mac, client_id, scope, state, expires, hostname FROM leases WHERE ip = ?", (ip,)
        ).fetchone()
        old = self.by_ip.get(ip)
        if row is None:
            if old is not None:
                del self.by_ip[ip]
                self._unindex_mac(old)
            return None
        if old is not None and (old.mac, old.state, old.expires, old.client_id, old.scope, old.hostname) == (
            row[1], row[4], row[5], row[2], row[3], row[6]
        ):
            return old
        lease = Lease(*row)
        self._index(lease)
        return lease

    # -- queries -------------------------------------------------------------------------------------------

    def get(self, ip: int) -> Lease | None:
        return self.by_ip.get(ip)

    def for_mac(self, mac: str, scope: str | None = None) -> list[Lease]:
        leases = self.by_mac.get(mac)
        if scope is None:
            return leases or []  # the index itself (no copy on the hot path): copy it before writing while walking it
        return [l for l in leases or () if l.scope == scope]

    def list(self, now: float | None = None, include_free: bool = False) -> list[dict]:
        """All leases as dicts (ip, mac, scope, state, expires, hostname, client_id), sorted by address.

        A reader sees what the writers committed; call `load()` (or reopen) to refresh.
        """
        now = time.time() if now is None else now
        if self.readonly:
            self.load()
        out = []
        for ip in sorted(self.by_ip):
            lease = self.by_ip[ip]
            if include_free or lease.held(now):
                out.append(lease.as_dict())
        return out

    # -- writes (queued until commit) ----------------------------------------------------------------------

    def put(self, lease: Lease, now: float) -> None:
        """Insert or replace the lease for `lease.ip`; durable at the next `commit()`."""
        self._check_writable()
        self._index(lease)
        self._pending[lease.ip] = (*lease.row(), now)

    def set_state(self, lease: Lease, state: str, expires: float, now: float) -> None:
        lease.state = state
        lease.expires = expires
        self.put(lease, now)

    def delete(self, ip: int) -> None:
        self._check_writable()
        lease = self.by_ip.pop(ip, None)
        if lease is not None:
            self._unindex_mac(lease)
        self._pending[ip] = None

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def commit(self) -> int:
        """Write every queued change in one transaction; returns how many rows changed."""
        if not self._pending:
            return 0
        upserts = [row for row in self._pending.values() if row is not None]
        deletes = [(ip,) for ip, row in self._pending.items() if row is None]
        self._pending = {}
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if upserts:
                db.executemany(_UPSERT, upserts)
            if deletes:
                db.executemany(_DELETE, deletes)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.commits += 1
        return len(upserts) + len(deletes)

    def checkpoint(self) -> None:
        """Copy the WAL into the database file without blocking the writer (PASSIVE); call off the hot path."""
        if self.readonly:
            return
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self.path, timeout=1.0, check_same_thread=False)
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def close(self) -> None:
        if not self.readonly and self._pending:
            self.commit()
        if not self.readonly and self._checkpointer is not None:
            self._checkpointer.close()
        self.db.close()

    def _check_writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"{self.path}: lease store opened read-only")


def release_offline(path: str | Path, mac: str, now: float | None = None) -> list[str]:
    """Free every held lease of `mac` in a store no service is running on; returns the addresses freed.

    With the service running, ask the service instead (`DhcpService.release(mac)`), which also emits the event
    and frees its in-memory copy.
    """
    now = time.time() if now is None else now
    store = LeaseStore(path)
    freed = []
    for lease in list(store.for_mac(mac)):
        if lease.state == BOUND:
            store.set_state(lease, RELEASED, now, now)
            freed.append(str(ipaddress.IPv4Address(lease.ip)))
    store.close()
    return freed
