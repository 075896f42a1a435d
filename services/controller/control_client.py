"""The control channel's client: one request to the controller's control socket, with a deadline.

Used by the `bootfleet` CLI and by the web dashboard, so both speak to the controller the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import zmq

from shared.bus.endpoints import control_endpoint


class CliError(Exception):
    pass


class NoAnswer(CliError):
    """The controller did not answer in time (busy, or restarting)."""


class Control:
    """Requests to the controller's control socket, each with a deadline."""

    def __init__(self, state_dir: Path, timeout: float):
        self.endpoint = control_endpoint(state_dir)
        self.timeout = timeout

    def call(self, command: str, **arguments: Any) -> dict[str, Any]:
        """One request; a long poll (`wait` seconds, events-wait) gets that much longer to be answered."""
        timeout = self.timeout + float(arguments.get("wait") or 0)
        sock_path = self.endpoint[len("ipc://") :]
        if not os.path.exists(sock_path):
            raise CliError(f"the controller is not running (no {sock_path}); start the stack with `make up`")
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.REQ)
        sock.linger = 0
        try:
            sock.connect(self.endpoint)
            sock.send(msgpack.packb({"command": command, "arguments": arguments}, use_bin_type=True))
            if not sock.poll(timeout * 1000):
                raise NoAnswer(f"the controller did not answer {command} within {timeout:.0f} s ({self.endpoint})")
            return msgpack.unpackb(sock.recv(), raw=False)
        finally:
            sock.close()
