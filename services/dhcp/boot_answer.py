"""What a client is told about booting: the option bytes, `file` and `siaddr` of its replies. Sans-IO.

A PXE ROM gets the loader for its option 93 architecture and next-server; iPXE/gPXE gets the script and the
root-path of its assigned target (reservation, clients[], scope, boot default) and CHAP credentials if the
target has them; option 175.176 (no-pxedhcp) tells iPXE not to wait for ProxyDHCP offers (iPXE
src/net/udp/dhcp.c waits up to its ProxyDHCP timeout after a valid offer unless this flag is set or a ProxyDHCP
offer arrived). Option precedence: global < scope < built-in boot class < configured classes (in order) <
reservation. The core caches one answer per distinct (scope, class, reservation, server address, assigned MAC).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.dhcp import options as opt
from services.dhcp.classify import HTTP_CLIENT, Classification, loader_for
from services.dhcp.packet import ip_int, ip_str
from services.dhcp.scopes import ScopeRuntime, merge_options
from shared.boot import assignment_for, chap_for, pc_initiator_iqn, root_path, script_bootfile, target_for
from shared.config.boot import ClientAssignment

log = logging.getLogger("bootfleet.dhcp.boot")

ISCSI_INITIATOR_IQN = 203  # iPXE's initiator-iqn setting (it asks for 203 in its parameter request list)


def http_loader_url(config, server_ip: str) -> str | None:
    """A UEFI HTTP boot client's option 67: the EFI loader (boot.loaders.efi) over the TFTP service's HTTP
    listener, whatever boot.transport says; None (and a log line) when http.enabled is off."""
    if not config.http.enabled:
        log.warning("a UEFI HTTP boot client (option 93 = 16, HTTPClient) gets no boot answer: http.enabled is off")
        return None
    server = config.boot.server or server_ip
    port = config.http.port
    return f"http://{server}{'' if port == 80 else f':{port}'}/{config.boot.loaders.efi.lstrip('/')}"


@dataclass(frozen=True, slots=True)
class BootAnswer:
    options: bytes  # every option below encoded, in order: the reply's body after 53, 54 and the lease times
    file_field: bytes  # the header's `file`: the bootfile if it fits in 127 bytes, else empty
    siaddr: int  # next-server; 0 when there is no bootfile
    bootfile: str | None
    root_path: str | None
    option_map: dict[int, bytes]  # code -> data, for a reply that must shrink to what the client asked for


def build_boot_answer(config, scope: ScopeRuntime, cls: Classification, res, mac: str, server_address: int,
                      classes: dict) -> BootAnswer:
    """The answer for a client of `scope` classified `cls` (reservation `res` or None) asking us at
    `server_address`; `classes` are the configured client classes by name."""
    server = ip_int(config.boot.server) if config.boot.server else server_address
    merged = dict(scope.base)
    bootfile = None
    rpath = None
    if cls.kind == "pxe":
        bootfile = loader_for(cls.arch, config.boot.loaders)
    elif cls.kind == "http":
        bootfile = http_loader_url(config, ip_str(server))
        if bootfile:  # the firmware takes only an answer that says HTTPClient back
            merged[opt.VENDOR_CLASS] = HTTP_CLIENT
    elif cls.kind == "ipxe":
        bootfile = script_bootfile(config, ip_str(server_address))  # the name, or its http:// URL (boot.transport)
        if res is not None and res.target:
            boot_cfg = config.model_copy(update={"clients": [ClientAssignment(mac=mac, target=res.target, lun=res.lun)]})
        else:
            boot_cfg = scope.boot_config
        rpath = root_path(boot_cfg, ip_str(server_address), mac)
        if rpath:
            merged[opt.ROOT_PATH] = rpath.encode()
        client = assignment_for(config, mac) if res is None or not res.target else None
        if client is not None and client.image:  # its own initiator name, which its target's ACL expects
            merged[ISCSI_INITIATOR_IQN] = pc_initiator_iqn(config, client).encode()
        # built-in sub-options of 175 join (and win over) those configured at global/scope level
        subs = opt.parse_suboptions(merged.get(opt.IPXE_ENCAP, b""))
        subs[opt.IPXE_KEEP_SAN] = b"\x01" if config.boot.keep_san else b"\x00"
        target = target_for(boot_cfg, mac)
        creds = chap_for(config, target[0]) if target else None
        if creds:
            subs[190], subs[191] = creds[0].encode(), creds[1].encode()
        merged[opt.IPXE_ENCAP] = opt.join_suboptions(subs)
    if config.dhcp.no_pxedhcp:
        subs = opt.parse_suboptions(merged.get(opt.IPXE_ENCAP, b""))
        subs.setdefault(opt.IPXE_NO_PXEDHCP, b"\x01")
        merged[opt.IPXE_ENCAP] = opt.join_suboptions(subs)
    next_server = scope.cfg.next_server
    for name in cls.names:
        c = classes[name]
        merge_options(merged, c.options)
        if c.bootfile:
            bootfile = c.bootfile
        if c.next_server:
            next_server = c.next_server
    if res is not None:
        if res.hostname:
            merged[opt.HOSTNAME] = res.hostname.encode()
        merge_options(merged, res.options)
        if res.bootfile and cls.kind == "ipxe":
            bootfile = res.bootfile
        if res.next_server:
            next_server = res.next_server
    hand = merged.get(opt.BOOTFILE_NAME)
    if hand is not None and hand is not scope.base.get(opt.BOOTFILE_NAME):
        bootfile = hand.decode("utf-8", "replace")  # option 67 from a class or the reservation wins
    elif bootfile:
        merged[opt.BOOTFILE_NAME] = bootfile.encode()  # the built-in answer beats a global/scope 67
    elif hand is not None:
        bootfile = hand.decode("utf-8", "replace")
    if opt.ROOT_PATH in merged:
        rpath = merged[opt.ROOT_PATH].decode("utf-8", "replace")
    siaddr = 0
    if bootfile:
        siaddr = ip_int(next_server) if next_server else server
    file_field = bootfile.encode()[:127] if bootfile and len(bootfile.encode()) < 128 else b""
    body = b"".join(opt.tlv(code, data) for code, data in merged.items())
    return BootAnswer(body, file_field, siaddr, bootfile, rpath, merged)
