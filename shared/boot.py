"""What a given PC boots: its target, the root-path DHCP hands it and the iPXE script TFTP renders, and where
iPXE fetches them from (TFTP, or HTTP with `boot.transport: http`).

Both the DHCP and TFTP services call these, so a client gets the same answer from either.
"""

from __future__ import annotations

from shared.config.boot import ClientAssignment
from shared.config.images import pc_name
from shared.config.model import BootfleetConfig

ISCSI_DEFAULT_PORT = 3260


def assignment_for(config: BootfleetConfig, mac: str | None = None, ip: str | None = None) -> ClientAssignment | None:
    """The `clients[]` entry for this MAC (first) or this IP, if any."""
    if mac:
        mac = mac.lower()
        for client in config.clients:
            if client.mac == mac:
                return client
    if ip:
        for client in config.clients:
            if client.ip == ip:
                return client
    return None


def pc_target_iqn(config: BootfleetConfig, client: ClientAssignment) -> str:
    """The target of a PC on an image, its own: `<boot.iqn_prefix>:<image>.<pc>` (pc: its name, else its MAC
    without colons); its root-path names it, and the iSCSI target serves the PC's disk under it."""
    return f"{config.boot.iqn_prefix}:{client.image}.{pc_name(client)}"


def pc_initiator_iqn(config: BootfleetConfig, client: ClientAssignment) -> str:
    """The initiator name a PC on an image is given (DHCP option 203, the script's `initiator-iqn`):
    `<boot.iqn_prefix>:pc.<pc>`, so its logins, ACL and statistics name the PC."""
    return f"{config.boot.iqn_prefix}:pc.{pc_name(client)}"


def target_for(config: BootfleetConfig, mac: str | None = None, ip: str | None = None) -> tuple[str, int] | None:
    """(IQN, LUN) this client boots: its assignment, else `boot.default_target` (unless `boot.unknown: menu`
    keeps it for PCs somebody configured: an unknown PC then picks from a menu), else None."""
    client = assignment_for(config, mac, ip)
    if client and client.image:  # a PC on an image boots its own target (pc_target_iqn), LUN 0
        return pc_target_iqn(config, client), 0
    if client and client.target:
        return client.target, client.lun
    if client is None and config.boot.unknown == "menu":
        return None
    if config.boot.default_target:
        return config.boot.default_target, config.boot.default_lun
    return None


def iscsi_port(config: BootfleetConfig) -> int:
    portals = getattr(config.iscsi, "portals", None) or []
    return portals[0].port if portals else ISCSI_DEFAULT_PORT


def root_path(config: BootfleetConfig, server_ip: str, mac: str | None = None, ip: str | None = None) -> str | None:
    """iPXE's `iscsi:<server>:<protocol>:<port>:<lun>:<iqn>`; empty fields take iPXE's defaults."""
    target = target_for(config, mac, ip)
    if target is None:
        return None
    return root_path_of(config, server_ip, *target)


def root_path_of(config: BootfleetConfig, server_ip: str, iqn: str, lun: int) -> str:
    server = config.boot.server or server_ip
    port = iscsi_port(config)
    port_field = "" if port == ISCSI_DEFAULT_PORT else str(port)
    lun_field = "" if lun == 0 else str(lun)
    return f"iscsi:{server}::{port_field}:{lun_field}:{iqn}"


def chap_for(config: BootfleetConfig, iqn: str) -> tuple[str, str] | None:
    """CHAP (username, secret) an initiator must present to this target, or None when anonymous works."""
    lookup = getattr(config.iscsi, "boot_credentials", None)
    return lookup(iqn) if lookup else None


def file_url(config: BootfleetConfig, server_ip: str, name: str) -> str:
    """The URL iPXE fetches `name` (a file under the TFTP root, or a rendered name) from: the TFTP service's
    HTTP listener with `boot.transport: http`, else its TFTP. `server_ip` as for `root_path`."""
    server = config.boot.server or server_ip
    if config.boot.transport == "http":
        port = config.http.port
        return f"http://{server}{'' if port == 80 else f':{port}'}/{name.lstrip('/')}"
    return f"tftp://{server}/{name.lstrip('/')}"


def script_bootfile(config: BootfleetConfig, server_ip: str) -> str:
    """What DHCP hands an iPXE client as its boot file (option 67): the script's name, fetched over TFTP from
    next-server, or with `boot.transport: http` the script's http:// URL, so iPXE chains it over HTTP."""
    if config.boot.transport == "http":
        return file_url(config, server_ip, config.boot.script)
    return config.boot.script


def ipxe_script(config: BootfleetConfig, server_ip: str, mac: str | None = None, ip: str | None = None) -> str:
    """The per-client iPXE script. A client with no target gets a script that says so and stops."""
    path = root_path(config, server_ip, mac, ip)
    lines = ["#!ipxe"]
    if path is None and config.boot.unknown == "menu" and assignment_for(config, mac, ip) is None:
        return menu_script(config, server_ip, mac or ip)
    if path is None:
        lines.append(f"echo Bootfleet: no iSCSI target is assigned to ${{net0/mac}} ({mac or ip})")
        lines.append("shell")
        return "\n".join(lines) + "\n"
    if config.boot.keep_san:
        lines.append("set keep-san 1")
    client = assignment_for(config, mac, ip)
    if client and client.image:  # as DHCP's option 203, for a PC whose lease came from another server
        lines.append(f"set initiator-iqn {pc_initiator_iqn(config, client)}")
    target = target_for(config, mac, ip)
    creds = chap_for(config, target[0]) if target else None
    if creds:
        lines.append(f"set username {creds[0]}")
        lines.append(f"set password {creds[1]}")
    if client and client.install:  # an installer disc, booted once: the PC's disk hooked as drive 0x80 (iBFT names both)
        # iPXE's autoboot has already hooked DHCP's root-path (the same disk) as 0x80 when it came with the script
        lines.append(f"iseq ${{root-path}} {path} || sanhook --drive 0x80 {path} || goto failed")
        lines.append(f"sanboot --drive 0x81 {root_path_of(config, server_ip, client.install, 0)} || goto failed")
        lines += ["exit", ":failed", "echo Bootfleet: the install boot of ${net0/mac} failed", "shell"]
        return "\n".join(lines) + "\n"
    lines.append(f"sanboot {path}")
    return "\n".join(lines) + "\n"


def menu_script(config: BootfleetConfig, server_ip: str, who: str | None) -> str:
    """`boot.unknown: menu`: what a PC nobody configured sees: its MAC and UUID, and the targets it could boot
    (each target's first LUN); `bootfleet client assign MAC --target IQN` adopts it for good."""
    who = who or "${net0/mac}"
    lines = ["#!ipxe", f"echo Bootfleet: new PC {who}: no target is assigned to it",
             f"menu Bootfleet: new PC {who} (uuid ${{uuid}})",
             f"item --gap Adopt it with: bootfleet client assign {who} --target IQN"]
    targets = [(t.name, t.luns[0].id) for t in getattr(config.iscsi, "targets", []) if t.luns]
    for n, (iqn, lun) in enumerate(targets):
        lines.append(f"item t{n} Boot {iqn}" + (f" lun {lun}" if lun else ""))
    lines += ["item shell iPXE shell", "choose --default shell selected || goto shell", "goto ${selected}"]
    if config.boot.keep_san:
        lines.insert(1, "set keep-san 1")
    for n, (iqn, lun) in enumerate(targets):
        lines += [f":t{n}", f"sanboot {root_path_of(config, server_ip, iqn, lun)} || goto shell"]
    lines += [":shell", "shell"]
    return "\n".join(lines) + "\n"
