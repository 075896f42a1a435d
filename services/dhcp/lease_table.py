"""What the decision core knows about leases: the `Lease` record, its states, and the `LeaseTable` it reads and writes.

The core (core.py) never opens a file: it is handed a `LeaseTable`. In the service that is the SQLite
`LeaseStore` (lease_store.py), whose writes are queued until the I/O loop commits them before the replies of a
turn leave; the core's unit tests use `MemoryLeaseTable` below. States: `bound` (held until `expires`),
`declined` (quarantined until `expires`), `released` and `expired` (free; kept so a returning client gets its
old address back).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Protocol

BOUND, DECLINED, RELEASED, EXPIRED = "bound", "declined", "released", "expired"
HELD = (BOUND, DECLINED)


class Lease:
    __slots__ = ("ip", "mac", "client_id", "scope", "state", "expires", "hostname")

    def __init__(self, ip: int, mac: str, client_id: bytes | None, scope: str, state: str, expires: float, hostname: str | None):
        self.ip = ip
        self.mac = mac
        self.client_id = client_id
        self.scope = scope
        self.state = state
        self.expires = expires
        self.hostname = hostname

    def held(self, now: float) -> bool:
        return self.state in HELD and self.expires > now

    def row(self) -> tuple:
        return (self.ip, self.mac, self.client_id, self.scope, self.state, self.expires, self.hostname)

    def as_dict(self) -> dict:
        return {
            "ip": str(ipaddress.IPv4Address(self.ip)),
            "mac": self.mac,
            "scope": self.scope,
            "state": self.state,
            "expires": self.expires,
            "hostname": self.hostname,
            "client_id": self.client_id.hex(":") if self.client_id else None,
        }

    def __repr__(self) -> str:
        return f"<Lease {ipaddress.IPv4Address(self.ip)} {self.mac} {self.state} until {self.expires:.0f}>"


class LeaseTable(Protocol):
    """The operations the core needs. Writes take effect in the table at once and become durable when the
    owner commits (never the core's business)."""

    def get(self, ip: int) -> Lease | None:
        """The lease of `ip` as this process knows it."""

    def refresh(self, ip: int) -> Lease | None:
        """The lease of `ip` re-read from what every process committed (several share one table);
        this process's uncommitted writes win."""

    def for_mac(self, mac: str) -> Iterable[Lease]:
        """The leases of one client, all scopes and states. May be the table's own index: a caller that writes
        leases while walking it walks a copy."""

    def put(self, lease: Lease, now: float) -> None:
        """Insert or replace the lease of `lease.ip`."""

    def set_state(self, lease: Lease, state: str, expires: float, now: float) -> None:
        """Change a lease's state and end."""

    def delete(self, ip: int) -> None:
        """Forget `ip`."""

    def due(self, now: float) -> list[Lease]:
        """Held leases whose end is at or before `now`; the core changes or deletes each one it gets."""


class MemoryLeaseTable:
    """A `LeaseTable` in memory. `committed` plays the shared file: tables built on the same dict see each
    other's writes after `commit()` (as DHCP processes sharing one lease file do), and a new table on it is a
    restart that lost whatever was not committed."""

    def __init__(self, committed: dict[int, tuple] | None = None):
        self.committed = {} if committed is None else committed
        self.by_ip: dict[int, Lease] = {ip: Lease(*row) for ip, row in self.committed.items()}
        self._pending: dict[int, tuple | None] = {}

    def get(self, ip: int) -> Lease | None:
        return self.by_ip.get(ip)

    def refresh(self, ip: int) -> Lease | None:
        if ip not in self._pending:
            row = self.committed.get(ip)
            if row is None:
                self.by_ip.pop(ip, None)
            else:
                self.by_ip[ip] = Lease(*row)
        return self.by_ip.get(ip)

    def for_mac(self, mac: str) -> list[Lease]:
        return [lease for lease in self.by_ip.values() if lease.mac == mac]

    def put(self, lease: Lease, now: float) -> None:
        self.by_ip[lease.ip] = lease
        self._pending[lease.ip] = lease.row()

    def set_state(self, lease: Lease, state: str, expires: float, now: float) -> None:
        lease.state = state
        lease.expires = expires
        self.put(lease, now)

    def delete(self, ip: int) -> None:
        self.by_ip.pop(ip, None)
        self._pending[ip] = None

    def due(self, now: float) -> list[Lease]:
        return [lease for lease in self.by_ip.values() if lease.state in HELD and lease.expires <= now]

    def commit(self) -> int:
        for ip, row in self._pending.items():
            if row is None:
                self.committed.pop(ip, None)
            else:
                self.committed[ip] = row
        count, self._pending = len(self._pending), {}
        return count
