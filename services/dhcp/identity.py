"""What a booting PC says about itself: options 97 (client machine UUID), 94 (network interface), 93 (arch).

Sans-IO, bytes in, text out, for events and `bootfleet client MAC`:
- 97 (RFC 4578 2.3, PXE spec): type 0 then 16 bytes. Shown as 8-4-4-4-12 hex of the bytes in the order they
  came (the firmware's own order: SMBIOS 2.6+ stores the first three fields little-endian, and PXE ROMs and
  iPXE copy those bytes as they are, so this is what another DHCP server's log of the same PC shows).
- 94 (RFC 4578 2.2): type 1 (UNDI) then major and minor: `undi-3.16`.
A malformed option is left out (None), never an error: it is the client's to send wrong.
"""

from __future__ import annotations

from services.dhcp import options as opt

CLIENT_NDI = 94
CLIENT_UUID = 97


def client_uuid(options: dict[int, bytes]) -> str | None:
    raw = options.get(CLIENT_UUID)
    if raw is None or len(raw) != 17 or raw[0] != 0:
        return None
    h = raw[1:].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def client_nic(options: dict[int, bytes]) -> str | None:
    raw = options.get(CLIENT_NDI)
    if raw is None or len(raw) != 3 or raw[0] != 1:
        return None
    return f"undi-{raw[1]}.{raw[2]}"


def client_arch(options: dict[int, bytes]) -> int | None:
    raw = options.get(opt.CLIENT_ARCH)
    return int.from_bytes(raw[:2], "big") if raw and len(raw) >= 2 else None


def firmware(arch: int | None) -> str | None:
    """The firmware type `bootfleet clients` shows, from option 93 (RFC 4578 / IANA processor types)."""
    if arch is None:
        return None
    if arch == 0:
        return "bios"
    if arch in (6, 7, 9):
        return "uefi"
    if arch in (15, 16):
        return "uefi-http"
    return f"arch-{arch}"
