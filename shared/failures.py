"""Failures said as a sentence people can act on, not as a Python exception's repr.

A service that cannot apply its configuration reports why in its heartbeat and in `service.apply_failed`;
`bootfleet status` and `make up` print that reason as it is. `reason(exc)` makes the sentence: a `Failure`
already is one (its message), an OSError with a file name becomes `PATH: no such file or directory`, and
anything else keeps its type name (a bug, which a traceback in the log explains).

`bind()` opens a listening address and, when the kernel refuses, raises a `ListenError` naming the address,
what the error means, and the usual cause: `cannot listen on 0.0.0.0:69: address in use (another TFTP server
running?)`.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no socket import at run time: sans-IO cores may use Failure
    import socket


class Failure(Exception):
    """An error whose message is already the sentence for people."""


class ListenError(Failure, OSError):
    """The kernel refused a listening address (an OSError still, for code that catches those)."""

    def __init__(self, code: int | None, text: str):
        OSError.__init__(self, code, text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _strerror(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def listen_reason(address: str, port: int, exc: OSError, what: str, device: str | None = None) -> str:
    """Why `what` (TFTP, DHCP, iSCSI) cannot listen on address:port, in one sentence."""
    where = f"{address}:{port}" + (f" on {device}" if device else "")
    code = exc.errno
    if code == errno.EADDRINUSE:
        why = f"address in use (another {what} server running?)"
    elif code == errno.EACCES:
        why = "permission refused" + (
            f" (port {port} is below 1024: run as root or grant CAP_NET_BIND_SERVICE)" if 0 < port < 1024 else ""
        )
    elif code == errno.EPERM and device:
        why = "permission refused (binding to an interface needs CAP_NET_RAW)"
    elif code == errno.EADDRNOTAVAIL:
        why = f"no interface of this host has the address {address}"
    elif code == errno.ENODEV and device:
        why = f"no network interface named {device}"
    else:
        why = _strerror(exc)
    return f"cannot listen on {where}: {why}"


def bind(sock: socket.socket, address: str, port: int, what: str, device: str | None = None) -> None:
    """`sock.bind((address, port))`, raising a ListenError that says why in words."""
    try:
        sock.bind((address, port))
    except OSError as exc:
        raise ListenError(exc.errno, listen_reason(address, port, exc, what, device)) from None


def reason(exc: BaseException) -> str:
    """The one-line reason a revision failed to apply, for `bootfleet status` and `make up`."""
    if isinstance(exc, Failure):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {_strerror(exc)}" if exc.filename else _strerror(exc)
    return f"{type(exc).__name__}: {exc}"
