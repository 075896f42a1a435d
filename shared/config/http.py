"""The `http` section: the TFTP service's HTTP/1.1 listener, which serves the TFTP root and the per-client iPXE
scripts (the same jail, the same rendered names) to iPXE and UEFI clients that fetch over HTTP.

Off by default: turning it on opens a TCP port that hands out every PC's script (CHAP secret included) to
anyone who can reach it, which an existing installation should choose rather than get with an upgrade; and a
default port taken by every TFTP process would collide between stacks and tests on one host (with SO_REUSEPORT,
two unrelated stacks would even share it silently and split the clients). `boot.transport: http` needs it on.
"""

from __future__ import annotations

from pydantic import Field

from shared.config.base import IPv4, StrictModel

DEFAULT_PORT = 8069


class HttpConfig(StrictModel):
    enabled: bool = Field(False, description="serve the TFTP root and the iPXE scripts over HTTP too")
    address: IPv4 | None = Field(
        None, description="address the HTTP listener binds; default: tftp.address (the addresses TFTP serves)"
    )
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port (0: any free port, for tests)")
    keepalive_timeout: float = Field(
        60.0, gt=0, le=3600,
        description="seconds a connection has to send a whole request after it opens or after its last reply "
        "(idle keep-alive connections close then), and seconds a client may take no bytes of a reply",
    )
    max_connections: int = Field(
        1000, ge=1, le=100_000, description="open connections per TFTP process; more get 503 and are closed"
    )
