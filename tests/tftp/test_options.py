"""options.py: what the server answers to each option (RFC 2347/2348/2349/7440)."""

import pytest

from services.tftp.options import OptionError, OptionPolicy, negotiate

POLICY = OptionPolicy(max_blksize=1468, max_windowsize=32, default_timeout=1.5, min_timeout=1, max_timeout=10)


def test_no_options_no_oack_defaults():
    n = negotiate({}, POLICY, 1000)
    assert (n.blksize, n.windowsize, n.timeout, n.oack) == (512, 1, 1.5, {})


def test_oack_only_for_options_asked_unknown_ignored():
    n = negotiate({"blksize": "1024", "multicast": "1", "foo": "bar"}, POLICY, 1000)
    assert n.oack == {"blksize": 1024}
    assert n.blksize == 1024


def test_blksize_above_max_answered_with_max():
    n = negotiate({"blksize": "65464"}, POLICY, 10)
    assert n.blksize == 1468 and n.oack == {"blksize": 1468}


@pytest.mark.parametrize("value", ["7", "65465", "abc", "", "-1", "99999999999"])
def test_blksize_outside_rfc_range_is_error_8(value):
    with pytest.raises(OptionError, match="blksize"):
        negotiate({"blksize": value}, POLICY, 10)


def test_tsize_on_read_is_the_file_size():
    assert negotiate({"tsize": "0"}, POLICY, 123456).oack == {"tsize": 123456}


def test_tsize_on_write_is_echoed():
    n = negotiate({"tsize": "777"}, POLICY, None, writing=True)
    assert n.tsize == 777 and n.oack == {"tsize": 777}


def test_timeout_within_policy_accepted_outside_left_out():
    assert negotiate({"timeout": "5"}, POLICY, 1).oack == {"timeout": 5}
    n = negotiate({"timeout": "30"}, POLICY, 1)
    assert n.oack == {} and n.timeout == 1.5  # the server may not change it: it leaves it out
    with pytest.raises(OptionError, match="timeout"):
        negotiate({"timeout": "0"}, POLICY, 1)
    with pytest.raises(OptionError, match="timeout"):
        negotiate({"timeout": "256"}, POLICY, 1)


def test_windowsize_capped_and_checked():
    assert negotiate({"windowsize": "16"}, POLICY, 1).windowsize == 16
    n = negotiate({"windowsize": "64"}, POLICY, 1)
    assert n.windowsize == 32 and n.oack == {"windowsize": 32}
    with pytest.raises(OptionError, match="windowsize"):
        negotiate({"windowsize": "0"}, POLICY, 1)


def test_all_together_keeps_request_order_irrelevant():
    n = negotiate({"windowsize": "8", "tsize": "0", "blksize": "1432", "timeout": "2"}, POLICY, 5000)
    assert n.oack == {"blksize": 1432, "timeout": 2, "tsize": 5000, "windowsize": 8}
