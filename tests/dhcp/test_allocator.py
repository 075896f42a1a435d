"""Pool walking, per-process slices, the RFC 3074 hash."""

from services.dhcp.allocator import Pool, loadb_hash, serves


def test_pool_walks_and_reports_full():
    pool = Pool([(100, 102), (200, 200)], excluded={101})
    taken = set()
    got = [pool.allocate(lambda ip: ip not in taken) for _ in range(3)]
    taken.update(got)
    assert sorted(got) == [100, 102, 200]
    assert pool.allocate(lambda ip: ip not in taken) is None
    assert 101 not in pool and 200 in pool and 150 not in pool


def test_slices_are_disjoint_and_cover_the_pool():
    ranges = [(10, 29), (50, 54)]
    slices = [Pool(ranges, set(), i, 3) for i in range(3)]
    seen = []
    for p in slices:
        mine = []
        while (ip := p.allocate(lambda ip: ip not in mine)) is not None:
            mine.append(ip)
        assert all(p.mine(ip) for ip in mine)
        seen += mine
    assert sorted(seen) == list(range(10, 30)) + list(range(50, 55))


def test_loadb_hash_is_a_pearson_hash_and_splits_clients():
    assert loadb_hash(b"") == 0
    assert loadb_hash(b"\x00") == 175  # start at the length (1), then table[1 ^ 0]
    assert loadb_hash(b"\x01\x00") == 155  # 2 -> table[2 ^ 0] = 119 -> table[119 ^ 1 = 118] = 155
    counts = [0, 0]
    for n in range(1000):
        counts[loadb_hash(bytes((0x52, 0x54, 0, 0, n >> 8, n & 0xFF))) % 2] += 1
    assert 400 < counts[0] < 600
    key = bytes.fromhex("525400000001")
    assert serves(key, 0, 2) != serves(key, 1, 2)
    assert serves(key, 0, 1)
