"""A configured scope compiled for the hot path: subnet as integers, pool slice, lease times and the option
bytes every reply of the scope starts from (global < scope). Sans-IO."""

from __future__ import annotations

import ipaddress
import struct

from services.dhcp import options as opt
from services.dhcp.allocator import Pool
from services.dhcp.packet import ip_int

_U32 = struct.Struct("!I")
_TIMES = struct.Struct("!BBIBBIBBI")  # 51, 58, 59 with their lengths


def merge_options(target: dict[int, bytes], options) -> None:
    """Configured options (name or code -> value) encoded into `target`, replacing what is there; the
    sub-options of 175 (iPXE) join those already present instead."""
    for key, value in options.items():
        code, data = opt.encode_option(key, value)
        if code == opt.IPXE_ENCAP and opt.IPXE_ENCAP in target:
            subs = opt.parse_suboptions(target[code])
            subs.update(opt.parse_suboptions(data))
            data = opt.join_suboptions(subs)
        target[code] = data


class ScopeRuntime:
    """One configured scope, compiled for the hot path."""

    def __init__(self, cfg, config, instance: int, instances: int):
        self.cfg = cfg
        self.name = cfg.name
        net = ipaddress.IPv4Network(cfg.subnet)
        self.network = int(net.network_address)
        self.mask = int(net.netmask)
        self.interface = cfg.interface
        self.reservations = {r.mac: r for r in cfg.reservations}
        self.reserved_ips = {ip_int(r.ip): r.mac for r in cfg.reservations if r.ip}
        self.pool = Pool(
            [(ip_int(r.start), ip_int(r.end)) for r in cfg.ranges], set(self.reserved_ips), instance, instances
        )
        self.lease_time = cfg.lease_time
        self.t1 = cfg.renewal_time or cfg.lease_time // 2
        self.t2 = cfg.rebinding_time or cfg.lease_time * 7 // 8
        self.times = _TIMES.pack(51, 4, self.lease_time, 58, 4, self.t1, 59, 4, self.t2)
        base: dict[int, bytes] = {1: _U32.pack(self.mask)}
        if net.prefixlen < 31:
            base[28] = _U32.pack(int(net.broadcast_address))
        merge_options(base, config.dhcp.options)
        merge_options(base, cfg.options)
        self.base = base
        # root_path() resolves clients[] then boot.default_target; the scope's default slots in as the latter
        self.boot_config = (
            config.model_copy(update={"boot": config.boot.model_copy(update={"default_target": cfg.boot_target, "default_lun": cfg.boot_lun})})
            if cfg.boot_target
            else config
        )

    def contains(self, ip: int) -> bool:
        return ip & self.mask == self.network
