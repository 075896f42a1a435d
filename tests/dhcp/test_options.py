"""Option table, typed encoding, iPXE's option 175, option 77's two forms."""

import pytest

from services.dhcp import options as opt


def test_typed_encodings():
    assert opt.encode_option("routers", ["10.0.0.1", "10.0.0.2"]) == (3, bytes([10, 0, 0, 1, 10, 0, 0, 2]))
    assert opt.encode_option("domain-name-servers", "10.0.0.1,10.0.0.2")[1] == bytes([10, 0, 0, 1, 10, 0, 0, 2])
    assert opt.encode_option(51, 3600) == (51, b"\x00\x00\x0e\x10")
    assert opt.encode_option("netbios-node-type", 8) == (46, b"\x08")
    assert opt.encode_option("subnet-mask", "255.255.0.0") == (1, b"\xff\xff\x00\x00")
    assert opt.encode_option("time-offset", -3600) == (2, b"\xff\xff\xf1\xf0")
    assert opt.encode_option("vendor-encapsulated-options", "hex:01:04:de:ad:be:ef") == (43, bytes.fromhex("0104deadbeef"))
    assert opt.encode_option("200", {"type": "u16", "value": 513}) == (200, b"\x02\x01")
    assert opt.encode_option(224, "0x0a0b") == (224, b"\x0a\x0b")
    assert opt.encode_option("root-path", "hex:41") == (17, b"A")


def test_ipxe_encapsulated_option():
    code, data = opt.encode_option("ipxe-encap", {"keep-san": 1, "no-pxedhcp": 1, "username": "u", "password": "p"})
    assert code == 175
    assert opt.parse_suboptions(data) == {8: b"\x01", 176: b"\x01", 190: b"u", 191: b"p"}
    assert opt.encode_option(175, {"150": "hex:01"})[1] == b"\x96\x01\x01"


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("routers", "10.0.0.300", "not an IPv4 address"),
        ("dhcp-lease-time", -1, "out of range"),
        ("netbios-node-type", "x", "not an integer"),
        ("nonsense", 1, "unknown name"),
        (0, 1, "1-254"),
        (200, "abc", "not a known option"),
        (53, 1, "set by the server"),
        (175, {"bogus": 1}, "unknown iPXE sub-option"),
        (200, {"type": "float", "value": 1}, "unknown type"),
        ("vendor-encapsulated-options", "xyz", "not hex"),
    ],
)
def test_bad_values_name_the_option(key, value, words):
    with pytest.raises(opt.OptionError, match=words):
        opt.encode_option(key, value)


def test_user_class_both_forms():
    assert opt.user_classes(b"iPXE") == [b"iPXE"]
    assert opt.user_classes(b"\x04iPXE") == [b"iPXE"]
    assert opt.user_classes(b"\x04gPXE\x03foo") == [b"gPXE", b"foo"]
    assert opt.user_classes(b"\x05iPXE") == [b"\x05iPXE"]  # length past the end: plain
    assert opt.user_classes(b"\x00abc") == [b"\x00abc"]


def test_tlv_and_suboptions():
    assert opt.tlv(12, b"x" * 300) == bytes((12, 255)) + b"x" * 255 + bytes((12, 45)) + b"x" * 45
    assert opt.parse_suboptions(b"\x01\x02ab\x02\x09short") == {1: b"ab"}


def test_decode_for_display():
    assert opt.decode_option(3, bytes([10, 0, 0, 1])) == ["10.0.0.1"]
    assert opt.decode_option(51, b"\x00\x00\x0e\x10") == 3600
    assert opt.decode_option(175, b"\x08\x01\x01") == {"keep-san": b"\x01"}
