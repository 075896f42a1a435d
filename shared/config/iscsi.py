"""The `iscsi` section: portals, access (auth), targets with their LUNs and backstores, ACLs.

Words as targetcli uses them. `IscsiConfig()` with no arguments is valid and safe: no targets, so the
service listens but exports nothing. See docs/iscsi.md for every key.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from shared.config.base import IPv4, IPv4Network, IscsiName, StrictModel

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

CHAP_SECRET_MIN = 12  # RFC 7143 §12.1.3 (and the Microsoft initiator) want at least 12 bytes
CHAP_SECRET_MAX = 16  # the Microsoft initiator refuses longer secrets


def parse_size(value: object) -> int:
    """Bytes from an int or a string like "64MiB", "2G", "512k" (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a size (bytes, or a number with KiB/MiB/GiB/TiB)")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"{value} is not a size (bytes, or a number with KiB/MiB/GiB/TiB)")
    unit = (match.group(2) or "").upper().rstrip("B").rstrip("I") if match.group(2) else ""
    return int(match.group(1)) * _UNITS[unit]


class Portal(StrictModel):
    ip: IPv4 = Field("0.0.0.0", description="address to listen on (0.0.0.0: all)")
    port: int = Field(3260, ge=1, le=65535, description="TCP port")


class ChapUser(StrictModel):
    username: str = Field(..., min_length=1, max_length=255, description="CHAP name (CHAP_N)")
    secret: str = Field(..., description=f"CHAP secret, {CHAP_SECRET_MIN}..{CHAP_SECRET_MAX} bytes")

    @field_validator("secret")
    @classmethod
    def _secret_length(cls, value: str) -> str:
        n = len(value.encode())
        if not CHAP_SECRET_MIN <= n <= CHAP_SECRET_MAX:
            raise ValueError(
                f"CHAP secret is {n} bytes; it must be {CHAP_SECRET_MIN}..{CHAP_SECRET_MAX} "
                "(RFC 7143 §12.1.3 minimum; the Microsoft initiator's maximum)"
            )
        return value


class IpFilter(StrictModel):
    network: IPv4Network = Field(..., description="a.b.c.d/len the rule matches")
    action: Literal["allow", "deny"] = Field("allow", description="what a match does; the first match wins")


class AuthConfig(StrictModel):
    mode: Literal["anonymous", "chap", "ip", "mixed"] = Field(
        "anonymous",
        description="anonymous: anyone; chap: CHAP users (and the guest if allowed); ip: ip_filters only; "
        "mixed: ip_filters AND chap",
    )
    users: list[ChapUser] = Field(default_factory=list, description="CHAP users an initiator may log in as")
    guest: bool = Field(False, description="chap/mixed: let initiators that bring no credentials in (AuthMethod=None)")
    mutual: ChapUser | None = Field(None, description="the target's own CHAP name/secret for mutual CHAP")
    ip_filters: list[IpFilter] = Field(
        default_factory=list, description="ip/mixed: ordered rules; first match wins; no match denies"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "AuthConfig":
        if self.mode in ("chap", "mixed") and not self.users and not self.guest:
            raise ValueError(f"mode {self.mode} needs at least one CHAP user (users) or guest: true")
        if self.mode in ("ip", "mixed") and not self.ip_filters:
            raise ValueError(f"mode {self.mode} needs ip_filters (with no rule every initiator is denied)")
        names = [u.username for u in self.users]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"users: {sorted(dup)[0]} is listed twice")
        if self.mutual and any(self.mutual.secret == u.secret for u in self.users):
            raise ValueError("mutual.secret must differ from every user's secret (RFC 7143 §12.1.3)")
        return self


class Backstore(StrictModel):
    type: Literal["file", "ram", "block", "mirror", "cdrom", "vhd"] = Field(
        "ram", description="file: a raw image file; ram: memory, lost on exit; block: a block device or partition "
        "(/dev/...); mirror: RAID-1 over two legs; cdrom: a CD/DVD-ROM drive with an ISO image as its disc; "
        "vhd: a VHD file (fixed, dynamic or differencing; read-write) or a VHDX file (served read-only)")
    path: str | None = Field(None, description="file: image path (relative to the state directory); block: the "
                             "device (/dev/...); cdrom: the ISO image (relative to the state directory); vhd: the "
                             "VHD or VHDX file (relative to the state directory; a differencing VHD's parents are "
                             "found through its own locators)")
    size: int | None = Field(
        None, description='bytes (accepts "64MiB"); file: required to create, else the file\'s size; ram: required; '
        "block, cdrom, mirror, vhd: none (the device's, the image's, the legs', the VHD's)"
    )
    sparse: bool = Field(False, description="file: create a sparse file instead of preallocating it")
    create: bool = Field(True, description="file: create the image if it does not exist")
    block_size: Literal[512, 4096] | None = Field(
        None, description="logical block size in bytes; 512 unless given, except block: the device's unless "
        "given (a normalized config carries null for that); cdrom: always 2048")
    readonly: bool = Field(False, description="refuse writes (WRITE PROTECT); a cdrom always is")
    write_through: bool = Field(False, description="file, block, mirror, vhd: every write is durable when its "
                                "response is sent")
    direct: bool = Field(False, description="block: open the device O_DIRECT (the host's page cache keeps none of it)")
    legs: list["Backstore"] | None = Field(
        None, description="mirror: the two legs, file, block or ram backstores of the same size")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value):
        return None if value is None else parse_size(value)

    @model_validator(mode="before")
    @classmethod
    def _default_block_size(cls, data):
        """512 unless given, but a block device's stays None (its own) also in the normalized config the
        controller publishes: a default filled in here would reach the service as if given."""
        if isinstance(data, dict) and data.get("block_size") is None and data.get("type", "ram") != "block":
            data = {**data, "block_size": 512}
        return data

    @model_validator(mode="after")
    def _check(self) -> "Backstore":
        kind = self.type
        if kind in ("file", "block", "cdrom", "vhd") and not self.path:
            raise ValueError(f"path: a {kind} backstore needs a path")
        if kind == "ram" and not self.size:
            raise ValueError("size: a ram backstore needs a size")
        if kind in ("block", "cdrom", "mirror", "vhd") and self.size is not None:
            raise ValueError(f"size: a {kind} backstore takes its size from the "
                             + {"block": "device", "cdrom": "ISO image", "mirror": "legs", "vhd": "VHD"}[kind])
        if kind == "block" and not self.path.startswith("/dev/"):
            raise ValueError(f"path: a block backstore is a device under /dev/, not {self.path}")
        # 512 is the default a normalized config (the controller's published revision) carries for every LUN
        if kind == "cdrom" and "block_size" in self.model_fields_set and self.block_size not in (512, 2048):
            raise ValueError("block_size: a cdrom has 2048-byte blocks")
        if self.direct and kind != "block":
            raise ValueError("direct: only a block backstore opens its device O_DIRECT")
        if kind != "mirror" and self.legs is not None:
            raise ValueError("legs: only a mirror has legs")
        if kind == "mirror":
            self._check_legs()
        if self.size is not None:
            if self.size <= 0:
                raise ValueError(f"size {self.size} must be positive")
            if self.size % (self.block_size or 512):
                raise ValueError(f"size {self.size} is not a multiple of block_size {self.block_size}")
        return self

    def _check_legs(self) -> None:
        if self.path:
            raise ValueError("path: a mirror has no path of its own; its legs have")
        legs = self.legs or []
        if len(legs) != 2:
            raise ValueError(f"legs: a mirror needs exactly two legs, got {len(legs)}")
        for i, leg in enumerate(legs):
            if leg.type not in ("file", "block", "ram"):
                raise ValueError(f"legs[{i}].type: a mirror leg is a file, block or ram backstore, not {leg.type}")
            if leg.readonly:
                raise ValueError(f"legs[{i}].readonly: a mirror leg is written; make the mirror readonly instead")
        if None not in (legs[0].block_size, legs[1].block_size) and legs[0].block_size != legs[1].block_size:
            raise ValueError(f"legs[1].block_size: {legs[1].block_size} differs from legs[0].block_size "
                             f"{legs[0].block_size}")
        if legs[0].size and legs[1].size and legs[0].size != legs[1].size:
            raise ValueError(f"legs[1].size: {legs[1].size} bytes differs from legs[0].size {legs[0].size}")
        if legs[0].type == legs[1].type != "ram" and legs[0].path == legs[1].path:
            raise ValueError(f"legs[1].path: both legs are {legs[0].path}")


Backstore.model_rebuild()  # legs: a Backstore holds Backstores


class Lun(StrictModel):
    id: int = Field(..., ge=0, le=16383, description="LUN number the initiator sees")
    backstore: Backstore = Field(..., description="where the blocks live")


class Target(StrictModel):
    name: IscsiName = Field(..., description="the target's IQN")
    alias: str | None = Field(None, max_length=255, description="TargetAlias shown by initiators")
    luns: list[Lun] = Field(default_factory=list, description="logical units of this target")
    auth: AuthConfig | Literal["inherit"] = Field("inherit", description='"inherit" (the global auth) or its own')
    acls: list[IscsiName] = Field(default_factory=list, description="initiator IQNs allowed in; empty: any")

    @model_validator(mode="after")
    def _unique_luns(self) -> "Target":
        seen: set[int] = set()
        for i, lun in enumerate(self.luns):
            if lun.id in seen:
                raise ValueError(f"luns[{i}].id: LUN {lun.id} is defined twice in target {self.name}")
            seen.add(lun.id)
        return self

    def effective_auth(self, global_auth: AuthConfig) -> AuthConfig:
        return global_auth if self.auth == "inherit" else self.auth


class IscsiConfig(StrictModel):
    portals: list[Portal] = Field(default_factory=lambda: [Portal()], min_length=1, description="where to listen")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="global access settings (and discovery)")
    targets: list[Target] = Field(default_factory=list, description="exported targets")
    nop_interval: float = Field(
        30.0, ge=0, le=3600, description="seconds of silence before the target pings (NOP-In); 0: never"
    )
    nop_timeout: float = Field(15.0, gt=0, le=3600, description="seconds to wait for a ping's answer before dropping")
    io_stats_interval: float = Field(10.0, ge=0, le=3600, description="seconds between I/O stats events; 0: none")
    busy_poll_us: int = Field(
        0, ge=0, le=10000,
        description="microseconds a connection spins on recv before sleeping while I/O flows (costs a core); "
                    "above 0 every connection keeps a thread of its own instead of joining the shared event loop "
                    "after login (applies to later logins)",
    )
    cmd_window: int = Field(32, ge=1, le=1024, description="commands an initiator may have queued (MaxCmdSN window)")

    @model_validator(mode="after")
    def _check(self) -> "IscsiConfig":
        names: dict[str, int] = {}
        for i, target in enumerate(self.targets):
            if target.name in names:
                raise ValueError(f"targets[{i}].name: {target.name} is already defined by targets[{names[target.name]}]")
            names[target.name] = i
        ports = [(p.ip, p.port) for p in self.portals]
        if len(set(ports)) != len(ports):
            raise ValueError("portals: the same ip:port is listed twice")
        return self

    def target(self, name: str) -> Target | None:
        for target in self.targets:
            if target.name == name:
                return target
        return None

    def boot_credentials(self, iqn: str) -> tuple[str, str] | None:
        """CHAP (username, secret) a booting initiator should use for this target; None if it may log in
        without credentials (anonymous, ip-only, or a guest is allowed)."""
        target = self.target(iqn.lower())
        auth = target.effective_auth(self.auth) if target else self.auth
        if auth.mode in ("anonymous", "ip") or auth.guest or not auth.users:
            return None
        user = auth.users[0]
        return user.username, user.secret


def ip_allowed(auth: AuthConfig, ip: str) -> bool:
    """The ip_filters verdict for this address: first matching rule wins; no match denies."""
    address = ipaddress.IPv4Address(ip)
    for rule in auth.ip_filters:
        if address in ipaddress.IPv4Network(rule.network):
            return rule.action == "allow"
    return False
