"""http_core.py: requests in, replies and events out (no sockets): names, the jail, ranges, HEAD, conditionals,
keep-alive and pipelining, errors that say nothing about the server, per-client scripts."""

import os

import pytest

from services.tftp.dynamic import DynamicFiles
from services.tftp.files import Jail
from services.tftp.events import HttpTransferFailed, HttpTransferFinished
from services.tftp.http_core import CLOSE, UNSATISFIABLE, HttpConnection, Site, parse_range, split_target
from shared.config.model import BootfleetConfig

MAC = "52:54:00:12:34:01"
IQN = "iqn.2026-11.org.example:disk0"


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "undionly.kpxe").write_bytes(bytes(range(256)) * 4)  # 1024 bytes
    (root / "sub" / "b.txt").write_bytes(b"b")
    (root / "empty").write_bytes(b"")
    (tmp_path / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "secret", root / "out-link")
    os.symlink("sub/b.txt", root / "in-link")
    os.mkfifo(root / "fifo")
    return root


def make_config():
    return BootfleetConfig.model_validate({
        "boot": {"server": "10.0.0.1"},
        "clients": [{"mac": MAC, "target": IQN, "ip": "10.0.0.50"}],
    })


def connection(root, ip="10.0.0.50", leases=None):
    leases = leases or {}
    site = Site(Jail(str(root)), DynamicFiles(make_config(), leases.get), clock=lambda: 1_800_000_000.0)
    return HttpConnection(site, (ip, 40000), "10.0.0.1")


def ask(conn, raw: bytes, now=1.0):
    """Feed bytes; -> every reply until the core needs more (files read back and closed)."""
    conn.receive(raw)
    replies = []
    while True:
        reply = conn.next_reply(now)
        if reply is None or reply is CLOSE:
            if reply is CLOSE:
                replies.append(CLOSE)
            return replies
        if reply.fd >= 0:
            reply.body_read = os.pread(reply.fd, reply.count, reply.offset)
            os.close(reply.fd)
            reply.fd = -2  # closed here; keeps `length` meaning "a file part"
        conn.done(reply, reply.count if reply.fd == -2 else len(reply.body), now + 0.5)
        replies.append(reply)
        if reply.close:
            return replies


def get(path: str, *headers: str, method="GET", version="1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: boot"] + list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def head_of(reply) -> tuple[int, dict[str, str]]:
    lines = reply.head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return status, fields


def body_of(reply) -> bytes:
    return getattr(reply, "body_read", None) if reply.fd == -2 else reply.body


# -- pure helpers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("header, size, expected", [
    (b"bytes=0-9", 100, (0, 9)),
    (b"bytes=90-", 100, (90, 99)),
    (b"bytes=-10", 100, (90, 99)),
    (b"bytes=-1000", 100, (0, 99)),  # more than there is: all of it
    (b"bytes=50-1000", 100, (50, 99)),  # past the end: clipped
    (b"bytes=99-99", 100, (99, 99)),
    (b"Bytes = 1-2", 100, (1, 2)),
    (b"bytes=100-", 100, UNSATISFIABLE),
    (b"bytes=100-200", 100, UNSATISFIABLE),
    (b"bytes=-0", 100, UNSATISFIABLE),
    (b"bytes=0-", 0, UNSATISFIABLE),
    (b"bytes=9-0", 100, None),  # last before first: invalid, ignored
    (b"bytes=0-9,20-29", 100, None),  # several ranges: the whole body
    (b"bytes=a-b", 100, None),
    (b"bytes=-", 100, None),
    (b"bytes=5", 100, None),
    (b"items=0-9", 100, None),
    (b"bytes=+1-2", 100, None),
])
def test_parse_range(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("target, expected", [
    (b"/undionly.kpxe", ("undionly.kpxe", "")),
    (b"/sub/b.txt?x=1", ("sub/b.txt", "x=1")),
    (b"/a%20b", ("a b", "")),
    (b"/%2e%2e/secret", ("../secret", "")),  # decoded, so the jail sees the '..'
    (b"//etc/passwd", ("/etc/passwd", "")),  # absolute: the jail refuses it
    (b"/boot.ipxe?mac=52%3A54%3A00%3A12%3A34%3A01", ("boot.ipxe", "mac=52:54:00:12:34:01")),
    (b"http://10.0.0.1:8069/sub/b.txt", ("sub/b.txt", "")),
    (b"http://10.0.0.1", ("", "")),
    (b"/x#frag", ("x", "")),
])
def test_split_target(target, expected):
    assert split_target(target) == expected


@pytest.mark.parametrize("target", [b"*", b"relative", b"/%ff%fe", b"/x?%ff"])
def test_split_target_refuses(target):
    with pytest.raises(ValueError):
        split_target(target)


# -- files ------------------------------------------------------------------------------------------------------

def test_get_a_file(root):
    conn = connection(root)
    [reply] = ask(conn, get("/undionly.kpxe"))
    status, h = head_of(reply)
    assert status == 200 and reply.close is False
    assert h["content-length"] == "1024" and h["accept-ranges"] == "bytes"
    assert h["content-type"] == "application/octet-stream" and h["server"] == "bootfleet"
    assert h["date"] == "Fri, 15 Jan 2027 08:00:00 GMT"
    assert h["etag"].startswith('"') and "last-modified" in h
    assert (reply.offset, reply.count) == (0, 1024) and body_of(reply) == bytes(range(256)) * 4
    [event] = conn.take_events()
    assert event == HttpTransferFinished(ip="10.0.0.50", port=40000, file="undionly.kpxe", mac=None, method="GET",
                                         status=200, bytes=1024, duration=0.5, range=None)
    assert event.type == "http.transfer.finished"


def test_head_has_the_length_and_no_body(root):
    conn = connection(root)
    [reply] = ask(conn, get("/undionly.kpxe", method="HEAD"))
    status, h = head_of(reply)
    assert status == 200 and h["content-length"] == "1024"
    assert reply.fd == -1 and reply.body == b""
    [event] = conn.take_events()
    assert event.method == "HEAD" and event.bytes == 0
    [again] = ask(conn, get("/sub/b.txt"))  # and the connection goes on
    assert head_of(again)[0] == 200


def test_a_range(root):
    conn = connection(root)
    [reply] = ask(conn, get("/undionly.kpxe", "Range: bytes=256-511"))
    status, h = head_of(reply)
    assert status == 206
    assert h["content-range"] == "bytes 256-511/1024" and h["content-length"] == "256"
    assert body_of(reply) == bytes(range(256))
    [event] = conn.take_events()
    assert event.status == 206 and event.range == "256-511" and event.bytes == 256
    [tail] = ask(conn, get("/undionly.kpxe", "Range: bytes=-4"))
    assert head_of(tail)[1]["content-range"] == "bytes 1020-1023/1024" and body_of(tail) == bytes([252, 253, 254, 255])


def test_a_range_past_the_end_is_416(root):
    conn = connection(root)
    [reply] = ask(conn, get("/undionly.kpxe", "Range: bytes=1024-"))
    status, h = head_of(reply)
    assert status == 416 and h["content-range"] == "bytes */1024"
    assert reply.body == b"416 Range Not Satisfiable\n" and reply.close is False
    [event] = conn.take_events()
    assert isinstance(event, HttpTransferFailed) and event.status == 416


def test_several_ranges_or_a_stale_if_range_get_the_whole_file(root):
    conn = connection(root)
    [whole] = ask(conn, get("/undionly.kpxe", "Range: bytes=0-1,5-6"))
    assert head_of(whole)[0] == 200 and whole.count == 1024
    etag = head_of(whole)[1]["etag"]
    [stale] = ask(conn, get("/undionly.kpxe", "Range: bytes=0-1", 'If-Range: "0-0"'))
    assert head_of(stale)[0] == 200
    [fresh] = ask(conn, get("/undionly.kpxe", "Range: bytes=0-1", f"If-Range: {etag}"))
    assert head_of(fresh)[0] == 206 and fresh.count == 2


def test_conditional_get(root):
    conn = connection(root)
    [first] = ask(conn, get("/undionly.kpxe"))
    h = head_of(first)[1]
    [same] = ask(conn, get("/undionly.kpxe", f"If-None-Match: {h['etag']}"))
    assert head_of(same)[0] == 304 and same.fd == -1 and same.body == b""
    [since] = ask(conn, get("/undionly.kpxe", f"If-Modified-Since: {h['last-modified']}"))
    assert head_of(since)[0] == 304
    [other] = ask(conn, get("/undionly.kpxe", 'If-None-Match: "other"'))
    assert head_of(other)[0] == 200


def test_an_empty_file(root):
    conn = connection(root)
    [reply] = ask(conn, get("/empty"))
    assert head_of(reply)[0] == 200 and head_of(reply)[1]["content-length"] == "0" and reply.fd == -1


# -- refusals -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, status", [
    ("/../secret", 403),
    ("/sub/../../secret", 403),
    ("/%2e%2e/secret", 403),
    ("/.%2E/secret", 403),
    ("/%2e%2e%2fsecret", 403),
    ("//etc/passwd", 403),
    ("/%2fetc/passwd", 403),
    ("/..%5csecret", 403),
    ("/out-link", 403),  # a symlink out of the root
    ("/sub", 403),  # a directory: no listings
    ("/sub/", 403),
    ("/", 403),
    ("/fifo", 403),
    ("/missing", 404),
    ("/a%00b", 403),
    ("/%ff", 400),
])
def test_names_that_leave_the_root_or_are_not_files(root, path, status):
    conn = connection(root)
    [reply] = ask(conn, get(path))
    assert head_of(reply)[0] == status
    assert reply.fd == -1
    assert b"secret" not in reply.body and str(root).encode() not in reply.body  # says nothing about the server
    assert reply.body.startswith(str(status).encode())
    [event] = conn.take_events()
    assert isinstance(event, HttpTransferFailed) and event.status == status and event.reason


def test_a_symlink_inside_the_root_is_served(root):
    [reply] = ask(connection(root), get("/in-link"))
    assert head_of(reply)[0] == 200 and body_of(reply) == b"b"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_get_405(root, method):
    conn = connection(root)
    raw = get("/undionly.kpxe", "Content-Length: 0", method=method)
    [reply] = ask(conn, raw)
    status, h = head_of(reply)
    assert status == 405 and h["allow"] == "GET, HEAD" and reply.close is False


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET /x HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /x HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS to a plain port
])
def test_malformed_requests_get_400_and_a_close(root, raw):
    conn = connection(root)
    replies = ask(conn, raw)
    assert head_of(replies[0])[0] == 400 and replies[0].close
    assert replies[0].body == b"400 Bad Request\n"
    assert conn.next_reply(2.0) is CLOSE


def test_a_huge_head_gets_431(root):
    conn = connection(root)
    [reply] = ask(conn, b"GET /x HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 20000)
    assert head_of(reply)[0] == 431 and reply.close


# -- connections ------------------------------------------------------------------------------------------------

def test_pipelined_requests_are_answered_in_order(root):
    conn = connection(root)
    replies = ask(conn, get("/sub/b.txt") + get("/missing") + get("/undionly.kpxe", "Range: bytes=0-0"))
    assert [head_of(r)[0] for r in replies] == [200, 404, 206]
    assert [e.status for e in conn.take_events()] == [200, 404, 206]


def test_keep_alive_and_close(root):
    conn = connection(root)
    [one] = ask(conn, get("/sub/b.txt"))
    assert one.close is False
    [two] = ask(conn, get("/sub/b.txt", "Connection: close"))
    assert two.close is True and head_of(two)[1]["connection"] == "close"
    old = connection(root)
    [reply] = ask(old, get("/sub/b.txt", version="1.0"))
    assert reply.close is True  # HTTP/1.0 without keep-alive
    kept = connection(root)
    [reply] = ask(kept, get("/sub/b.txt", "Connection: keep-alive", version="1.0"))
    assert reply.close is True  # h11 keeps no HTTP/1.0 connection alive; iPXE and UEFI speak 1.1


def test_the_peer_closing_ends_the_connection(root):
    conn = connection(root)
    ask(conn, get("/sub/b.txt"))
    assert ask(conn, b"") == [CLOSE]


def test_a_body_cut_short_is_a_failed_event(root):
    conn = connection(root)
    conn.receive(get("/undionly.kpxe"))
    reply = conn.next_reply(1.0)
    os.close(reply.fd)
    conn.done(reply, 100, 2.0, "Broken pipe")
    [event] = conn.take_events()
    assert event == HttpTransferFailed(ip="10.0.0.50", port=40000, file="undionly.kpxe", mac=None, status=200,
                                       reason="Broken pipe", bytes=100)


# -- scripts rendered per client ----------------------------------------------------------------------------------

def test_the_script_is_rendered_for_the_requester(root):
    conn = connection(root, ip="10.0.0.50")  # clients[] knows this IP
    [reply] = ask(conn, get("/boot.ipxe"))
    status, h = head_of(reply)
    assert status == 200 and h["cache-control"] == "no-store" and h["content-type"].startswith("text/plain")
    assert reply.body.startswith(b"#!ipxe\n") and f"sanboot iscsi:10.0.0.1::::{IQN}".encode() in reply.body
    [event] = conn.take_events()
    assert event.file == "boot.ipxe" and event.mac is None  # as over TFTP: the MAC comes from a lease or the name


def test_the_script_for_a_lease(root):
    conn = connection(root, ip="10.0.0.77", leases={"10.0.0.77": MAC})
    [reply] = ask(conn, get("/boot.ipxe"))
    assert IQN.encode() in reply.body and conn.take_events()[0].mac == MAC
    stranger = connection(root, ip="10.0.0.78")
    [reply] = ask(stranger, get("/boot.ipxe"))
    assert b"no iSCSI target is assigned" in reply.body


@pytest.mark.parametrize("path", [
    "/boot.ipxe?mac=52:54:00:12:34:01",
    "/boot.ipxe?mac=52%3A54%3A00%3A12%3A34%3A01",
    "/boot.ipxe-52-54-00-12-34-01",
    "/pxelinux.cfg/01-52-54-00-12-34-01",
])
def test_the_script_for_a_named_mac(root, path):
    conn = connection(root, ip="10.0.0.99")
    [reply] = ask(conn, get(path))
    assert head_of(reply)[0] == 200 and IQN.encode() in reply.body
    assert conn.take_events()[0].mac == MAC


def test_a_query_that_names_no_mac_is_the_plain_script(root):
    conn = connection(root, ip="10.0.0.50")
    [reply] = ask(conn, get("/boot.ipxe?arch=x64"))
    assert IQN.encode() in reply.body and conn.take_events()[0].file == "boot.ipxe"


def test_a_range_and_head_of_the_script(root):
    conn = connection(root)
    [whole] = ask(conn, get("/boot.ipxe"))
    [part] = ask(conn, get("/boot.ipxe", "Range: bytes=0-5"))
    assert head_of(part)[0] == 206 and part.body == b"#!ipxe"
    [head] = ask(conn, get("/boot.ipxe", method="HEAD"))
    assert head_of(head)[1]["content-length"] == str(len(whole.body)) and head.body == b""


def test_a_new_site_applies_to_the_next_request(root, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "new.bin").write_bytes(b"new")
    conn = connection(root)
    [reply] = ask(conn, get("/new.bin"))
    assert head_of(reply)[0] == 404
    conn.site = Site(Jail(str(other)), DynamicFiles(make_config(), lambda ip: None))
    [reply] = ask(conn, get("/new.bin"))
    assert head_of(reply)[0] == 200 and body_of(reply) == b"new"


# -- fuzz -----------------------------------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_PIECES = [get("/undionly.kpxe"), get("/boot.ipxe", "Range: bytes=0-3"), get("/../x"), get("/", method="HEAD"),
           b"GET /sub/b.txt HTTP/1.0\r\n\r\n", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
           b"GET /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"\r\n", b""]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=64)), max_size=8), st.integers(1, 7))
def test_any_bytes_get_replies_or_a_close_never_an_exception(tmp_path_factory, chunks, cut):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "undionly.kpxe").write_bytes(b"x" * 10)
    conn = connection(root)
    stream = b"".join(chunks)
    for i in range(0, len(stream) + 1, cut):  # in pieces of `cut` bytes, then the peer closes
        conn.receive(stream[i:i + cut] if i < len(stream) else b"")
        while True:
            reply = conn.next_reply(1.0)
            if reply is None or reply is CLOSE:
                break
            if reply.fd >= 0:
                os.close(reply.fd)
            conn.done(reply, 0, 1.0)
            assert reply.head.startswith(b"HTTP/1.1 ")
        if reply is CLOSE:
            break
