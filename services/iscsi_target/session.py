"""Sessions: identity (initiator, ISID, target), TSIH, the CmdSN window, and the session table.

A session is named by (InitiatorName, ISID, TargetName) (RFC 7143 §4.4.3). A new login with the same
name and TSIH 0 reinstates it: the old session's connection is closed and its tasks are dropped before
the new one starts (§6.3.5). With MaxConnections 1 and ErrorRecoveryLevel 0 a session has exactly one
connection, so its command numbering lives here and is touched only by that connection's thread; the
table itself is shared between connections and guarded by a lock.

CmdSN (§4.2.2): a non-immediate command is accepted when ExpCmdSN <= CmdSN <= MaxCmdSN in serial number
arithmetic (RFC 1982) and advances ExpCmdSN; one outside the window is silently dropped. Immediate
commands are accepted without advancing it. MaxCmdSN = ExpCmdSN + window - 1.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field

from shared.iscsi_latency import BUCKETS, LATENCY_BOUNDS_NS

MASK32 = 0xFFFFFFFF


def sn_lt(a: int, b: int) -> bool:
    """a < b in 32-bit serial number arithmetic."""
    return a != b and ((b - a) & MASK32) < 0x80000000


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


def _buckets() -> list[int]:
    return [0] * BUCKETS


def _opcodes() -> list[int]:
    return [0] * 256


@dataclass(slots=True)
class LunStats:
    """I/O counters of one LUN in one session, since the session started.

    reads/writes/others: commands; read_bytes/write_bytes: data moved; latency_ns: summed time from a
    command's last byte received to its response queued, over all commands; buckets: commands by that time
    (shared/iscsi_latency.py's bounds, the last one above them all); ops: commands by opcode (CDB byte 0).
    Both lists are made with the LUN's first command: `done` only adds to them (no allocation per command)."""

    reads: int = 0
    writes: int = 0
    others: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    latency_ns: int = 0
    buckets: list[int] = field(default_factory=_buckets)
    ops: list[int] = field(default_factory=_opcodes)

    def done(self, op: int, ns: int) -> None:
        """A command with opcode `op` answered `ns` after its last byte came in."""
        self.latency_ns += ns
        self.buckets[bisect_left(LATENCY_BOUNDS_NS, ns)] += 1  # le: a latency equal to a bound is in its bucket
        self.ops[op] += 1

    def snapshot(self) -> tuple:
        """The counters as (reads, writes, others, read_bytes, write_bytes, latency_ns, buckets, ops)."""
        return (self.reads, self.writes, self.others, self.read_bytes, self.write_bytes, self.latency_ns,
                tuple(self.buckets), tuple(self.ops))


@dataclass
class Session:
    initiator: str
    isid: int
    target: str  # "" for discovery
    session_type: str  # Normal | Discovery
    ip: str
    tsih: int = 0
    cid: int = 0  # its one connection's CID (MaxConnections 1)
    exp_cmdsn: int = 0
    window: int = 32
    handle: object = None  # the connection's owner: .abort(reason) closes it from another thread
    replaced: bool = False  # reinstated: its successor owns the nexus now
    first_read_seen: bool = False
    stats: dict[int, LunStats] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.initiator, self.isid, self.target)

    @property
    def max_cmdsn(self) -> int:
        return (self.exp_cmdsn + self.window - 1) & MASK32

    @property
    def initiator_port(self) -> str:
        return f"{self.initiator},i,0x{self.isid:012x}"

    def accept_cmdsn(self, cmdsn: int, immediate: bool) -> bool:
        """True if a command with this CmdSN is in the window; advances ExpCmdSN for non-immediate ones."""
        if immediate:
            return True
        if ((cmdsn - self.exp_cmdsn) & MASK32) >= self.window:  # outside [ExpCmdSN, MaxCmdSN]
            return False
        self.exp_cmdsn = (cmdsn + 1) & MASK32
        return True

    def lun_stats(self, lun: int) -> LunStats:
        stats = self.stats.get(lun)
        if stats is None:
            stats = self.stats[lun] = LunStats()
        return stats


class SessionTable:
    """All sessions of this process, by name and by TSIH."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_key: dict[tuple, Session] = {}
        self._by_tsih: dict[int, Session] = {}
        self._next_tsih = 1

    def find(self, initiator: str, isid: int, target: str) -> Session | None:
        with self._lock:
            return self._by_key.get((initiator, isid, target))

    def by_tsih(self, tsih: int) -> Session | None:
        with self._lock:
            return self._by_tsih.get(tsih)

    def register(self, session: Session, tsih: int = 0) -> Session | None:
        """Add a session (with `tsih` if given, else a fresh one); returns the session it reinstates."""
        with self._lock:
            old = self._by_key.get(session.key)
            if old is not None:
                old.replaced = True
                self._by_tsih.pop(old.tsih, None)
            if not tsih or tsih in self._by_tsih:
                tsih = self._allocate()
            session.tsih = tsih
            self._by_key[session.key] = session
            self._by_tsih[tsih] = session
            return old

    def _allocate(self) -> int:
        for _ in range(0x10000):
            tsih = self._next_tsih
            self._next_tsih = self._next_tsih % 0xFFFF + 1  # TSIH 0 is reserved (§11.12.6)
            if tsih not in self._by_tsih:
                return tsih
        raise RuntimeError("all 65535 session identifiers are in use")

    def remove(self, session: Session) -> None:
        with self._lock:
            if self._by_key.get(session.key) is session:
                del self._by_key[session.key]
            if self._by_tsih.get(session.tsih) is session:
                del self._by_tsih[session.tsih]

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._by_key.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)
