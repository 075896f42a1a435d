"""The `boot` and `clients` sections: what each PC boots, shared by DHCP (root-path) and TFTP (scripts)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.config.base import IPv4, IscsiName, Mac, StrictModel
from shared.config.images import Mode


class Loaders(StrictModel):
    """Loader file names on the TFTP root, chosen by DHCP option 93 (client architecture)."""

    bios: str = Field("undionly.kpxe", description="loader for option 93 = 0 (x86 BIOS)")
    efi: str = Field("snponly.efi", description="loader for option 93 = 6, 7, 9 (UEFI)")


class BootConfig(StrictModel):
    server: IPv4 | None = Field(
        None,
        description="address put in root-path and next-server; default: the address of the interface "
        "the DHCP request arrived on",
    )
    default_target: IscsiName | None = Field(None, description="target booted by clients with no assignment")
    default_lun: int = Field(0, ge=0, le=16383)
    script: str = Field("boot.ipxe", description="file name of the iPXE script handed to iPXE clients")
    loaders: Loaders = Field(default_factory=Loaders)
    keep_san: bool = Field(True, description="iPXE `set keep-san 1`: keep the SAN disk attached after boot")
    unknown: Literal["ignore", "default", "menu"] = Field(
        "default",
        description="what a PC in no clients[] entry (nor a DHCP reservation) gets: ignore = no answer at all (as "
        "dhcp.scopes[].known_clients_only, which still works per scope), default = boot.default_target, menu = "
        "an iPXE menu showing its MAC and the targets it could boot; it shows up in `bootfleet clients` as `new` "
        "either way, and `bootfleet client assign MAC --target IQN` adopts it",
    )
    iqn_prefix: IscsiName = Field(
        "iqn.2026-12.org.bootfleet",
        description="names of the PCs on images: target <prefix>:<image>.<pc>, initiator <prefix>:pc.<pc>",
    )
    transport: Literal["tftp", "http"] = Field(
        "tftp",
        description="how iPXE fetches the script and what the script loads: tftp, or http from the TFTP "
        "service's HTTP listener (needs http.enabled); the firmware's own PXE loads the loader over TFTP either way",
    )


class ClientAssignment(StrictModel):
    mac: Mac
    name: str | None = Field(None, description="a name for people; shown by `bootfleet clients`")
    target: IscsiName | None = Field(None, description="IQN of the target this client boots")
    lun: int = Field(0, ge=0, le=16383)
    ip: IPv4 | None = Field(None, description="address this client is known by (TFTP matches by IP too)")
    image: str | None = Field(None, description="the image this PC boots (its current version plus its own overlay)")
    mode: Mode | None = Field(None, description="discard|persistent|super|readonly|refuse; default: the image's")
    install: IscsiName | None = Field(
        None, description="a CD/DVD target (an installer ISO) this PC boots once with its own disk hooked; set by "
        "`bootfleet client install MAC ISO`, removed by the controller when the PC fetches that script")
