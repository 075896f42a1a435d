"""packets.py: requests decoded through tftpy, the lean codec, and a fuzz of the request parser."""

import struct

import pytest
from hypothesis import given, settings, strategies as st
from tftpy.TftpPacketTypes import TftpPacketOACK, TftpPacketRRQ

from services.tftp import packets as pk


def test_rrq_from_tftpy_encoder_with_options_names_lowered():
    rrq = TftpPacketRRQ()
    rrq.filename, rrq.mode, rrq.options = "undionly.kpxe", "octet", {"BlkSize": "1468", "TSIZE": "0"}
    request = pk.parse_request(rrq.encode().buffer)
    assert request == pk.Request(pk.RRQ, "undionly.kpxe", "octet", {"blksize": "1468", "tsize": "0"})


def test_empty_option_value_is_legal_and_first_repeat_counts():
    # RFC 2090 multicast is sent with an empty value; tftpy's own decoder refuses it
    request = pk.parse_request(b"\0\x01f\0octet\0multicast\0\0blksize\x00512\0BLKSIZE\x00999\0")
    assert request.options == {"multicast": "", "blksize": "512"}


def test_mode_is_case_insensitive_and_wrq_decodes():
    request = pk.parse_request(b"\0\x02up/x.bin\0NetASCII\0")
    assert (request.opcode, request.filename, request.mode, request.options) == (pk.WRQ, "up/x.bin", "netascii", {})


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "shorter than an opcode"),
        (b"\0", "shorter than an opcode"),
        (b"\0\x03\0\x01data", "not a request"),
        (b"\0\x09file\0octet\0", "opcode 9"),
        (b"\0\x01file\0octet", "does not end with a NUL"),
        (b"\0\x01\0octet\0", "empty file name"),
        (b"\0\x01file\0binary\0", "mode 'binary'"),
        (b"\0\x01file\0octet\0blksize\0", "option b'blksize' has no value"),
        (b"\0\x01file\0", "no mode"),
        (b"\0\x01file\0octet\0\0x\0", "empty name"),
        (b"\0\x01" + b"a" * 600 + b"\0octet\0", "longer than 512"),
        (b"\0\x01fil\xffe\0octet\0", "non-ASCII byte at 3"),
    ],
)
def test_malformed_requests_name_the_problem(data, words):
    with pytest.raises(pk.MalformedPacket, match=words):
        pk.parse_request(data)


def test_oack_matches_tftpy_decoder():
    packet = TftpPacketOACK()
    packet.buffer = pk.build_oack({"blksize": 1468, "tsize": 123, "windowsize": 16})
    assert packet.decode().options == {"blksize": "1468", "tsize": "123", "windowsize": "16"}
    assert pk.parse_oack(packet.buffer) == {"blksize": "1468", "tsize": "123", "windowsize": "16"}


def test_error_ack_and_data_header():
    assert pk.build_error(1, "nope") == b"\0\x05\0\x01nope\0"
    assert pk.parse_error(pk.build_error(5, "unknown transfer ID")) == (5, "unknown transfer ID")
    assert pk.build_ack(65536 + 7) == b"\0\x04\0\x07"  # block numbers wrap on the wire
    assert pk.data_header(65535) == b"\0\x03\xff\xff"


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_parser_raises_only_malformed(data):
    try:
        request = pk.parse_request(data)
    except pk.MalformedPacket:
        return
    assert request.opcode in (pk.RRQ, pk.WRQ) and request.filename and request.mode in pk.MODES


_text = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([pk.RRQ, pk.WRQ]), _text, st.sampled_from(["octet", "OCTET", "netascii"]),
       st.dictionaries(_text, _text, max_size=5))
def test_fuzz_valid_requests_round_trip(opcode, filename, mode, options):
    data = pk.build_request(opcode, filename, mode, options)
    if len(data) > pk.MAX_REQUEST:
        return
    request = pk.parse_request(data)
    assert (request.opcode, request.filename, request.mode) == (opcode, filename, mode.lower())
    expected = {}
    for name, value in options.items():
        expected.setdefault(name.lower(), value)
    assert set(request.options) == set(expected)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=2, max_size=40))
def test_fuzz_mutated_request_headers(tail):
    # valid opcode followed by arbitrary bytes: only MalformedPacket may escape
    for opcode in (pk.RRQ, pk.WRQ):
        try:
            pk.parse_request(struct.pack("!H", opcode) + tail)
        except pk.MalformedPacket:
            pass
