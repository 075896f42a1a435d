"""The codec: parse and build, RFC 3396 long options, option overload, malformed input; a fuzz harness."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.dhcp import options as opt
from services.dhcp import packet as pk
from services.dhcp.core import DhcpCore, Interface
from services.dhcp.lease_table import MemoryLeaseTable
from services.dhcp.packet import ip_int
from shared.config.loader import config_from_dict

MAC = bytes.fromhex("525400123456")


def test_roundtrip_request():
    data = pk.build_request(pk.DISCOVER, MAC, xid=0xDEADBEEF, options={opt.USER_CLASS: b"iPXE"}, flags=pk.BROADCAST_FLAG, hops=2)
    msg = pk.parse(data)
    assert (msg.op, msg.msg_type, msg.xid, msg.mac, msg.hops) == (pk.BOOTREQUEST, pk.DISCOVER, 0xDEADBEEF, "52:54:00:12:34:56", 2)
    assert msg.broadcast and msg.options[opt.USER_CLASS] == b"iPXE"


def test_build_reply_copies_xid_chaddr_giaddr_and_pads():
    req = pk.parse(pk.build_request(pk.DISCOVER, MAC, xid=7, giaddr=ip_int("10.1.0.1")))
    out = pk.build(req, ip_int("10.1.0.5"), ip_int("10.1.0.2"), 0, 0, b"", b"boot.ipxe", b"\x35\x01\x02")
    assert len(out) >= pk.MIN_REPLY
    rep = pk.parse(out)
    assert rep.op == pk.BOOTREPLY and rep.xid == 7 and rep.hwaddr == MAC and rep.giaddr == ip_int("10.1.0.1")
    assert rep.file.rstrip(b"\0") == b"boot.ipxe" and rep.msg_type == pk.OFFER


def test_long_option_split_and_concatenated():
    long = bytes(range(256)) * 2
    data = pk.build_request(pk.DISCOVER, MAC, options={150: long})
    assert pk.parse(data).options[150] == long


def test_option_overload_reads_file_and_sname():
    head = bytearray(pk.build_request(pk.DISCOVER, MAC, options={opt.OVERLOAD: b"\x03"}))
    file_opts = bytes((67, 3)) + b"abc" + b"\xff"
    sname_opts = bytes((66, 2)) + b"ts" + b"\xff"
    head[108 : 108 + len(file_opts)] = file_opts  # file field at offset 108
    head[44 : 44 + len(sname_opts)] = sname_opts  # sname at offset 44
    msg = pk.parse(bytes(head))
    assert msg.options[67] == b"abc" and msg.options[66] == b"ts" and msg.file == b"" and msg.sname == b""


@pytest.mark.parametrize(
    "data,words",
    [
        (b"", "shorter than a DHCP header"),
        (bytes(240), "magic cookie"),
        (b"\x03" + bytes(235) + struct.pack("!I", pk.MAGIC), "op 3"),
        (b"\x01\x01\x11" + bytes(233) + struct.pack("!I", pk.MAGIC), "hlen 17"),
        (pk.build_request(pk.DISCOVER, MAC)[:-1] + b"\x0c", "truncated"),
        (pk.build_request(pk.DISCOVER, MAC)[:-1] + b"\x0c\x09abc", "claims 9 bytes"),
    ],
)
def test_malformed_packets_name_the_problem(data, words):
    with pytest.raises(pk.PacketError, match=words):
        pk.parse(data)


CFG = config_from_dict({"dhcp": {
    "interfaces": [{"name": "eth0"}],
    "scopes": [{"name": "lan", "subnet": "10.0.0.0/24", "interface": "eth0", "ranges": [{"start": "10.0.0.100", "end": "10.0.0.110"}]},
               {"name": "r", "subnet": "10.9.0.0/24", "ranges": [{"start": "10.9.0.10", "end": "10.9.0.20"}]}],
    "classes": [{"name": "x", "user_class": "iPXE"}],
}})


@pytest.fixture(scope="module")
def fuzz_server():
    return DhcpCore(CFG, MemoryLeaseTable())


def _valid():
    return st.builds(
        lambda t, opts, flags, gi, ci: pk.build_request(t, MAC, options=opts, flags=flags, giaddr=gi, ciaddr=ci),
        st.integers(0, 12),
        st.dictionaries(st.sampled_from([50, 54, 55, 60, 61, 77, 82, 93, 175, 52, 12, 57]), st.binary(max_size=20), max_size=6),
        st.sampled_from([0, pk.BROADCAST_FLAG]),
        st.sampled_from([0, ip_int("10.9.0.1"), ip_int("10.0.0.1")]),
        st.sampled_from([0, ip_int("10.0.0.100"), ip_int("10.0.0.105")]),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=600), _valid(),
                      st.tuples(_valid(), st.integers(0, 400), st.binary(min_size=1, max_size=8)).map(
                          lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]):])))
def test_fuzz_codec_and_core_raise_only_packet_errors(fuzz_server, data):
    try:
        msg = pk.parse(data)
    except pk.PacketError:
        return
    reply = fuzz_server.handle(msg, Interface("eth0", ip_int("10.0.0.1")), 1_800_000_000.0)
    fuzz_server.leases.commit()
    fuzz_server.take_events()
    if reply is not None:
        assert pk.parse(reply.data).op == pk.BOOTREPLY
