"""Files rendered per client: the iPXE script under the names a booting PC may ask for.

Names (the script names are `boot.script`, default `boot.ipxe`, and `tftp.dynamic_files`):
- `<script>`: the client is the requester: its MAC from the DHCP lease of its IP (learned over the bus),
  else the `clients[]` entry with that `ip`.
- `<script>?mac=<mac>` and `<script>-<mac>`: the client named by the MAC (any of aa:bb:cc:dd:ee:ff,
  aa-bb-cc-dd-ee-ff, aabbccddeeff), as iPXE writes `${net0/mac}` or `${net0/mac:hexhyp}`.
- `pxelinux.cfg/01-aa-bb-cc-dd-ee-ff` (ARP type 1 + MAC, as pxelinux asks): rendered only when no such file
  exists under the root, so a real pxelinux tree keeps working.
A name that carries a MAC is trusted as-is (TFTP has no authentication): whoever asks for it gets that
client's script, CHAP secret included. Clients that must keep their secret should fetch `<script>`.
"""

from __future__ import annotations

from typing import Callable

from shared.boot import ipxe_script
from shared.config.base import normalize_mac
from shared.config.model import BootfleetConfig

PXELINUX_PREFIX = "pxelinux.cfg/01-"


class DynamicFiles:
    def __init__(self, config: BootfleetConfig, mac_for_ip: Callable[[str], str | None]):
        self.config = config
        self.mac_for_ip = mac_for_ip
        self.scripts = [config.boot.script, *config.tftp.dynamic_files]

    def match(self, name: str, exists: Callable[[str], bool]) -> tuple[bool, str | None]:
        """-> (is a rendered file, MAC named in the file name or None)."""
        for script in self.scripts:
            if name == script:
                return True, None
            for sep in ("?mac=", "-"):
                if name.startswith(script + sep):
                    mac = _mac(name[len(script) + len(sep):])
                    if mac:
                        return True, mac
        if self.config.tftp.pxelinux_paths and name.startswith(PXELINUX_PREFIX) and not exists(name):
            mac = _mac(name[len(PXELINUX_PREFIX):])
            if mac:
                return True, mac
        return False, None

    def render(self, name: str, client_ip: str, server_ip: str, named_mac: str | None) -> tuple[bytes, str | None]:
        """-> (file body, the MAC the script was rendered for)."""
        mac = named_mac or self.mac_for_ip(client_ip)
        return ipxe_script(self.config, server_ip, mac, client_ip).encode(), mac


def _mac(text: str) -> str | None:
    try:
        return normalize_mac(text)
    except ValueError:
        return None
