"""The `image_store` and `images` sections and clients on images (issue 13): defaults, sizes, and the
rules whose errors name the field."""

from __future__ import annotations

import pytest

from shared.boot import ipxe_script, pc_initiator_iqn, pc_target_iqn, root_path, target_for
from shared.config.images import effective_mode
from shared.config.loader import ConfigError, config_from_dict

A, B, C = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"


def cfg(clients, images=None, **extra):
    return config_from_dict({"images": images if images is not None else [{"name": "win10"}],
                             "clients": clients, **extra})


def error(clients, images=None, **extra) -> str:
    with pytest.raises(ConfigError) as info:
        cfg(clients, images, **extra)
    return str(info.value)


def test_defaults_and_sizes():
    c = cfg([{"mac": A, "image": "win10"}], images=[{"name": "win10", "quota": "10GiB", "soft_threshold": 90},
                                                    {"name": "lab.v2", "mode": "persistent"}],
            image_store={"reserve": "2GiB"})
    assert c.image_store.reserve == 2 << 30
    win10, lab = c.images
    assert (win10.mode, win10.keep_versions, win10.quota, win10.soft_threshold_bytes) == ("discard", 3, 10 << 30, 9 << 30)
    assert (lab.quota, lab.soft_threshold_bytes) == (None, None)
    assert effective_mode(c, c.clients[0]) == "discard"
    assert config_from_dict({}).images == [] and config_from_dict({}).image_store.reserve == 0


def test_mode_comes_from_the_client_else_its_image():
    c = cfg([{"mac": A, "image": "win10"}, {"mac": B, "image": "win10", "mode": "readonly"}],
            images=[{"name": "win10", "mode": "persistent"}])
    assert [effective_mode(c, x) for x in c.clients] == ["persistent", "readonly"]


def test_names_of_a_pc():
    c = cfg([{"mac": A, "name": "pc1", "image": "win10"}, {"mac": B, "image": "win10"}],
            boot={"iqn_prefix": "iqn.2027-01.lan.school"})
    pc1, anon = c.clients
    assert pc_target_iqn(c, pc1) == "iqn.2027-01.lan.school:win10.pc1"
    assert pc_initiator_iqn(c, pc1) == "iqn.2027-01.lan.school:pc.pc1"
    assert pc_target_iqn(c, anon) == "iqn.2027-01.lan.school:win10.525400000002"
    assert config_from_dict({}).boot.iqn_prefix == "iqn.2026-12.org.bootfleet"
    assert target_for(c, A) == ("iqn.2027-01.lan.school:win10.pc1", 0)
    assert root_path(c, "10.0.0.1", A) == "iscsi:10.0.0.1::::iqn.2027-01.lan.school:win10.pc1"
    script = ipxe_script(c, "10.0.0.1", A)
    assert "set initiator-iqn iqn.2027-01.lan.school:pc.pc1\n" in script
    assert script.endswith("sanboot iscsi:10.0.0.1::::iqn.2027-01.lan.school:win10.pc1\n")


@pytest.mark.parametrize("clients, images, extra, expected", [
    ([{"mac": A, "image": "nope"}], None, {}, "clients[0].image: nope is not an image in images[]"),
    ([{"mac": A, "image": "win10", "target": "iqn.2026-11.org.x:t"}], None,
     {"iscsi": {"targets": [{"name": "iqn.2026-11.org.x:t"}]}}, "clients[0].image: a client boots a target or an image, not both"),
    ([{"mac": A, "mode": "discard"}], None, {}, "clients[0].mode: a mode applies to a PC on an image"),
    ([{"mac": A, "image": "win10", "mode": "sometimes"}], None, {}, "clients.0.mode"),
    ([{"mac": A, "image": "win10", "name": "Teacher PC"}], None, {}, "clients[0].name: 'Teacher PC' cannot name a PC on an image"),
    ([{"mac": A, "image": "win10", "name": "pc1"}, {"mac": B, "image": "win10", "name": "pc1"}], None, {},
     "clients[1].name: pc1 is already the name of clients[0]"),
    ([], [{"name": "Win10"}], {}, "images.0.name"),
    ([], [{"name": "win10"}, {"name": "win10"}], {}, "images[1].name: win10 is already defined by images[0]"),
    ([], [{"name": "win10", "soft_threshold": 0}], {}, "images.0.soft_threshold"),
    ([], [{"name": "win10", "quota": "lots"}], {}, "images.0.quota"),
    ([], [{"name": "win10", "keep_versions": 0}], {}, "images.0.keep_versions"),
    ([], None, {"image_store": {"reserve": -1}}, "image_store.reserve"),
    ([{"mac": A, "image": "win10", "name": "pc1"}], None,
     {"iscsi": {"targets": [{"name": "iqn.2026-12.org.bootfleet:win10.pc1"}]}},
     "clients[0].image: the PC's target iqn.2026-12.org.bootfleet:win10.pc1 is also defined in iscsi.targets"),
    ([], None, {"boot": {"iqn_prefix": "not-an-iqn"}}, "boot.iqn_prefix"),
])
def test_errors_name_the_field(clients, images, extra, expected):
    text = error(clients, images, **extra)
    # pydantic's own field errors are named as `images[0].quota` by the loader
    assert expected.replace(".0.", "[0].") in text, text


def test_one_super_pc_per_image_the_second_is_refused_naming_the_first():
    clients = [{"mac": A, "image": "win10"}, {"mac": B, "name": "teacher", "image": "win10", "mode": "super"},
               {"mac": C, "name": "pc7", "image": "win10", "mode": "super"}]
    assert "clients[2].mode: teacher is already the super client of image win10" in error(clients)
    # the image's default counts too; another image may have its own super PC
    text = error([{"mac": A, "name": "pc7", "image": "win10"}, {"mac": B, "image": "win10"}],
                 images=[{"name": "win10", "mode": "super"}])
    assert "clients[1].mode: pc7 is already the super client of image win10" in text
    cfg([{"mac": A, "image": "win10", "mode": "super"}, {"mac": B, "image": "lab", "mode": "super"}],
        images=[{"name": "win10"}, {"name": "lab"}])
