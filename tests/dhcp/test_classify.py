"""Client classes: options 77 (both forms), 60, 93, 175."""

import pytest

from services.dhcp.classify import ClassMatcher, classify, loader_for
from shared.config.boot import Loaders
from shared.config.dhcp import ClientClass


@pytest.mark.parametrize(
    "options,kind,arch,label",
    [
        ({60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00"}, "pxe", 0, "pxe-bios"),
        ({60: b"PXEClient:Arch:00007:UNDI:003016", 93: b"\x00\x07"}, "pxe", 7, "pxe-efi"),
        ({60: b"PXEClient:Arch:00000:UNDI:002001"}, "pxe", None, "pxe-bios"),
        ({77: b"iPXE", 93: b"\x00\x00"}, "ipxe", 0, "ipxe"),
        ({77: b"\x04iPXE"}, "ipxe", None, "ipxe"),
        ({77: b"gPXE"}, "ipxe", None, "gpxe"),
        ({77: b"\x04gPXE"}, "ipxe", None, "gpxe"),
        ({175: b"\x13\x01\x01"}, "ipxe", None, "ipxe"),
        ({77: b"MSFT 5.0"}, "plain", None, "plain"),
        ({}, "plain", None, "plain"),
    ],
)
def test_builtin_kinds(options, kind, arch, label):
    cls = classify(options)
    assert (cls.kind, cls.arch, cls.label) == (kind, arch, label)


def test_configured_classes_match_every_criterion_they_name():
    m = ClassMatcher([
        ClientClass(name="gpxe", user_class="gPXE"),
        ClientClass(name="pxe", vendor_class="PXEClient"),
        ClientClass(name="efi", arch=[6, 7, 9]),
        ClientClass(name="ipxe-efi", ipxe_options=True, arch=[7]),
        ClientClass(name="no-ipxe", ipxe_options=False),
    ])
    assert m.match(classify({77: b"\x04gPXE"})) == ("gpxe", "no-ipxe")
    assert m.match(classify({60: b"PXEClient:Arch:00007", 93: b"\x00\x07"})) == ("pxe", "efi", "no-ipxe")
    assert m.match(classify({175: b"", 93: b"\x00\x07"})) == ("efi", "ipxe-efi")


def test_loader_by_architecture():
    loaders = Loaders()
    assert loader_for(0, loaders) == "undionly.kpxe"
    assert loader_for(None, loaders) == "undionly.kpxe"
    assert [loader_for(a, loaders) for a in (6, 7, 9)] == ["snponly.efi"] * 3
    assert loader_for(11, loaders) is None
