"""The block, mirror and cdrom backstore keys (shared/config/iscsi.py): what is accepted, and validation
messages that name the field."""

import pytest
from pydantic import ValidationError

from shared.config.iscsi import IscsiConfig

T = "iqn.2026-11.org.test:media"


def config(**backstore):
    return IscsiConfig(targets=[{"name": T, "luns": [{"id": 0, "backstore": backstore}]}])


def leg(path, size="16MiB", **kw):
    return {"type": "file", "path": path, "size": size, **kw}


def test_accepted_forms():
    b = config(type="block", path="/dev/sdb1", direct=True).targets[0].luns[0].backstore
    assert (b.type, b.path, b.direct, b.size) == ("block", "/dev/sdb1", True, None)
    assert "block_size" not in b.model_fields_set  # the device's block size, unless given
    m = config(type="mirror", legs=[leg("a.img"), {"type": "block", "path": "/dev/sdc"}]).targets[0].luns[0].backstore
    assert [x.type for x in m.legs] == ["file", "block"]
    c = config(type="cdrom", path="isos/debian.iso").targets[0].luns[0].backstore
    assert (c.type, c.path) == ("cdrom", "isos/debian.iso")


@pytest.mark.parametrize("backstore, message", [
    ({"type": "block"}, "path: a block backstore needs a path"),
    ({"type": "block", "path": "disk.img"}, "path: a block backstore is a device under /dev/, not disk.img"),
    ({"type": "block", "path": "/dev/sdb", "size": "1GiB"}, "size: a block backstore takes its size from the device"),
    ({"type": "file", "path": "a.img", "size": 512, "direct": True}, "direct: only a block backstore"),
    ({"type": "cdrom"}, "path: a cdrom backstore needs a path"),
    ({"type": "cdrom", "path": "x.iso", "size": 4096}, "size: a cdrom backstore takes its size from the ISO image"),
    ({"type": "cdrom", "path": "x.iso", "block_size": 4096}, "block_size: a cdrom has 2048-byte blocks"),
    ({"type": "mirror"}, "legs: a mirror needs exactly two legs, got 0"),
    ({"type": "mirror", "legs": [leg("a.img")]}, "legs: a mirror needs exactly two legs, got 1"),
    ({"type": "mirror", "legs": [leg("a.img"), {"type": "cdrom", "path": "x.iso"}]},
     "legs\\[1\\].type: a mirror leg is a file, block or ram backstore, not cdrom"),
    ({"type": "mirror", "legs": [leg("a.img"), leg("b.img", "32MiB")]}, "legs\\[1\\].size: 33554432 bytes differs"),
    ({"type": "mirror", "legs": [leg("a.img"), leg("b.img", block_size=4096)]}, "legs\\[1\\].block_size: 4096 differs"),
    ({"type": "mirror", "legs": [leg("a.img"), leg("a.img")]}, "legs\\[1\\].path: both legs are a.img"),
    ({"type": "mirror", "legs": [leg("a.img"), leg("b.img", readonly=True)]}, "legs\\[1\\].readonly"),
    ({"type": "mirror", "path": "m.img", "legs": [leg("a.img"), leg("b.img")]}, "path: a mirror has no path"),
    ({"type": "mirror", "size": "16MiB", "legs": [leg("a.img"), leg("b.img")]}, "size: a mirror backstore takes"),
    ({"type": "file", "path": "a.img", "size": 512, "legs": [leg("a.img"), leg("b.img")]}, "legs: only a mirror"),
    ({"type": "mirror", "legs": [leg("a.img"), {"type": "ram"}]}, "size: a ram backstore needs a size"),
])
def test_validation_errors_name_the_field(backstore, message):
    with pytest.raises(ValidationError, match=message):
        config(**backstore)


def test_a_mirror_is_accepted_at_any_scale():
    """Only a target's owner opens its LUNs (owners.py), and a dropped leg is in the mirror's state file for
    the next owner (tests/iscsi/test_scaled.py)."""
    from shared.config.model import BootfleetConfig

    mirror = {"type": "mirror", "legs": [leg("a.img"), leg("b.img")]}
    iscsi = {"targets": [{"name": T, "luns": [{"id": 0, "backstore": mirror}]}]}
    for scale in (1, 2, 3):
        assert BootfleetConfig(iscsi=iscsi, scale={"iscsi_target": scale}).scale.iscsi_target == scale


def test_the_normalized_config_keeps_a_block_devices_block_size_its_own():
    """What the controller publishes (every default filled in) parsed again by a service: a block LUN's
    block_size stays None (the device's), not a 512 that would then count as given; others keep 512."""
    from shared.config.model import BootfleetConfig

    luns = [{"id": 0, "backstore": {"type": "block", "path": "/dev/sdb"}},
            {"id": 1, "backstore": {"type": "block", "path": "/dev/sdc", "block_size": 4096}},
            {"id": 2, "backstore": {"type": "file", "path": "a.img", "size": "1MiB"}},
            {"id": 3, "backstore": {"type": "ram", "size": "1MiB", "block_size": None}},
            {"id": 4, "backstore": {"type": "cdrom", "path": "x.iso"}},
            {"id": 5, "backstore": {"type": "mirror", "legs": [{"type": "block", "path": "/dev/sdd"},
                                                               leg("b.img", block_size=4096)]}}]
    first = BootfleetConfig.model_validate({"iscsi": {"targets": [{"name": T, "luns": luns}]}})
    published = first.model_dump(mode="json")
    again = BootfleetConfig.model_validate(published).iscsi.targets[0].luns
    assert [lun.backstore.block_size for lun in again] == [None, 4096, 512, 512, 512, 512]
    assert [leg.block_size for leg in again[5].backstore.legs] == [None, 4096]
    assert BootfleetConfig.model_validate(published).model_dump(mode="json") == published
