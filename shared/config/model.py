"""The whole Bootfleet configuration: one YAML document for the boot chain."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from shared.config.base import StrictModel
from shared.config.boot import BootConfig, ClientAssignment
from shared.config.dhcp import DhcpConfig
from shared.config.http import HttpConfig
from shared.config import images as images_rules
from shared.config.images import ImageConfig, ImageStoreConfig
from shared.config.iscsi import IscsiConfig
from shared.config.tftp import TftpConfig
from shared.config.web import WebConfig

SERVICES = ("dhcp", "tftp", "iscsi_target")


class BusConfig(StrictModel):
    transport: Literal["ipc", "tcp"] = Field("ipc", description="ipc: sockets in <state_dir>/bus (mode 0700)")
    host: str = Field("127.0.0.1", description="tcp only: address the controller binds")
    port_base: int = Field(5560, ge=1024, le=65530, description="tcp only: first of three ports (publish, snapshot, events)")
    curve: bool = Field(True, description="tcp only: authenticate and encrypt with CURVE keys")
    heartbeat_interval: float = Field(1.0, gt=0, le=60, description="seconds between heartbeats")
    heartbeat_timeout: float = Field(5.0, gt=0, le=600, description="seconds of silence before a peer is away")
    event_queue: int = Field(10000, ge=10, description="events a service buffers before it drops (counted)")


class LoggingConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"


MAX_PROCESSES = 8  # numprocs of each service in deploy/supervisord.conf


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a cpuset or taskset narrows it)."""
    return len(os.sched_getaffinity(0))


def _process_count(value: object) -> object:
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # from a form or a command line
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PROCESSES:
        raise ValueError(f"{value!r} is not a process count: a whole number 0-{MAX_PROCESSES} or 'auto' "
                         "(one per usable core)")
    return value


ProcessCount = Annotated[int | Literal["auto"], BeforeValidator(_process_count)]


class ScaleConfig(StrictModel):
    dhcp: ProcessCount = Field(1, description="processes of the DHCP service")
    tftp: ProcessCount = Field(1, description="processes of the TFTP service (share port 69)")
    # Python runs one thread of a process at a time: a target process per core is what lets the iSCSI data
    # path use the machine (docs/iscsi.md, "How many processes").
    iscsi_target: ProcessCount = Field("auto", description="processes of the iSCSI target (share port 3260); "
                                                           "auto: one per usable core, at most 8")

    def processes(self, service: str) -> int:
        """How many processes of `service` this configuration runs on this host ('auto' resolved); 1 for a
        process that is not one of SERVICES (a test's own service)."""
        value = getattr(self, service, 1)
        return min(MAX_PROCESSES, usable_cores()) if value == "auto" else value

    def resolved(self) -> dict[str, int]:
        return {service: self.processes(service) for service in SERVICES}


class EventsConfig(StrictModel):
    retention_days: float = Field(7.0, gt=0, description="events older than this are deleted")
    max_rows: int = Field(1_000_000, ge=1000, description="the event store keeps at most this many events")


class BootfleetConfig(StrictModel):
    version: Literal[1] = 1
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    bus: BusConfig = Field(default_factory=BusConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    boot: BootConfig = Field(default_factory=BootConfig)
    clients: list[ClientAssignment] = Field(default_factory=list)
    image_store: ImageStoreConfig = Field(default_factory=ImageStoreConfig)
    images: list[ImageConfig] = Field(default_factory=list)
    iscsi: IscsiConfig = Field(default_factory=IscsiConfig)
    dhcp: DhcpConfig = Field(default_factory=DhcpConfig)
    tftp: TftpConfig = Field(default_factory=TftpConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    web: WebConfig = Field(default_factory=WebConfig)

    @model_validator(mode="after")
    def _unique_clients(self) -> "BootfleetConfig":
        seen: dict[str, int] = {}
        for i, client in enumerate(self.clients):
            if client.mac in seen:
                raise ValueError(f"clients[{i}].mac: {client.mac} is already assigned by clients[{seen[client.mac]}]")
            seen[client.mac] = i
        return self

    @model_validator(mode="after")
    def _images(self) -> "BootfleetConfig":
        images_rules.check(self)  # a client on an image: docs/images.md
        return self

    @model_validator(mode="after")
    def _http_transport_needs_http(self) -> "BootfleetConfig":
        if self.boot.transport == "http" and not self.http.enabled:
            raise ValueError("boot.transport: http needs http.enabled: true (the HTTP listener is off by default)")
        return self

    @model_validator(mode="after")
    def _targets_exist(self) -> "BootfleetConfig":
        """A PC assigned a target this stack does not export would fail to boot; say so now. With
        boot.server set, targets live on another server and are not checked."""
        if self.boot.server is not None:
            return self
        known = {t.name for t in getattr(self.iscsi, "targets", [])}
        wanted = [("boot.default_target", self.boot.default_target)]
        wanted += [(f"clients[{i}].target", c.target) for i, c in enumerate(self.clients)]
        wanted += [(f"clients[{i}].install", c.install) for i, c in enumerate(self.clients)]  # the installer's disc
        for path, name in wanted:
            if name and name not in known:
                raise ValueError(
                    f"{path}: {name} is not a target in iscsi.targets "
                    "(define it there, or set boot.server to boot from another server)"
                )
        return self
