from services.dhcp.ra import build_ra, is_router_solicitation, parse_ra


def test_ra_only_ends_the_wait():
    ra = parse_ra(build_ra(bytes.fromhex("525400000001")))
    assert ra["router_lifetime"] == 0 and not ra["managed"] and not ra["other"]
    assert ra["options"] == [(1, bytes.fromhex("525400000001"))]  # source link-layer address, no prefix


def test_router_solicitation_detection():
    assert is_router_solicitation(bytes((133, 0, 0, 0, 0, 0, 0, 0)))
    assert not is_router_solicitation(bytes((134, 0, 0, 0, 0, 0, 0, 0)))
    assert not is_router_solicitation(b"\x85")
