"""Leases as the controller knows them: `lease/<ip>` keys it replicates, and the DHCP lease store it reads.

TFTP learns which PC is at which address from the `lease/<ip>` keys (scripts are rendered per MAC); they are
kept from the DHCP lease events. `lease-list` reads the DHCP service's SQLite store read-only (the service
writes it meanwhile), or, before there is one, answers from the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from shared import events as ev
from shared.bus import message as m

LEASE_EVENTS = {ev.LEASE_GRANTED, ev.LEASE_RENEWED}
LEASE_GONE = {ev.LEASE_RELEASED, ev.LEASE_EXPIRED, ev.LEASE_DECLINED}


class Store(Protocol):
    store: dict[str, tuple[int, Any]]

    def get(self, key: str) -> Any: ...

    def set(self, key: str, val: Any) -> int: ...


class Leases:
    def __init__(self, store: Store, lease_file: Callable[[], Path]):
        self.store = store
        self.lease_file = lease_file  # the DHCP lease store of the running configuration

    def seed(self, mac_by_ip: dict[str, str]) -> None:
        """At start-up: the addresses the replayed events told of."""
        for ip, mac in mac_by_ip.items():
            self.store.set(m.lease_key(ip), {"mac": mac})

    def observe(self, type: str, fields: dict[str, Any]) -> None:
        ip, mac = fields.get("ip"), fields.get("mac")
        if type in LEASE_EVENTS and ip and mac:
            key = m.lease_key(ip)
            if (self.store.get(key) or {}).get("mac") != mac:
                self.store.set(key, {"mac": mac, "expires": fields.get("expires")})
        elif type in LEASE_GONE and ip:
            if self.store.get(m.lease_key(ip)) is not None:
                self.store.set(m.lease_key(ip), None)

    def list(self, include_free: bool = False) -> tuple[list[dict[str, Any]], str]:
        """(leases, where they came from: the lease store's path, or "events")."""
        path = self.lease_file()
        if path.exists():
            from services.dhcp.lease_store import LeaseStore  # only when there is a store to read

            store = LeaseStore.open_readonly(path)
            try:
                return store.list(include_free=include_free), str(path)
            finally:
                store.close()
        leases = [
            {"ip": key[len(m.LEASE_PREFIX) :], "state": "bound", **val}
            for key, (seq, val) in sorted(self.store.store.items())
            if key.startswith(m.LEASE_PREFIX)
        ]
        return leases, "events"
