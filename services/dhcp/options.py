"""DHCPv4 options: the table of known options, typed encode/decode, iPXE's encapsulated option 175.

Sans-IO. A configured option value is turned into its wire payload once (at configuration time) by
`encode_option`; the hot path only concatenates cached bytes. Unknown option numbers take a typed value
(`{type: ip|ips|u8|u16|u32|i32|string|bool|hex, value: ...}`) or a hex string (`hex:0a:0b`, `0x0a0b`).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

# RFC 2132 / 3004 / 3046 / 4578 / iPXE numbers used by the server itself.
PAD = 0
SUBNET_MASK = 1
ROUTERS = 3
HOSTNAME = 12
ROOT_PATH = 17
REQUESTED_ADDRESS = 50
LEASE_TIME = 51
OVERLOAD = 52
MESSAGE_TYPE = 53
SERVER_ID = 54
PARAMETER_REQUEST_LIST = 55
MESSAGE = 56
MAX_MESSAGE_SIZE = 57
RENEWAL_TIME = 58
REBINDING_TIME = 59
VENDOR_CLASS = 60
CLIENT_ID = 61
TFTP_SERVER_NAME = 66
BOOTFILE_NAME = 67
USER_CLASS = 77
RELAY_AGENT_INFO = 82
CLIENT_ARCH = 93
IPXE_ENCAP = 175
END = 255

# option number -> (name, type). Types: ip, ips, u8, u16, u32, i32, string, bool, hex, u8s, encap175.
OPTION_TABLE: dict[int, tuple[str, str]] = {
    1: ("subnet-mask", "ip"),
    2: ("time-offset", "i32"),
    3: ("routers", "ips"),
    4: ("time-servers", "ips"),
    5: ("name-servers", "ips"),
    6: ("domain-name-servers", "ips"),
    7: ("log-servers", "ips"),
    12: ("host-name", "string"),
    13: ("boot-size", "u16"),
    15: ("domain-name", "string"),
    17: ("root-path", "string"),
    19: ("ip-forwarding", "bool"),
    23: ("default-ip-ttl", "u8"),
    26: ("interface-mtu", "u16"),
    28: ("broadcast-address", "ip"),
    40: ("nis-domain", "string"),
    41: ("nis-servers", "ips"),
    42: ("ntp-servers", "ips"),
    43: ("vendor-encapsulated-options", "hex"),
    44: ("netbios-name-servers", "ips"),
    45: ("netbios-dd-server", "ips"),
    46: ("netbios-node-type", "u8"),
    47: ("netbios-scope", "string"),
    51: ("dhcp-lease-time", "u32"),
    54: ("dhcp-server-identifier", "ip"),
    58: ("dhcp-renewal-time", "u32"),
    59: ("dhcp-rebinding-time", "u32"),
    60: ("vendor-class-identifier", "string"),
    66: ("tftp-server-name", "string"),
    67: ("boot-file-name", "string"),
    69: ("smtp-server", "ips"),
    119: ("domain-search", "hex"),
    121: ("classless-static-route", "hex"),
    150: ("tftp-server-address", "ips"),
    175: ("ipxe-encap", "encap175"),
    201: ("iscsi-primary-target-iqn", "string"),
    202: ("iscsi-secondary-target-iqn", "string"),
    203: ("iscsi-initiator-iqn", "string"),
}
OPTION_BY_NAME: dict[str, int] = {name: code for code, (name, _) in OPTION_TABLE.items()}

# Options the server computes per reply; a configured value would contradict the protocol.
SERVER_OWNED = {PAD, OVERLOAD, MESSAGE_TYPE, PARAMETER_REQUEST_LIST, MAX_MESSAGE_SIZE, CLIENT_ID, RELAY_AGENT_INFO, END}

# iPXE's encapsulated options (src/include/ipxe/dhcp.h: DHCP_EB_*), sub-option -> (name, type).
IPXE_SUBOPTIONS: dict[int, tuple[str, str]] = {
    1: ("priority", "i8"),
    8: ("keep-san", "u8"),
    9: ("skip-san-boot", "u8"),
    176: ("no-pxedhcp", "u8"),
    190: ("username", "string"),
    191: ("password", "string"),
    192: ("reverse-username", "string"),
    193: ("reverse-password", "string"),
}
IPXE_SUB_BY_NAME = {name: code for code, (name, _) in IPXE_SUBOPTIONS.items()}
IPXE_NO_PXEDHCP = 176
IPXE_KEEP_SAN = 8

TYPES = ("ip", "ips", "u8", "i8", "u16", "u32", "i32", "string", "bool", "hex", "u8s")


class OptionError(ValueError):
    """A configured option value cannot be encoded; the message names the option."""


def option_code(key: Any) -> int:
    """`routers`, `3`, 3 -> 3."""
    if isinstance(key, int) and not isinstance(key, bool):
        code = key
    elif isinstance(key, str) and key.strip().isdigit():
        code = int(key.strip())
    elif isinstance(key, str) and key.strip().lower() in OPTION_BY_NAME:
        return OPTION_BY_NAME[key.strip().lower()]
    else:
        raise OptionError(f"option {key!r}: unknown name (use a number 1-254 or one of {', '.join(sorted(OPTION_BY_NAME))})")
    if not 1 <= code <= 254:
        raise OptionError(f"option {code}: the number must be 1-254")
    return code


def option_name(code: int) -> str:
    return OPTION_TABLE.get(code, (f"option-{code}", "hex"))[0]


def _hex(text: str, where: str) -> bytes:
    t = text.strip().lower()
    if t.startswith("hex:"):
        t = t[4:]
    elif t.startswith("0x"):
        t = t[2:]
    t = t.replace(":", "").replace(" ", "")
    try:
        return bytes.fromhex(t)
    except ValueError:
        raise OptionError(f"{where}: {text!r} is not hex (e.g. hex:0a:0b or 0x0a0b)") from None


def _ip(value: Any, where: str) -> bytes:
    try:
        return ipaddress.IPv4Address(str(value).strip()).packed
    except ValueError:
        raise OptionError(f"{where}: {value!r} is not an IPv4 address") from None


def _int(value: Any, fmt: str, lo: int, hi: int, where: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 0)
        except ValueError:
            raise OptionError(f"{where}: {value!r} is not an integer") from None
    if not lo <= value <= hi:
        raise OptionError(f"{where}: {value} is out of range {lo}..{hi}")
    return struct.pack(fmt, value)


def encode_typed(kind: str, value: Any, where: str) -> bytes:
    """One value of a given type -> payload bytes."""
    if isinstance(value, str) and value.strip().lower().startswith("hex:"):
        return _hex(value, where)  # hex overrides any type
    if kind == "ip":
        return _ip(value, where)
    if kind == "ips":
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        if not items:
            raise OptionError(f"{where}: needs at least one address")
        return b"".join(_ip(v, where) for v in items)
    if kind == "u8":
        return _int(value, "!B", 0, 0xFF, where)
    if kind == "i8":
        return _int(value, "!b", -128, 127, where)
    if kind == "u16":
        return _int(value, "!H", 0, 0xFFFF, where)
    if kind == "u32":
        return _int(value, "!I", 0, 0xFFFFFFFF, where)
    if kind == "i32":
        return _int(value, "!i", -(2**31), 2**31 - 1, where)
    if kind == "bool":
        if isinstance(value, bool):
            return b"\x01" if value else b"\x00"
        return _int(value, "!B", 0, 1, where)
    if kind == "u8s":
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return b"".join(_int(v, "!B", 0, 255, where) for v in items)
    if kind == "string":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise OptionError(f"{where}: {value!r} is not a string")
        data = str(value).encode()
        if not data:
            raise OptionError(f"{where}: empty string")
        return data
    if kind == "hex":
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        return _hex(str(value), where)
    raise OptionError(f"{where}: unknown type {kind!r} (one of {', '.join(TYPES)})")


def encode_ipxe_encap(value: Any, where: str = "option 175") -> bytes:
    """`{keep-san: 1, no-pxedhcp: 1, username: u, password: p, 150: hex:..}` -> sub-option TLVs."""
    if isinstance(value, str):
        return _hex(value, where)
    if not isinstance(value, dict):
        raise OptionError(f"{where}: expected a mapping of sub-options (keep-san, no-pxedhcp, username, password, ...)")
    out = bytearray()
    for key, sub_value in value.items():
        sub_where = f"{where}.{key}"
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            sub = int(key)
            kind = IPXE_SUBOPTIONS.get(sub, ("", "hex"))[1]
        elif isinstance(key, str) and key.lower() in IPXE_SUB_BY_NAME:
            sub = IPXE_SUB_BY_NAME[key.lower()]
            kind = IPXE_SUBOPTIONS[sub][1]
        else:
            raise OptionError(f"{sub_where}: unknown iPXE sub-option (one of {', '.join(IPXE_SUB_BY_NAME)} or a number)")
        if not 1 <= sub <= 254:
            raise OptionError(f"{sub_where}: sub-option number must be 1-254")
        if isinstance(sub_value, dict):
            kind, sub_value = sub_value.get("type", kind), sub_value.get("value")
        data = encode_typed(kind, sub_value, sub_where)
        if len(data) > 255:
            raise OptionError(f"{sub_where}: {len(data)} bytes, a sub-option holds at most 255")
        out += bytes((sub, len(data))) + data
    return bytes(out)


def encode_option(key: Any, value: Any) -> tuple[int, bytes]:
    """A configured (key, value) -> (code, payload). Raises OptionError naming the option."""
    code = option_code(key)
    where = f"option {option_name(code)} ({code})"
    if code in SERVER_OWNED:
        raise OptionError(f"{where}: set by the server for each reply; it cannot be configured")
    kind = OPTION_TABLE.get(code, (None, None))[1]
    if isinstance(value, dict) and "type" in value:
        kind = value["type"]
        value = value.get("value")
        if kind not in TYPES:
            raise OptionError(f"{where}: unknown type {kind!r} (one of {', '.join(TYPES)})")
    elif kind == "encap175":
        return code, encode_ipxe_encap(value, where)
    elif kind is None:
        if not (isinstance(value, str) and value.strip().lower().startswith(("hex:", "0x"))):
            raise OptionError(
                f"{where}: not a known option; give its type ({{type: ip|ips|u8|u16|u32|i32|string|bool|hex, value: ...}}) "
                "or a hex value (hex:0a:0b)"
            )
        kind = "hex"
    if value is None:
        raise OptionError(f"{where}: no value")
    data = encode_typed(kind, value, where)
    if not data and kind != "hex":
        raise OptionError(f"{where}: empty value")
    return code, data


def tlv(code: int, data: bytes) -> bytes:
    """One option on the wire; payloads over 255 bytes are split into several (RFC 3396)."""
    if len(data) <= 255:
        return bytes((code, len(data))) + data
    return b"".join(bytes((code, len(data[i : i + 255]))) + data[i : i + 255] for i in range(0, len(data), 255))


def parse_suboptions(data: bytes) -> dict[int, bytes]:
    """Sub-option TLVs (options 82, 175, 43); malformed tails are ignored."""
    out: dict[int, bytes] = {}
    i, n = 0, len(data)
    while i + 1 < n:
        code, length = data[i], data[i + 1]
        if i + 2 + length > n:
            break
        out[code] = out.get(code, b"") + data[i + 2 : i + 2 + length]
        i += 2 + length
    return out


def join_suboptions(subs: dict[int, bytes]) -> bytes:
    """Sub-option TLVs from a code -> bytes map (the inverse of `parse_suboptions`)."""
    return b"".join(bytes((k, len(v))) + v for k, v in subs.items())


def user_classes(data: bytes) -> list[bytes]:
    """Option 77 in both encodings: RFC 3004 (length-prefixed entries) or a plain string.

    RFC 3004 form: each entry is one length byte followed by that many bytes, and the entries must exactly
    fill the option. iPXE sends the plain string `iPXE`; a naive prefix match on the RFC 3004 form
    (`\\x04iPXE`) misses it and sends iPXE the loader again: a chainload loop.
    """
    entries = []
    i, n = 0, len(data)
    while i < n:
        length = data[i]
        if length == 0 or i + 1 + length > n:
            return [data]  # not RFC 3004: the whole option is one plain string
        entries.append(data[i + 1 : i + 1 + length])
        i += 1 + length
    return entries or [data]


def decode_typed(kind: str, data: bytes) -> Any:
    """Payload -> a readable value (logs, tests, `bootfleet` displays)."""
    if kind == "ip" and len(data) == 4:
        return str(ipaddress.IPv4Address(data))
    if kind == "ips" and data and len(data) % 4 == 0:
        return [str(ipaddress.IPv4Address(data[i : i + 4])) for i in range(0, len(data), 4)]
    if kind in ("u8", "bool") and len(data) == 1:
        return data[0]
    if kind == "u16" and len(data) == 2:
        return struct.unpack("!H", data)[0]
    if kind == "u32" and len(data) == 4:
        return struct.unpack("!I", data)[0]
    if kind == "i32" and len(data) == 4:
        return struct.unpack("!i", data)[0]
    if kind == "string":
        return data.decode("utf-8", "replace")
    if kind == "encap175":
        return {IPXE_SUBOPTIONS.get(k, (str(k),))[0]: v for k, v in parse_suboptions(data).items()}
    return data.hex(":")


def decode_option(code: int, data: bytes) -> Any:
    return decode_typed(OPTION_TABLE.get(code, ("", "hex"))[1], data)
