"""files.py: the root jail (names, symlinks, directories, devices, uploads), netascii, the file cache."""

import os

import pytest

from services.tftp import packets as pk
from services.tftp.files import FileCache, Jail, Refused, check_name, from_netascii, to_netascii


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "uploads").mkdir()
    (root / "a.bin").write_bytes(b"hello")
    (root / "sub" / "b.txt").write_bytes(b"b")
    (tmp_path / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "secret", root / "out-link")
    os.symlink("sub/b.txt", root / "in-link")
    os.symlink("/etc", root / "etc-link")
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
    os.mkfifo(root / "fifo")
    return root


@pytest.mark.parametrize("name", ["../secret", "sub/../../secret", "/etc/passwd", "..\\secret", "", "a\0b"])
def test_names_that_leave_the_root(name):
    with pytest.raises(Refused) as exc:
        check_name(name)
    assert exc.value.code == pk.ERR_ACCESS


def test_reads(tree):
    jail = Jail(str(tree))
    opened = jail.open_read("a.bin")
    assert opened.size == 5 and os.pread(opened.fd, 5, 0) == b"hello"
    os.close(opened.fd)
    opened = jail.open_read("in-link")  # a symlink that stays inside is fine
    assert opened.size == 1
    os.close(opened.fd)
    opened = jail.open_read("./sub//b.txt")
    os.close(opened.fd)


@pytest.mark.parametrize(
    "name, code, words",
    [
        ("missing", pk.ERR_NOT_FOUND, "not found"),
        ("out-link", pk.ERR_ACCESS, "outside the TFTP root"),
        ("etc-link/passwd", pk.ERR_ACCESS, "outside the TFTP root"),
        ("sub", pk.ERR_ACCESS, "directory"),
        ("null", pk.ERR_ACCESS, "not a regular file"),
        ("fifo", pk.ERR_ACCESS, "not a regular file"),
        ("/a.bin", pk.ERR_ACCESS, "absolute"),
        ("../root/a.bin", pk.ERR_ACCESS, "'..'"),
    ],
)
def test_refusals(tree, name, code, words):
    with pytest.raises(Refused, match=words) as exc:
        Jail(str(tree)).open_read(name)
    assert exc.value.code == code


def test_uploads_only_into_the_upload_folder(tree):
    with pytest.raises(Refused, match="read-only"):
        Jail(str(tree)).open_write("uploads/x", False)
    jail = Jail(str(tree), "uploads")
    with pytest.raises(Refused, match="outside the upload folder"):
        jail.open_write("a.bin", True)
    with pytest.raises(Refused, match="'..'"):
        jail.open_write("uploads/../sub/x", True)
    with pytest.raises(Refused, match="outside the upload folder"):
        jail.open_write("sub/x", True)
    fd, temp, final = jail.open_write("uploads/new", False)
    os.close(fd)
    assert final == str(tree / "uploads" / "new") and os.path.dirname(temp) == str(tree / "uploads")
    (tree / "uploads" / "old").write_bytes(b"x")
    with pytest.raises(Refused) as exc:
        jail.open_write("uploads/old", False)
    assert exc.value.code == pk.ERR_EXISTS


def test_netascii_round_trip():
    text = b"line1\nline2\r\nbare\rcr\n"
    wire = to_netascii(text)
    assert wire == b"line1\r\nline2\r\0\r\nbare\r\0cr\r\n"
    assert from_netascii(wire) == text


def test_cache_shares_and_notices_changes(tree):
    cache = FileCache(max_bytes=100, max_file=50)
    fd = os.open(tree / "a.bin", os.O_RDONLY)
    first = cache.get(fd)
    assert bytes(first) == b"hello" and cache.get(fd) is first and cache.hits == 1
    os.close(fd)
    (tree / "a.bin").write_bytes(b"changed!")
    fd = os.open(tree / "a.bin", os.O_RDONLY)
    assert bytes(cache.get(fd)) == b"changed!"
    os.close(fd)
    (tree / "big").write_bytes(b"x" * 60)
    fd = os.open(tree / "big", os.O_RDONLY)
    assert cache.get(fd) is None  # larger than max_file: read from disk
    os.close(fd)


def test_install_loaders_copies_and_names_the_missing(tmp_path):
    import subprocess

    from support import ROOT

    script = ROOT / "deploy" / "install-loaders.sh"
    out = subprocess.run(["bash", str(script), str(tmp_path / "a")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for name in ("undionly.kpxe", "ipxe.efi", "snponly.efi"):  # Debian's ipxe package is a test dependency
        assert (tmp_path / "a" / name).read_bytes() == open(f"/usr/lib/ipxe/{name}", "rb").read()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "ipxe.efi").write_bytes(b"efi")
    out = subprocess.run(["bash", str(script), str(tmp_path / "b")], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "IPXE_DIR": str(fake)})
    assert out.returncode == 0 and (tmp_path / "b" / "ipxe.efi").read_bytes() == b"efi"
    assert "MISSING loader(s): undionly.kpxe snponly.efi" in out.stderr and "apt-get install ipxe" in out.stderr
