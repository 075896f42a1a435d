"""Where the bus sockets live: ipc:// files in <state_dir>/bus (mode 0700), or tcp:// ports."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared.config.model import BusConfig

NAMES = ("publish", "snapshot", "events", "control")


@dataclass(frozen=True)
class Endpoints:
    publish: str  # PUB: kv updates and heartbeats
    snapshot: str  # ROUTER: snapshot requests
    events: str  # PULL: events and service heartbeats
    control: str  # ROUTER: CLI requests
    curve: bool = False


def bus_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "bus"


def endpoints(state_dir: Path, bus: BusConfig | None = None, *, bind: bool = False) -> Endpoints:
    bus = bus or BusConfig()
    d = bus_dir(state_dir)
    if bind:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)  # file permissions are the bus's access control
    ipc = [f"ipc://{d / (name + '.sock')}" for name in NAMES]
    if bus.transport == "tcp":
        # services on other hosts reach the first three; the CLI's control socket stays local
        urls = [f"tcp://{bus.host}:{bus.port_base + i}" for i in range(3)]
        return Endpoints(*urls, control=ipc[3], curve=bus.curve)
    return Endpoints(*ipc)


def control_endpoint(state_dir: Path, bus: BusConfig | None = None) -> str:
    return endpoints(state_dir, bus).control
