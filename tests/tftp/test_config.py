"""The `tftp` config section: safe defaults and errors that name the field."""

import pytest

from shared.config.loader import ConfigError, config_from_dict
from shared.config.tftp import TftpConfig


def test_defaults_are_safe():
    t = TftpConfig()
    assert t.upload_dir is None and t.root == "tftp" and t.port == 69 and t.address == "0.0.0.0"
    assert t.max_blksize == 65464 and 1 <= t.max_windowsize <= 65535


@pytest.mark.parametrize(
    "section, words",
    [
        ({"upload_dir": "../elsewhere"}, "tftp.upload_dir"),
        ({"upload_dir": "/srv/up"}, "must be a folder under root"),
        ({"upload_dir": "."}, "not the root itself"),
        ({"max_blksize": 7}, "tftp.max_blksize"),
        ({"max_blksize": 65465}, "tftp.max_blksize"),
        ({"min_timeout": 10, "max_timeout": 5}, "min_timeout 10 is larger than max_timeout 5"),
        ({"address": "10.0.0.300"}, "10.0.0.300 is not an IPv4 address"),
        ({"dynamic_files": ["../x.ipxe"]}, "without .."),
        ({"max_windowsize": 0}, "tftp.max_windowsize"),
        ({"uploads": "x"}, "tftp.uploads"),
    ],
)
def test_errors_name_the_field(section, words):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"version": 1, "tftp": section})
    assert words in str(exc.value)
