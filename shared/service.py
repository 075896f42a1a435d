"""The common life of a Bootfleet service process: configuration in, events out.

A service is a subclass of `BaseService` with a protocol core and an I/O layer of its own. This module
runs it in one of two modes:

- standalone: `python -m services.<name> --config FILE`: the file is validated and applied once; events
  go to the log only.
- managed (the default under supervisord): the process subscribes to the controller's bus
  (shared/bus/), applies each configuration revision it receives, reports the revision it applied,
  pushes its events, and keeps serving on its cached revision while the controller is away.

Life of a service object: `start(config)` once (bind sockets), `apply(config)` for each later revision that
changes one of its `sections` (existing work goes on), `stop()` on SIGTERM, bounded by `STOP_TIMEOUT` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from shared.events import Event
from shared.config.loader import ConfigError, load_config_file
from shared.config.model import BootfleetConfig

STOP_TIMEOUT = 10.0

log = logging.getLogger("bootfleet")


class ServiceContext:
    """What the runtime hands a service: identity, event emission and facts learned from the bus."""

    def __init__(self, name: str, instance: int, state_dir: Path, emitter: Callable[[str, dict], None]):
        self.name = name
        self.instance = instance  # process_num under supervisord, 0..instances-1
        self.instances = 1  # processes of this service in the current config (scale.<name>)
        self.state_dir = state_dir
        self.log = logging.getLogger(f"bootfleet.{name}")
        self._emitter = emitter
        self._event_log = logging.getLogger(f"bootfleet.{name}.event")
        self.leases: dict[str, str] = {}  # ip -> mac, from DHCP lease events relayed by the controller
        self.pcboot: dict[str, dict] = {}  # mac -> {image, version, boot, mode}: `pcboot/<mac>` keys (docs/images.md)

    def emit(self, event: Event) -> None:
        """Queue an event for the controller and log it (one line, INFO). Thread-safe, never blocks;
        drops are counted. `logging.level: warning` keeps events out of the log on busy servers."""
        fields = event.fields()
        if self._event_log.isEnabledFor(logging.INFO):
            self._event_log.info("%s %s", event.type, " ".join(f"{k}={v}" for k, v in fields.items()))
        self._emitter(event.type, fields)

    def mac_for_ip(self, ip: str) -> str | None:
        return self.leases.get(ip)


class BaseService:
    name = "service"
    # The top-level configuration sections this service reads (the Clone pattern's subtree): a new revision
    # that changes none of them is not passed to `apply` (it is still reported applied). None: every section.
    sections: tuple[str, ...] | None = None

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.log = ctx.log

    async def start(self, config: BootfleetConfig) -> None:
        raise NotImplementedError

    async def apply(self, config: BootfleetConfig) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def counters(self) -> dict[str, float]:
        """Key counters shown by `bootfleet status` (requests, bytes, sessions...)."""
        return {}

    def problems(self) -> list[str]:
        """What keeps this process from serving its applied configuration right now, one sentence each
        (a socket it cannot open and keeps retrying). Heartbeats carry them as `failed` until the list is
        empty again, so `bootfleet status` and `make up` say them. Called from the heartbeat thread."""
        return []

    async def command(self, name: str, args: dict[str, Any]) -> None:
        """An operation the controller asks of this service (e.g. the DHCP service's `lease-release`).
        Runs at most once per request in each process; report the outcome with an event."""
        self.log.warning("command %s is not supported by %s", name, self.name)


def setup_logging(level: str, name: str, instance: int) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)s {name}[{instance}] %(name)s: %(message)s",
        force=True,
    )


def parse_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    parser.add_argument("--config", help="standalone: serve this config file, with no controller")
    parser.add_argument("--state-dir", default=os.environ.get("BOOTFLEET_STATE_DIR", "var"))
    parser.add_argument("--instance", type=int, default=int(os.environ.get("BOOTFLEET_INSTANCE", "0")))
    return parser.parse_args(argv)


def main(service_cls: type[BaseService], argv: list[str] | None = None) -> None:
    args = parse_args(service_cls.name, argv)
    state_dir = Path(args.state_dir).resolve()
    if args.config:
        try:
            config = load_config_file(args.config)
        except ConfigError as exc:
            print(f"{args.config}: {exc}", file=sys.stderr)
            sys.exit(1)
        setup_logging(config.logging.level, service_cls.name, args.instance)
        sys.exit(asyncio.run(_run_standalone(service_cls, config, args.instance, state_dir)))
    from shared.managed import run_managed  # the bus client; not needed standalone

    setup_logging("info", service_cls.name, args.instance)
    sys.exit(asyncio.run(run_managed(service_cls, args.instance, state_dir)))


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def stop_within_bound(service: BaseService) -> None:
    try:
        await asyncio.wait_for(service.stop(), STOP_TIMEOUT)
    except asyncio.TimeoutError:
        log.warning("%s: stop took longer than %.0f s; exiting with work in flight", service.name, STOP_TIMEOUT)


async def _run_standalone(service_cls: type[BaseService], config: BootfleetConfig, instance: int, state_dir: Path) -> int:
    ctx = ServiceContext(service_cls.name, instance, state_dir, lambda type, fields: None)
    ctx.instances = config.scale.processes(service_cls.name)
    service = service_cls(ctx)
    await service.start(config)
    await wait_for_signal()
    await stop_within_bound(service)
    return 0
