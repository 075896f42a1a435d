"""iSCSI names: RFC 3722 stringprep and RFC 3720 forms, in the config's canonical form."""

import pytest

from services.iscsi_target import names


@pytest.mark.parametrize("raw,want", [
    (b"iqn.2026-11.org.test:pc1", "iqn.2026-11.org.test:pc1"),
    (b"IQN.2026-11.ORG.Test:PC1", "iqn.2026-11.org.test:pc1"),        # case folded (B.2)
    ("iqn.2026-11.org.test:ﬁle".encode(), "iqn.2026-11.org.test:file"),  # NFKC: the ligature
    ("iqn.2026-11.org.test:a\u00adb".encode(), "iqn.2026-11.org.test:ab"),  # soft hyphen mapped to nothing (B.1)
    ("iqn.2026-11.org.test:é".encode(), "iqn.2026-11.org.test:é"),
    (b"eui.02004567a425678d", "eui.02004567A425678D"),                # the config's form: hex upper case
    (b"naa.52004567BA64678D0123456789ABCDEF", "naa.52004567BA64678D0123456789ABCDEF"),
])
def test_canonical(raw, want):
    assert names.canonical(raw) == want


@pytest.mark.parametrize("raw,why", [
    (b"\xc3", "UTF-8"), (b"iqn.2026-11.org.test:a b", "not allowed"), (b"iqn.2026-11.org.test:a/b", "not allowed"),
    ("iqn.2026-11.org.test:\u200e".encode(), "prohibited"),  # LEFT-TO-RIGHT MARK (C.8)
    ("iqn.2026-11.org.test:\u0627".encode(), "right-to-left"),  # an Arabic letter after left-to-right text
    ("iqn.2026-11.org.test:a\u3002b".encode(), "prohibited"),
    (b"iqn.2026-11.org.test:" + b"x" * 203, "223"), (b"", "empty"), (b"iqn.2026-00.org.x", "IQN"),
    (b"eui.12", "EUI"), (b"naa.123", "NAA"), (b"host", "iqn., eui. or naa."),
])
def test_refused(raw, why):
    with pytest.raises(names.NameError_, match=why):
        names.canonical(raw)


def test_the_ascii_fast_path_agrees_with_stringprep():
    for raw in (b"iqn.2026-11.org.test:PC-1", b"eui.0123456789ABCDEF", b"iqn.1991-05.com.microsoft:desktop-x"):
        slow = names.prepare(raw + "\u00ad".encode())  # the soft hyphen forces the full profile, then vanishes
        assert names.prepare(raw) == slow
