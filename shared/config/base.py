"""Building blocks shared by every section of the Bootfleet configuration.

Every model forbids unknown keys, so a typo in the YAML file is an error that names the field
instead of a setting silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _ipv4(value: object) -> str:
    if isinstance(value, ipaddress.IPv4Address):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IPv4 address")
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise ValueError(f"{value} is not an IPv4 address") from None


def _ipv4_network(value: object) -> str:
    if not isinstance(value, (str, ipaddress.IPv4Network)):
        raise ValueError(f"{value!r} is not an IPv4 network (a.b.c.d/len)")
    try:
        return str(ipaddress.IPv4Network(str(value).strip(), strict=True))
    except ValueError as exc:
        raise ValueError(f"{value} is not an IPv4 network (a.b.c.d/len): {exc}") from None


_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")


def normalize_mac(value: object) -> str:
    """`AA-BB-CC-DD-EE-FF`, `aabb.ccdd.eeff`-free forms -> `aa:bb:cc:dd:ee:ff`."""
    if isinstance(value, (bytes, bytearray)) and len(value) == 6:
        return ":".join(f"{b:02x}" for b in value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a MAC address")
    text = value.strip().lower()
    if not _MAC_RE.match(text):
        raise ValueError(f"{value} is not a MAC address (expected aa:bb:cc:dd:ee:ff)")
    digits = re.sub(r"[:-]", "", text)
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


# RFC 3720 section 3.2.6: iqn.yyyy-mm.reversed.domain[:anything], eui.<16 hex>, naa.<16 or 32 hex>.
_IQN_RE = re.compile(r"^iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[^\s]*)?$")
_EUI_RE = re.compile(r"^eui\.[0-9A-F]{16}$")
_NAA_RE = re.compile(r"^naa\.([0-9A-F]{16}|[0-9A-F]{32})$")


def validate_iscsi_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an iSCSI name")
    name = value.strip()
    if len(name.encode()) > 223:
        raise ValueError(f"{name} is longer than 223 bytes (RFC 3720 3.2.6.1)")
    lowered = name.lower()
    if lowered.startswith("iqn."):
        if not _IQN_RE.match(lowered):
            raise ValueError(
                f"{name} is not a valid IQN (expected iqn.YYYY-MM.reversed.domain[:identifier], RFC 3720 3.2.6.3.1)"
            )
        return lowered  # iSCSI names are case-insensitive; the canonical form is lower case
    if lowered.startswith("eui."):
        if not _EUI_RE.match(name.upper().replace("EUI.", "eui.", 1)):
            raise ValueError(f"{name} is not a valid EUI-64 name (eui. followed by 16 hex digits)")
        return "eui." + name[4:].upper()
    if lowered.startswith("naa."):
        if not _NAA_RE.match("naa." + name[4:].upper()):
            raise ValueError(f"{name} is not a valid NAA name (naa. followed by 16 or 32 hex digits)")
        return "naa." + name[4:].upper()
    raise ValueError(f"{name} is not an iSCSI name (must start with iqn., eui. or naa.)")


IPv4 = Annotated[str, BeforeValidator(_ipv4)]
IPv4Network = Annotated[str, BeforeValidator(_ipv4_network)]
Mac = Annotated[str, BeforeValidator(normalize_mac)]
IscsiName = Annotated[str, AfterValidator(validate_iscsi_name)]
