"""Option negotiation (RFC 2347 blksize 2348, timeout/tsize 2349, windowsize 7440).

The server answers an OACK only with options the client asked for and the server understood; names are
matched case-insensitively. Per option:
- blksize 8..65464: a value above `max_blksize` is answered with `max_blksize` (the RFC lets the server
  answer smaller); outside 8..65464 or not a number: error 8.
- windowsize 1..65535: above `max_windowsize` is answered with `max_windowsize`; outside or not a number: error 8.
- timeout 1..255 seconds: the server may not change it, so a value outside [min_timeout, max_timeout] is left
  out of the OACK (the default timeout applies); outside 1..255 or not a number: error 8.
- tsize: on a read, the file's size (the client sends 0); on a write, the client's announced size is echoed
  (and checked against the upload limit by the caller).
Unknown options are ignored, as RFC 2347 asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config.tftp import BLKSIZE_MAX, BLKSIZE_MIN, TIMEOUT_MAX, TIMEOUT_MIN, WINDOWSIZE_MAX

DEFAULT_BLKSIZE = 512


class OptionError(ValueError):
    """The client asked an option value outside what its RFC allows; answer error 8 with this message."""


@dataclass(frozen=True)
class OptionPolicy:
    max_blksize: int = BLKSIZE_MAX
    max_windowsize: int = 64
    default_timeout: float = 1.0
    min_timeout: int = TIMEOUT_MIN
    max_timeout: int = TIMEOUT_MAX


@dataclass
class Negotiated:
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = 1.0
    tsize: int | None = None  # a write's announced size; None when not asked
    oack: dict[str, int] = field(default_factory=dict)  # what to answer; empty = no OACK


def _integer(name: str, value: str) -> int:
    text = value.strip()
    if not text.isdigit() or len(text) > 10:
        raise OptionError(f"option {name} value {value!r} is not a number")
    return int(text)


def negotiate(requested: dict[str, str], policy: OptionPolicy, size: int | None, writing: bool = False) -> Negotiated:
    """`requested`: option names in lower case. `size`: the file's size for a read (None if unknown)."""
    result = Negotiated(timeout=policy.default_timeout)
    oack = result.oack
    if "blksize" in requested:
        blksize = _integer("blksize", requested["blksize"])
        if not BLKSIZE_MIN <= blksize <= BLKSIZE_MAX:
            raise OptionError(f"option blksize {blksize} is outside {BLKSIZE_MIN}..{BLKSIZE_MAX}")
        result.blksize = min(blksize, policy.max_blksize)
        oack["blksize"] = result.blksize
    if "timeout" in requested:
        timeout = _integer("timeout", requested["timeout"])
        if not TIMEOUT_MIN <= timeout <= TIMEOUT_MAX:
            raise OptionError(f"option timeout {timeout} is outside {TIMEOUT_MIN}..{TIMEOUT_MAX} seconds")
        if policy.min_timeout <= timeout <= policy.max_timeout:
            result.timeout = float(timeout)
            oack["timeout"] = timeout
    if "tsize" in requested:
        announced = _integer("tsize", requested["tsize"])
        if writing:
            result.tsize = announced
            oack["tsize"] = announced
        elif size is not None:
            oack["tsize"] = size
    if "windowsize" in requested:
        windowsize = _integer("windowsize", requested["windowsize"])
        if not 1 <= windowsize <= WINDOWSIZE_MAX:
            raise OptionError(f"option windowsize {windowsize} is outside 1..{WINDOWSIZE_MAX}")
        result.windowsize = min(windowsize, policy.max_windowsize)
        oack["windowsize"] = result.windowsize
    return result
