"""iSCSI names as a login carries them: RFC 3722's stringprep profile, then RFC 3720 §3.2.6's formats.

`canonical(raw)` takes the bytes of an InitiatorName or TargetName value and returns the name in the form
the configuration keys it (shared/config/base.validate_iscsi_name: iqn. lower case, eui./naa. hex upper
case), or raises NameError_ with why. Steps (RFC 3722 §3-§7, tables of RFC 3454):
  - UTF-8, strictly (an invalid byte sequence is refused, never replaced);
  - map: B.1 (commonly mapped to nothing) removed, B.2 case folding (so upper case is accepted and folded);
  - normalize: Unicode NFKC;
  - prohibit: C.1.1-C.9 (spaces, controls, private use, non-characters, surrogates, ...), unassigned code
    points (A.1), and every ASCII character but a-z, 0-9, '-', '.', ':' (RFC 3722 §6.1), and U+3002;
  - bidi: a string with right-to-left characters must not mix in left-to-right ones, and must start and end
    with right-to-left ones (RFC 3454 §6);
  - at most 223 bytes of UTF-8 once prepared (RFC 3720 §3.2.6.1);
  - the form: iqn.yyyy-mm.reversed.domain[:any], eui. + 16 hex digits, naa. + 16 or 32 hex digits.
"""

from __future__ import annotations

import functools
import re
import stringprep
import unicodedata

from shared.config.base import validate_iscsi_name

MAX_BYTES = 223
_ASCII_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.:")
_ASCII_NAME = re.compile(rb"[A-Za-z0-9.:-]{1,223}")  # all-ASCII and allowed: stringprep is lower() alone
_PROHIBITED = (stringprep.in_table_c11, stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
               stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
               stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9, stringprep.in_table_a1)


class NameError_(ValueError):
    """Not a valid iSCSI name; the message says why."""


def prepare(raw) -> str:
    """RFC 3722's stringprep of a name's bytes (see the module doc)."""
    if _ASCII_NAME.fullmatch(raw):  # what initiators send: B.1 maps no ASCII, NFKC keeps it, B.2 lowers it
        return raw.decode("ascii").lower()
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NameError_(f"not valid UTF-8 (byte {exc.start})") from None
    mapped = "".join(stringprep.map_table_b2(c) for c in text if not stringprep.in_table_b1(c))
    name = unicodedata.normalize("NFKC", mapped)
    for c in name:
        if c < "\x80":
            if c not in _ASCII_ALLOWED:
                raise NameError_(f"{name!r}: character {c!r} is not allowed in an iSCSI name (RFC 3722 6.1)")
        elif c == "\u3002" or any(table(c) for table in _PROHIBITED):
            raise NameError_(f"{name!r}: character U+{ord(c):04X} is prohibited in an iSCSI name (RFC 3722 6)")
    if any(stringprep.in_table_d1(c) for c in name):
        if any(stringprep.in_table_d2(c) for c in name) or not (
                stringprep.in_table_d1(name[0]) and stringprep.in_table_d1(name[-1])):
            raise NameError_(f"{name!r}: mixes right-to-left and left-to-right text (RFC 3454 6)")
    if len(name.encode()) > MAX_BYTES:
        raise NameError_(f"name is {len(name.encode())} bytes; at most {MAX_BYTES} (RFC 3720 3.2.6.1)")
    if not name:
        raise NameError_("empty name")
    return name


@functools.lru_cache(maxsize=4096)  # a PC logs in with the same two names every time (~90 us to prepare)
def canonical(raw: bytes) -> str:
    """The name, prepared and checked, in the configuration's canonical form."""
    name = prepare(raw)
    try:
        return validate_iscsi_name(name)
    except ValueError as exc:
        raise NameError_(str(exc)) from None
