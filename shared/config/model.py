"""The whole Bootfleet configuration: one YAML document for the boot chain."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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


class ScaleConfig(StrictModel):
    dhcp: int = Field(1, ge=0, le=8, description="processes of the DHCP service")
    tftp: int = Field(1, ge=0, le=8, description="processes of the TFTP service (share port 69)")
    iscsi_target: int = Field(1, ge=0, le=8, description="processes of the iSCSI target (share port 3260)")


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
