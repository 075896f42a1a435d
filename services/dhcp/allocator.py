"""Free-address search in a scope's pools, and the RFC 3074 load-balancing hash.

An iterative allocator (as Kea's): a cursor walks the pool and hands out the next address the caller says is
free, so a new lease costs O(1) on average and a full pool costs one walk. With several DHCP processes each
one walks only the addresses whose index modulo `instances` equals its `instance`, so two processes sharing
the lease store can never offer the same free address.
"""

from __future__ import annotations

from typing import Callable

# RFC 3074 section 6: the mixing table of the load-balancing hash (a Pearson hash).
_MIX = bytes((
    251, 175, 119, 215, 81, 14, 79, 191, 103, 49, 181, 143, 186, 157, 0,
    232, 31, 32, 55, 60, 152, 58, 17, 237, 174, 70, 160, 144, 220, 90, 57,
    223, 59, 3, 18, 140, 111, 166, 203, 196, 134, 243, 124, 95, 222, 179,
    197, 65, 180, 48, 36, 15, 107, 46, 233, 130, 165, 30, 123, 161, 209, 23,
    97, 16, 40, 91, 219, 61, 100, 10, 210, 109, 250, 127, 22, 138, 29, 108,
    244, 67, 207, 9, 178, 204, 74, 98, 126, 249, 167, 116, 34, 77, 193,
    200, 121, 5, 20, 113, 71, 35, 128, 13, 182, 94, 25, 226, 227, 199, 75,
    27, 41, 245, 230, 224, 43, 225, 177, 26, 155, 150, 212, 142, 218, 115,
    241, 73, 88, 105, 39, 114, 62, 255, 192, 201, 145, 214, 168, 158, 221,
    148, 154, 122, 12, 84, 82, 163, 44, 139, 228, 236, 205, 242, 217, 11,
    187, 146, 159, 64, 86, 239, 195, 42, 106, 198, 118, 112, 184, 172, 87,
    2, 173, 117, 176, 229, 247, 253, 137, 185, 99, 164, 102, 147, 45, 66,
    231, 52, 141, 211, 194, 206, 246, 238, 56, 110, 78, 248, 63, 240, 189,
    93, 92, 51, 53, 183, 19, 171, 72, 50, 33, 104, 101, 69, 8, 252, 83, 120,
    76, 135, 85, 54, 202, 125, 188, 213, 96, 235, 136, 208, 162, 129, 190,
    132, 156, 38, 47, 1, 7, 254, 24, 4, 216, 131, 89, 21, 28, 133, 37, 153,
    149, 80, 170, 68, 6, 169, 234, 151,
))
assert len(_MIX) == 256 and len(set(_MIX)) == 256


def loadb_hash(key: bytes) -> int:
    """RFC 3074 hash of the client identifier (or, without one, the hardware address)."""
    h = len(key) & 0xFF
    for b in reversed(key):
        h = _MIX[h ^ b]
    return h


def serves(key: bytes, instance: int, instances: int) -> bool:
    return instances <= 1 or loadb_hash(key) % instances == instance


class Pool:
    """The dynamic addresses of one scope (several ranges), minus reserved ones, for one process's slice."""

    def __init__(self, ranges: list[tuple[int, int]], excluded: set[int], instance: int = 0, instances: int = 1):
        self.ranges = sorted(ranges)
        self.excluded = excluded
        self.instance = instance
        self.instances = max(1, instances)
        self.sizes = [end - start + 1 for start, end in self.ranges]
        self.total = sum(self.sizes)
        self.cursor = 0  # index into the concatenated ranges

    def __contains__(self, ip: int) -> bool:
        for start, end in self.ranges:
            if start <= ip <= end:
                return ip not in self.excluded
        return False

    def mine(self, ip: int) -> bool:
        """In this process's slice (always true with one process)."""
        if self.instances == 1:
            return ip in self
        idx = self._index(ip)
        return idx is not None and idx % self.instances == self.instance and ip not in self.excluded

    def _index(self, ip: int) -> int | None:
        base = 0
        for (start, end), size in zip(self.ranges, self.sizes):
            if start <= ip <= end:
                return base + ip - start
            base += size
        return None

    def _address(self, idx: int) -> int:
        for (start, _end), size in zip(self.ranges, self.sizes):
            if idx < size:
                return start + idx
            idx -= size
        raise IndexError(idx)

    def allocate(self, is_free: Callable[[int], bool]) -> int | None:
        """The next free address of this slice after the cursor, or None when the slice is full."""
        total, step = self.total, self.instances
        if total == 0:
            return None
        idx = self.cursor
        # align to this process's slice
        if step > 1 and idx % step != self.instance:
            idx = idx - idx % step + self.instance
            if idx >= total:
                idx = self.instance
        tried = 0
        limit = (total + step - 1) // step
        single = len(self.ranges) == 1
        first = self.ranges[0][0] if single else 0
        while tried < limit:
            if idx >= total:
                idx = self.instance
                if idx >= total:
                    return None
            ip = first + idx if single else self._address(idx)
            idx += step
            tried += 1
            if ip not in self.excluded and is_free(ip):
                self.cursor = idx
                return ip
        return None
