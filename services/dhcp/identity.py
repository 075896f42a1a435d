"""What a booting PC says about itself: options 97 (client machine UUID), 94 (network interface), 93 (arch).

Sans-IO, bytes in, text out, for events and `bootfleet client MAC`:
- 97 (RFC 4578 2.3, PXE spec): type 0 then a 16-byte GUID, which firmware copies from SMBIOS as it is stored:
  the first three fields little-endian (SMBIOS 2.6+, EFI's GUID layout). Shown in the usual text form, those
  fields swapped back, so it reads as dmidecode, the firmware's setup screen and QEMU's `-uuid` write it
  (measured in the lab: the iPXE ROM and OVMF both send `1e0fb05e-0000-0040-...` for `-uuid 5eb00f1e-0000-4000-...`).
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
    g = raw[1:]
    return f"{g[3::-1].hex()}-{g[5:3:-1].hex()}-{g[7:5:-1].hex()}-{g[8:10].hex()}-{g[10:].hex()}"


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
