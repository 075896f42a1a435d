"""Client classes: which stage of the boot chain is asking, from options 77, 60, 93 and 175.

Sans-IO. The built-in answer (not left to the user) is one of:
- `ipxe`: option 77 is `iPXE` or `gPXE` (plain or RFC 3004 form) or option 175 is present: iPXE is running and
  gets its script and root-path; handing it the loader again would chainload forever.
- `pxe`: a firmware PXE ROM (option 93 present, or option 60 starting `PXEClient`): it gets the loader for its
  architecture. The loader is decided on option 93, never on the text of option 60.
- `http`: UEFI HTTP boot (option 93 = 16, x64 UEFI HTTP, and option 60 starting `HTTPClient`): it gets the EFI
  loader's http:// URL in option 67 and option 60 `HTTPClient` (UEFI spec 2.x, "HTTP Boot"), when `http.enabled`.
- `plain`: any other client: an address and the configured options, no boot fields.
User classes from the config (`dhcp.classes`) are matched as well and add their options on top.
"""

from __future__ import annotations

import struct

from services.dhcp import options as opt

IPXE_USER_CLASSES = (b"iPXE", b"gPXE")
ARCH_BIOS = 0
EFI_ARCHES = (6, 7, 9)  # IA32 EFI, x64 EFI (BC), x64 EFI (RFC 4578 / IANA processor architecture types)
ARCH_X64_HTTP = 16  # x64 UEFI HTTP boot (IANA processor architecture types)
HTTP_CLIENT = b"HTTPClient"
_ARCH = struct.Struct("!H")


class Classification:
    __slots__ = ("kind", "arch", "user_classes", "vendor_class", "has_175", "names")

    def __init__(self, kind: str, arch: int | None, user_classes: list[bytes], vendor_class: bytes, has_175: bool):
        self.kind = kind
        self.arch = arch
        self.user_classes = user_classes
        self.vendor_class = vendor_class
        self.has_175 = has_175
        self.names: tuple[str, ...] = ()  # matching configured classes, in config order

    @property
    def label(self) -> str:
        """What events call this client: the built-in kind plus the configured classes."""
        base = self.kind
        if self.kind == "pxe":
            base = "pxe-bios" if self.arch in (None, ARCH_BIOS) else f"pxe-arch{self.arch}"
            if self.arch in EFI_ARCHES:
                base = "pxe-efi"
        elif self.kind == "http":
            base = "http-efi"
        elif self.kind == "ipxe" and b"gPXE" in self.user_classes:
            base = "gpxe"
        return ",".join((base,) + self.names)


def classify(options: dict[int, bytes]) -> Classification:
    uc_raw = options.get(opt.USER_CLASS)
    user_classes = opt.user_classes(uc_raw) if uc_raw else []
    vendor = options.get(opt.VENDOR_CLASS, b"")
    arch_raw = options.get(opt.CLIENT_ARCH)
    # option 93 is a list of 16-bit types; the first is the one the client runs
    arch = _ARCH.unpack_from(arch_raw)[0] if arch_raw and len(arch_raw) >= 2 else None
    has_175 = opt.IPXE_ENCAP in options
    if has_175 or any(u in IPXE_USER_CLASSES for u in user_classes):
        kind = "ipxe"
    elif arch == ARCH_X64_HTTP and vendor.startswith(HTTP_CLIENT):
        kind = "http"
    elif arch is not None or vendor.startswith(b"PXEClient"):
        kind = "pxe"
    else:
        kind = "plain"
    return Classification(kind, arch, user_classes, vendor, has_175)


class ClassMatcher:
    """The configured classes, compiled once per configuration revision."""

    def __init__(self, classes) -> None:
        self.classes = [
            (
                c.name,
                c.user_class.encode() if c.user_class is not None else None,
                c.vendor_class.encode() if c.vendor_class is not None else None,
                frozenset(c.arch) if c.arch is not None else None,
                c.ipxe_options,
            )
            for c in classes
        ]

    def match(self, cls: Classification) -> tuple[str, ...]:
        names = []
        for name, uc, vc, arches, ipxe in self.classes:
            if uc is not None and uc not in cls.user_classes:
                continue
            if vc is not None and not cls.vendor_class.startswith(vc):
                continue
            if arches is not None and cls.arch not in arches:
                continue
            if ipxe is not None and ipxe != cls.has_175:
                continue
            names.append(name)
        return tuple(names)


def loader_for(arch: int | None, loaders) -> str | None:
    """The loader a PXE ROM of this architecture gets (config.boot.loaders), None for one we have none for."""
    if arch is None or arch == ARCH_BIOS:
        return loaders.bios
    if arch in EFI_ARCHES:
        return loaders.efi
    return None
