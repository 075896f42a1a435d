"""http_server.py with a real client (curl) on loopback: whole files, HEAD, ranges, keep-alive, 50 clients at
once, names that try to leave the root, the per-client script, clients that vanish, limits and timeouts."""

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402
from services.tftp.dynamic import DynamicFiles  # noqa: E402
from services.tftp.files import Jail  # noqa: E402
from services.tftp.http_core import Site  # noqa: E402
from services.tftp.http_server import HttpServer  # noqa: E402
from shared.config.model import BootfleetConfig  # noqa: E402

MAC = "52:54:00:12:34:01"
IQN = "iqn.2026-11.org.example:disk0"
CURL = shutil.which("curl")


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    assert CURL, "curl is missing (apt-get install curl): these tests need it"
    return subprocess.run([CURL, "-s", "--max-time", str(timeout), *args], capture_output=True, timeout=timeout + 5)


class Running:
    """An HttpServer in a loop of its own, in a thread (the service runs it in its main loop)."""

    def __init__(self, site: Site, **kw):
        self.loop = asyncio.new_event_loop()
        self.events: list = []
        ready = threading.Event()

        async def boot():
            self.server = HttpServer(site, self.events.append, **kw)
            self.port = self.server.listen("127.0.0.1", 0)

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(boot())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="http-test", daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def call(self, fn, *args):
        """Run fn in the server's loop; -> its result."""
        done = threading.Event()
        box = []

        def go():
            box.append(fn(*args))
            done.set()

        self.loop.call_soon_threadsafe(go)
        assert done.wait(10)
        return box[0]

    def close(self):
        self.call(self.server.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def finished(self, file: str) -> list:
        return [e for e in list(self.events) if e.type == "http.transfer.finished" and e.file == file]

    def failed(self) -> list:
        return [e for e in list(self.events) if e.type == "http.transfer.failed"]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(3 << 20) + b"end")
    (root / "sub" / "small.txt").write_bytes(b"small\n")
    (tmp_path / "secret").write_bytes(b"the secret")
    os.symlink(tmp_path / "secret", root / "out-link")
    os.symlink("/etc", root / "etc-link")
    return root


def make_site(root, leases=None, client_ip="127.0.0.1"):
    config = BootfleetConfig.model_validate({
        "boot": {"server": "10.0.0.1"},
        "clients": [{"mac": MAC, "target": IQN, "ip": client_ip}],
    })
    return Site(Jail(str(root)), DynamicFiles(config, (leases or {}).get))


@pytest.fixture
def http(tree):
    running = Running(make_site(tree))
    yield running
    running.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_whole_file(http, tree):
    got = curl("-o", "-", "-w", "", http.url("/big.bin"))
    assert got.returncode == 0 and sha(got.stdout) == sha((tree / "big.bin").read_bytes())
    support.wait_for(lambda: http.finished("big.bin"), what="the finished event")
    [event] = http.finished("big.bin")
    assert event.bytes == (3 << 20) + 3 and event.status == 200 and event.ip == "127.0.0.1"


def test_head(http):
    got = curl("-I", http.url("/big.bin"))
    head = got.stdout.decode()
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert f"Content-Length: {(3 << 20) + 3}\r\n" in head and "Accept-Ranges: bytes\r\n" in head
    assert head.endswith("\r\n\r\n")  # no body


def test_ranges(http, tree):
    data = (tree / "big.bin").read_bytes()
    got = curl("-r", "100-199", "-o", "-", "-w", "", http.url("/big.bin"))
    assert got.stdout == data[100:200]
    got = curl("-r", "-3", "-o", "-", http.url("/big.bin"))
    assert got.stdout == b"end"
    got = curl("-r", "3145000-", "-D", "-", "-o", "/dev/null", http.url("/big.bin"))
    assert b"206 Partial Content" in got.stdout and f"bytes 3145000-{len(data) - 1}/{len(data)}".encode() in got.stdout
    got = curl("-r", f"{len(data)}-", "-o", "/dev/null", "-w", "%{http_code}", http.url("/big.bin"))
    assert got.stdout == b"416"


def test_keep_alive_two_urls_on_one_connection(http, tree):
    got = curl("-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n",
               http.url("/big.bin"), http.url("/sub/small.txt"))
    assert got.stdout.decode().split("\n")[:2] == ["200 1", "200 0"]  # the second transfer made no connection
    support.wait_for(lambda: http.finished("sub/small.txt"), what="the second transfer")
    assert http.call(lambda: http.server.stats["http_connections"]) == 1


def test_hundreds_of_pipelined_requests(http):
    count = 600
    with socket.create_connection(("127.0.0.1", http.port), timeout=10) as s:
        s.sendall(b"GET /sub/small.txt HTTP/1.1\r\nHost: x\r\n\r\n" * count
                  + b"GET /sub/small.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK\r\n") == count + 1 and data.endswith(b"small\n")
    assert http.call(lambda: http.server.stats["http_internal_errors"]) == 0


def test_fifty_clients_at_once(http, tree, tmp_path):
    want = sha((tree / "big.bin").read_bytes())
    outs = [tmp_path / f"out{i}" for i in range(50)]
    procs = [subprocess.Popen([CURL, "-s", "--max-time", "60", "-o", str(out), http.url("/big.bin")])
             for out in outs]
    codes = [p.wait(70) for p in procs]
    assert codes == [0] * 50
    assert all(sha(out.read_bytes()) == want for out in outs)
    support.wait_for(lambda: len(http.finished("big.bin")) == 50, what="50 finished events")
    assert not http.failed()


@pytest.mark.parametrize("path", [
    "/../secret",
    "/sub/../../secret",
    "/%2e%2e/secret",
    "/%2E%2E%2Fsecret",
    "/..%5Csecret",
    "//etc/passwd",
    "/%2Fetc%2Fpasswd",
    "/out-link",
    "/etc-link/passwd",
])
def test_names_that_try_to_leave_the_root(http, path):
    got = curl("--path-as-is", "-o", "-", "-w", "\n%{http_code}", http.url(path))
    body, _, code = got.stdout.rpartition(b"\n")
    assert code == b"403", (path, got.stdout)
    assert b"secret" not in body and b"root:" not in body and body == b"403 Forbidden\n"


def test_no_directory_listing_and_missing_files(http):
    for path, status in (("/", b"403"), ("/sub/", b"403"), ("/sub", b"403"), ("/nothing", b"404")):
        got = curl("-o", "/dev/null", "-w", "%{http_code}", http.url(path))
        assert got.stdout == status, path
    got = curl("-X", "POST", "-d", "x", "-o", "/dev/null", "-w", "%{http_code}", http.url("/big.bin"))
    assert got.stdout == b"405"


def test_the_script_rendered_for_the_client(tree):
    running = Running(make_site(tree))  # clients[] has ip 127.0.0.1
    try:
        got = curl("-o", "-", running.url("/boot.ipxe"))
        assert got.stdout == f"#!ipxe\nset keep-san 1\nsanboot iscsi:10.0.0.1::::{IQN}\n".encode()
        got = curl("-o", "-", running.url(f"/boot.ipxe?mac={MAC}"))
        assert IQN.encode() in got.stdout
    finally:
        running.close()
    leased = Running(make_site(tree, leases={"127.0.0.1": MAC}, client_ip=None))  # known by its lease only
    try:
        got = curl("-o", "-", leased.url("/boot.ipxe"))
        assert IQN.encode() in got.stdout
        support.wait_for(lambda: leased.finished("boot.ipxe"), what="the event")
        assert leased.finished("boot.ipxe")[0].mac == MAC
    finally:
        leased.close()
    stranger = Running(make_site(tree, client_ip=None))  # nobody knows 127.0.0.1
    try:
        got = curl("-o", "-", stranger.url("/boot.ipxe"))
        assert b"no iSCSI target is assigned" in got.stdout
    finally:
        stranger.close()


def test_a_client_that_goes_away_mid_file(http, tree):
    with open(tree / "huge.bin", "wb") as f:
        f.truncate(64 << 20)  # more than the socket buffers on both sides hold
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", http.port))
        s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(1000)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    support.wait_for(lambda: http.failed(), what="the failed event")
    [event] = http.failed()
    assert event.file == "huge.bin" and 0 <= event.bytes < 64 << 20
    assert curl("-o", "/dev/null", "-w", "%{http_code}", http.url("/sub/small.txt")).stdout == b"200"
    support.wait_for(lambda: http.call(lambda: len(http.server.connections)) == 0, what="no connection left")


def test_malformed_request_gets_400_not_a_traceback(http, caplog):
    with socket.create_connection(("127.0.0.1", http.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n") and reply.endswith(b"\r\n\r\n400 Bad Request\n")
    assert "Traceback" not in caplog.text
    assert http.call(lambda: http.server.stats["http_internal_errors"]) == 0


def test_too_many_connections_get_503(tree):
    running = Running(make_site(tree), max_connections=1)
    try:
        with socket.create_connection(("127.0.0.1", running.port)):
            support.wait_for(lambda: running.call(lambda: len(running.server.connections)) == 1, what="one connection")
            got = curl("-o", "-", "-w", "\n%{http_code}", running.url("/sub/small.txt"))
            assert got.stdout == b"503 Service Unavailable\n\n503"
        support.wait_for(lambda: running.call(lambda: len(running.server.connections)) == 0, what="it closed")
        assert curl("-o", "-", running.url("/sub/small.txt")).stdout == b"small\n"
    finally:
        running.close()


def test_an_idle_connection_is_closed(tree):
    running = Running(make_site(tree), keepalive_timeout=0.3)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
            s.sendall(b"GET /sub/small.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):  # ends when the server closes the idle connection
                data += chunk
        assert data.endswith(b"\r\n\r\nsmall\n")
    finally:
        running.close()


def test_a_request_dribbled_byte_by_byte_does_not_hold_the_connection(tree):
    import time

    running = Running(make_site(tree), keepalive_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
            started = time.monotonic()
            closed = False
            for byte in b"GET /sub/small.txt HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                try:
                    s.send(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.05)  # the client's pace, not a wait for the server
                if time.monotonic() - started > 3:
                    break
            if not closed:
                s.settimeout(2)
                try:
                    closed = s.recv(100) == b""
                except OSError:
                    closed = True
            assert closed and time.monotonic() - started < 3
    finally:
        running.close()


def test_a_new_listener_keeps_connections_in_flight(http, tree):
    old_port = http.port
    with socket.create_connection(("127.0.0.1", old_port), timeout=5) as s:
        new_port = http.call(lambda: http.server.listen("127.0.0.1", 0))
        s.sendall(b"GET /sub/small.txt HTTP/1.1\r\nHost: x\r\n\r\n")  # the old connection goes on
        assert s.recv(4096).endswith(b"small\n")
    assert curl("-o", "-", f"http://127.0.0.1:{new_port}/sub/small.txt").stdout == b"small\n"
    refused = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{old_port}/sub/small.txt")
    assert refused.stdout == b"000"  # nobody listens there now


class LoopThread:
    """A loop of its own in a thread, for objects that live in the service's loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="http-test-loop", daemon=True)
        self.thread.start()

    def call(self, fn, *args):
        async def go():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def http_config(root, **http):
    return BootfleetConfig.model_validate({
        "tftp": {"root": str(root), "address": "127.0.0.1"},
        "http": {"enabled": True, "port": 0, **http},
    })


def test_the_listener_turns_on_moves_and_turns_off_without_cutting_a_reply(tree):
    from services.tftp.http_server import HttpListener

    events = []
    loop = LoopThread()
    listener = HttpListener(events.append)
    jail, dynamic = Jail(str(tree)), DynamicFiles(BootfleetConfig(), lambda ip: None)
    try:
        loop.call(listener.apply, BootfleetConfig(), jail, dynamic)  # off by default
        assert listener.server is None
        loop.call(listener.apply, http_config(tree), jail, dynamic)
        first = listener.server.port
        size = 12 << 20
        with open(tree / "huge.bin", "wb") as f:
            f.truncate(size)  # more than the socket buffers on both sides hold (tcp_wmem's largest: 4 MiB)
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that takes its time
        slow.connect(("127.0.0.1", first))
        slow.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        got = slow.recv(1000)

        free = support.free_port()
        loop.call(listener.apply, http_config(tree, port=free), jail, dynamic)  # moved: the reply goes on
        assert listener.server.port == free
        assert curl("-o", "-", f"http://127.0.0.1:{free}/sub/small.txt").stdout == b"small\n"
        assert curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{first}/").stdout == b"000"

        loop.call(listener.apply, BootfleetConfig.model_validate({"tftp": {"root": str(tree)}}), jail, dynamic)
        assert listener.server is None  # off: nobody listens, the reply still goes on
        assert loop.call(lambda: [len(s.connections) for s in listener.old]) == [1]
        assert curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{free}/").stdout == b"000"
        slow.settimeout(10)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        while chunk := slow.recv(1 << 16):  # the server closes once the reply is out (it is draining)
            got += chunk
        slow.close()
        assert len(got.partition(b"\r\n\r\n")[2]) == size
        support.wait_for(lambda: [e for e in events if e.type == "http.transfer.finished" and e.file == "huge.bin"],
                         what="the finished event")
        assert not [e for e in events if e.type == "http.transfer.failed"]
    finally:
        loop.call(listener.stop)
        loop.close()


def test_a_port_taken_is_an_error_that_names_the_field(tree):
    from services.tftp.http_server import HttpListener

    loop = LoopThread()
    listener = HttpListener(lambda e: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            with pytest.raises(OSError, match=f"^http.address/http.port: cannot listen on 127.0.0.1:{port}: "
                                              r"address in use \(another HTTP server running\?\)$"):
                loop.call(listener.apply, http_config(tree, port=port), Jail(str(tree)),
                          DynamicFiles(BootfleetConfig(), lambda ip: None))
        finally:
            loop.call(listener.stop)
            loop.close()


def test_a_client_that_stops_reading_is_cut_after_the_timeout(tree):
    with open(tree / "huge.bin", "wb") as f:
        f.truncate(64 << 20)
    running = Running(make_site(tree), keepalive_timeout=0.5)
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", running.port))
            s.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(100)  # then reads nothing more
            support.wait_for(running.failed, what="the failed event")
            [event] = running.failed()
            assert event.file == "huge.bin" and "took nothing for 0.5 s" in event.reason
            assert 0 < event.bytes < 64 << 20
            s.settimeout(5)
            with pytest.raises(ConnectionResetError):  # reset: the client cannot take a cut reply for a whole one
                while s.recv(1 << 16):
                    pass
        assert running.call(lambda: len(running.server.connections)) == 0
    finally:
        running.close()
