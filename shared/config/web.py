"""The `web` section: the controller's dashboard, JSON API and Prometheus `/metrics` (services/controller/web/).

On by default on loopback, as Kea's control agent: a browser on the server itself sees the fleet, and every
action still needs the token in `<state_dir>/web-token` (mode 0600, written at the controller's start) or the
password whose hash is `password_hash`. On any other address every request needs one of them, and a
certificate should be configured (TLS). A revision that changes the section restarts the web server in the running
controller (services/controller/web/host.py).
"""

from __future__ import annotations

import ipaddress
import re

from pydantic import Field, field_validator, model_validator

from shared.config.base import IPv4, StrictModel

DEFAULT_PORT = 8080
# pbkdf2_sha256$<iterations>$<salt, base64>$<hash, base64> (`python -m services.controller.web.auth hash`)
PASSWORD_HASH_RE = re.compile(r"^pbkdf2_sha256\$\d{4,9}\$[A-Za-z0-9+/=]{8,}\$[A-Za-z0-9+/=]{16,}$")


class WebConfig(StrictModel):
    enabled: bool = Field(True, description="serve the dashboard, the JSON API and /metrics")
    address: IPv4 = Field("127.0.0.1", description="address the web server binds (loopback: pages need no login)")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port (0: any free port, for tests)")
    password_hash: str | None = Field(
        None, description="pbkdf2_sha256$iterations$salt$hash of a password accepted besides the token "
        "(make one with `python -m services.controller.web.auth hash`)",
    )
    certificate: str | None = Field(None, description="PEM certificate chain: serve HTTPS (relative: under the state directory)")
    key: str | None = Field(None, description="PEM private key of the certificate")
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="hours a browser login lasts")

    @field_validator("password_hash")
    @classmethod
    def _hash_format(cls, value: str | None) -> str | None:
        if value is not None and not PASSWORD_HASH_RE.match(value):
            raise ValueError("expected pbkdf2_sha256$<iterations>$<salt>$<hash> (python -m services.controller.web.auth hash)")
        return value

    @model_validator(mode="after")
    def _certificate_and_key(self) -> "WebConfig":
        if (self.certificate is None) != (self.key is None):
            raise ValueError("certificate and key: set both (HTTPS) or neither (HTTP)")
        return self

    @property
    def loopback(self) -> bool:
        return ipaddress.IPv4Address(self.address).is_loopback

    @property
    def tls(self) -> bool:
        return self.certificate is not None
