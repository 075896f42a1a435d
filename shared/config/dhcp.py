"""The `dhcp` section: interfaces served, scopes (subnet, ranges, lease time, options, reservations), client classes.

Option precedence, lowest to highest (a later level replaces an option number set by an earlier one):
`dhcp.options` (global) < scope `options` < built-in boot class (loader / iPXE script, root-path)
< matching `dhcp.classes` in the order written < the reservation's `options`. Safe default: no interfaces, no scopes:
the service answers nothing until configured.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.config.base import IPv4, IPv4Network, IscsiName, Mac, StrictModel
from services.dhcp.options import OptionError, encode_option

OptionMap = dict[str | int, Any]

_OPTIONS_DOC = (
    "DHCP options by name (routers, domain-name-servers, root-path, ipxe-encap...) or number; a known option takes "
    "its typed value, any other number {type: ip|ips|u8|u16|u32|i32|string|bool|hex, value: ...} or hex:0a:0b"
)


def check_root_path(value: str) -> None:
    """Option 17 set by hand: iPXE needs `iscsi:<server>:<protocol>:<port>:<lun>:<iqn>` (four colons before the IQN)."""
    if not value.startswith("iscsi:"):
        return
    rest = value[len("iscsi:") :]
    starts = [i for i in (rest.find(":iqn."), rest.find(":eui."), rest.find(":naa.")) if i >= 0]
    if not starts:
        raise ValueError(f"root-path {value!r}: no iqn./eui./naa. target name after the fields")
    fields = rest[: min(starts)].split(":")
    if len(fields) != 4:
        raise ValueError(
            f"root-path {value!r}: {len(fields)} field(s) before the target name, iPXE needs 4 "
            "(iscsi:<server>:<protocol>:<port>:<lun>:<iqn>, empty fields take defaults), "
            f"e.g. iscsi:{fields[0] or '10.0.0.1'}::::{rest[min(starts) + 1:]}"
        )
    server, _proto, port, lun = fields
    if not server:
        raise ValueError(f"root-path {value!r}: the server field is empty")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"root-path {value!r}: port {port!r} is not a TCP port")
    if lun and not lun.isdigit():
        raise ValueError(f"root-path {value!r}: LUN {lun!r} is not a number")


def validate_options(options: OptionMap) -> OptionMap:
    seen: dict[int, Any] = {}
    for key, value in options.items():
        try:
            code, _ = encode_option(key, value)
        except OptionError as exc:
            raise ValueError(str(exc)) from None
        if code in seen:
            raise ValueError(f"option {code} is given twice ({seen[code]!r} and {key!r})")
        seen[code] = key
        if code == 17 and isinstance(value, str):
            check_root_path(value)
    return options


class DhcpInterface(StrictModel):
    name: str = Field(..., min_length=1, max_length=15, description="network interface to serve (SO_BINDTODEVICE)")
    ipv6_ra: bool = Field(
        False,
        description="answer IPv6 Router Solicitations here with an RA that only ends iPXE's ~15 s IPv6 wait: "
        "router lifetime 0, no prefix, M and O clear (announces no router and no address)",
    )


class AddressRange(StrictModel):
    start: IPv4 = Field(..., description="first address of the pool (inclusive)")
    end: IPv4 = Field(..., description="last address of the pool (inclusive)")


class Reservation(StrictModel):
    mac: Mac
    ip: IPv4 | None = Field(None, description="fixed address (may be outside the ranges, inside the subnet)")
    hostname: str | None = Field(None, description="sent as option 12")
    target: IscsiName | None = Field(None, description="own boot target (root-path); default: clients[] / scope / boot")
    lun: int = Field(0, ge=0, le=16383)
    bootfile: str | None = Field(None, description="own bootfile for this host's iPXE stage (default: boot.script)")
    next_server: IPv4 | None = Field(None, description="own next-server (siaddr) for this host")
    options: OptionMap = Field(default_factory=dict, description=_OPTIONS_DOC + "; highest precedence")

    _opts = field_validator("options")(classmethod(lambda cls, v: validate_options(v)))


class ClientClass(StrictModel):
    """A class matches when every criterion it names matches (at least one must be named)."""

    name: str = Field(..., min_length=1)
    user_class: str | None = Field(None, description="option 77 equals this (plain or RFC 3004 encoded), e.g. iPXE, gPXE")
    vendor_class: str | None = Field(None, description="option 60 starts with this, e.g. PXEClient")
    arch: list[int] | None = Field(None, description="option 93 is one of these (0 BIOS; 6, 7, 9 EFI)")
    ipxe_options: bool | None = Field(None, description="option 175 (iPXE's features) is present (true) or absent (false)")
    bootfile: str | None = Field(None, description="bootfile (option 67 and the file field)")
    next_server: IPv4 | None = Field(None, description="next-server (siaddr)")
    options: OptionMap = Field(default_factory=dict, description=_OPTIONS_DOC)

    _opts = field_validator("options")(classmethod(lambda cls, v: validate_options(v)))

    @model_validator(mode="after")
    def _has_criterion(self) -> "ClientClass":
        if self.user_class is None and self.vendor_class is None and self.arch is None and self.ipxe_options is None:
            raise ValueError(f"class {self.name}: names no criterion (user_class, vendor_class, arch, ipxe_options)")
        return self


class Scope(StrictModel):
    name: str = Field(..., min_length=1)
    subnet: IPv4Network = Field(..., description="e.g. 10.0.0.0/24; option 1 and 28 are derived from it unless set")
    interface: str | None = Field(
        None, description="interface this scope is served on directly; None: only relayed (giaddr inside the subnet)"
    )
    ranges: list[AddressRange] = Field(default_factory=list, description="dynamic pools; none: reservations only")
    lease_time: int = Field(3600, ge=60, le=2**31, description="seconds (option 51)")
    renewal_time: int | None = Field(None, ge=1, description="seconds (option 58); default half the lease time")
    rebinding_time: int | None = Field(None, ge=1, description="seconds (option 59); default 7/8 of the lease time")
    known_clients_only: bool = Field(False, description="serve only MACs in reservations or clients[]")
    boot_target: IscsiName | None = Field(None, description="default target for iPXE clients of this scope")
    boot_lun: int = Field(0, ge=0, le=16383)
    next_server: IPv4 | None = Field(None, description="next-server (siaddr); default boot.server or our address")
    options: OptionMap = Field(default_factory=dict, description=_OPTIONS_DOC)
    reservations: list[Reservation] = Field(default_factory=list)

    _opts = field_validator("options")(classmethod(lambda cls, v: validate_options(v)))

    @model_validator(mode="after")
    def _consistent(self) -> "Scope":
        net = ipaddress.IPv4Network(self.subnet)
        for i, r in enumerate(self.ranges):
            start, end = ipaddress.IPv4Address(r.start), ipaddress.IPv4Address(r.end)
            if start > end:
                raise ValueError(f"ranges[{i}]: start {start} is after end {end}")
            for a in (start, end):
                if a not in net:
                    raise ValueError(f"ranges[{i}]: {a} is outside the subnet {net}")
                if a in (net.network_address, net.broadcast_address) and net.prefixlen < 31:
                    raise ValueError(f"ranges[{i}]: {a} is the subnet's network or broadcast address")
        macs: dict[str, int] = {}
        ips: dict[str, int] = {}
        for i, r in enumerate(self.reservations):
            if r.mac in macs:
                raise ValueError(f"reservations[{i}].mac: {r.mac} is already reserved by reservations[{macs[r.mac]}]")
            macs[r.mac] = i
            if r.ip:
                if ipaddress.IPv4Address(r.ip) not in net:
                    raise ValueError(f"reservations[{i}].ip: {r.ip} is outside the subnet {net}")
                if r.ip in ips:
                    raise ValueError(f"reservations[{i}].ip: {r.ip} is already reserved by reservations[{ips[r.ip]}]")
                ips[r.ip] = i
        t1 = self.renewal_time or self.lease_time // 2
        t2 = self.rebinding_time or self.lease_time * 7 // 8
        if not t1 < t2 <= self.lease_time:
            raise ValueError(f"renewal_time {t1} < rebinding_time {t2} <= lease_time {self.lease_time} must hold")
        return self


class DhcpConfig(StrictModel):
    mode: Literal["server", "proxy"] = Field(
        "server",
        description="server: lease addresses and answer boot clients (scopes); proxy: ProxyDHCP beside the site's "
        "own DHCP server: answer only PXE and iPXE clients, with the boot part and no address (yiaddr 0, option "
        "60 PXEClient, option 43 discovery control 8), on port 67 and on port 4011; no leases, scopes unused",
    )
    interfaces: list[DhcpInterface] = Field(default_factory=list, description="interfaces served; none by default")
    scopes: list[Scope] = Field(default_factory=list)
    classes: list[ClientClass] = Field(default_factory=list, description="user classes; applied after the built-in boot classes")
    options: OptionMap = Field(default_factory=dict, description=_OPTIONS_DOC + "; lowest precedence")
    lease_file: str = Field("dhcp-leases.sqlite", description="SQLite lease store; relative paths are under the state dir")
    durability: Literal["process", "power"] = Field(
        "process",
        description="process: a lease survives kill -9 before its ACK leaves (SQLite WAL, synchronous=NORMAL); "
        "power: also a power loss (synchronous=FULL, group commit)",
    )
    offer_hold: float = Field(30.0, gt=0, le=600, description="seconds an offered address stays held for the client")
    decline_hold: int = Field(86400, ge=1, description="seconds a DECLINEd address is quarantined")
    no_pxedhcp: bool = Field(
        True, description="send iPXE option 175.176 (no-pxedhcp): iPXE requests at once instead of waiting for ProxyDHCP"
    )
    authoritative: bool = Field(True, description="NAK a REQUEST for an address that is wrong for the client's subnet")
    unicast: Literal["arp", "broadcast"] = Field(
        "arp",
        description="replies to a client with no address and the broadcast flag clear: arp = unicast after adding "
        "an ARP entry (SIOCSARP, as dnsmasq); broadcast = always broadcast",
    )

    _opts = field_validator("options")(classmethod(lambda cls, v: validate_options(v)))

    @model_validator(mode="after")
    def _consistent(self) -> "DhcpConfig":
        names = [i.name for i in self.interfaces]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"interfaces: {name} is listed twice")
        seen: dict[str, int] = {}
        nets: list[tuple[ipaddress.IPv4Network, int]] = []
        for i, scope in enumerate(self.scopes):
            if scope.name in seen:
                raise ValueError(f"scopes[{i}].name: {scope.name} is already used by scopes[{seen[scope.name]}]")
            seen[scope.name] = i
            if scope.interface is not None and scope.interface not in names:
                raise ValueError(
                    f"scopes[{i}].interface: {scope.interface} is not in dhcp.interfaces ({', '.join(names) or 'none'})"
                )
            net = ipaddress.IPv4Network(scope.subnet)
            for other, j in nets:
                if net.overlaps(other):
                    raise ValueError(f"scopes[{i}].subnet: {net} overlaps scopes[{j}].subnet {other}")
            nets.append((net, i))
        cnames = [c.name for c in self.classes]
        for name in cnames:
            if cnames.count(name) > 1:
                raise ValueError(f"classes: {name} is defined twice")
        return self

