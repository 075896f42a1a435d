"""The web server over HTTP against a running controller: who may read and act, the JSON API, TLS, the stream."""

import json
import os
import socket
import ssl
import threading
import urllib.request

import pytest

from services.controller.web.auth import hash_password
from services.controller.web.server import WebServer
from shared.config.web import WebConfig
from support import free_port, self_signed, wait_for

from web_support import IP, MAC, WebStack, booted_pc


@pytest.fixture
def stack(procs, tmp_path):
    return WebStack(procs, tmp_path)


def test_loopback_reads_are_open_actions_need_the_token(stack):
    status, body = stack.get("/")
    assert status == 200 and b"pc1" in body and b"Fleet" in body
    status, answer = stack.post("/api/config-set", {"path": "boot.default_lun", "value": 3})
    assert status == 401 and answer["result"] == 1
    assert stack.cli_json("config", "get", "boot.default_lun")["value"] == 0  # nothing changed
    auth = {"Authorization": f"Bearer {stack.token}"}
    status, answer = stack.post("/api/config-set", {"path": "boot.default_lun", "value": 3}, auth)
    assert status == 200 and answer == {"result": 0, "text": "revision 2 published", "arguments": {"revision": 2}}
    assert stack.cli_json("config", "get", "boot.default_lun")["value"] == 3  # the CLI sees what the web did
    # a rejected candidate is the controller's own answer, field named
    status, answer = stack.post("/api/config-set", {"path": "boot.default_lun", "value": -1}, auth)
    assert status == 400 and "boot.default_lun" in answer["text"]
    # commands this controller lacks are answered 'unsupported' (result 2), cleanly
    status, answer = stack.post("/api/image-frobnicate", {"name": "win11"}, auth)
    assert status == 501 and answer["result"] == 2
    # GET runs only -list/-get commands; config-get shows secrets, so it needs the token even here
    assert stack.get("/api/config-set")[0] == 405
    assert stack.get("/api/config-get")[0] == 401
    status, body = stack.get("/api/config-get?path=%22boot%22", auth)
    assert status == 200 and json.loads(body)["arguments"]["path"] == "boot"


def test_api_mirrors_the_cli_and_pages_render_a_booted_pc(stack):
    stack.boot_pc()
    status, body = stack.get("/api/client-list")
    assert status == 200
    web_rows = json.loads(body)["arguments"]["clients"]
    cli_rows = stack.cli_json("clients")["clients"]
    assert [(r["mac"], r["state"], r["ip"], r["read_bytes"]) for r in web_rows] == \
        [(r["mac"], r["state"], r["ip"], r["read_bytes"]) for r in cli_rows] == [(MAC, "running", IP, 3345)]
    status, body = stack.get(f"/pc/{MAC}")
    assert status == 200 and body.count(b'class="phase"') == 5 and b"OS login" in body
    for path, text in (("/services", b"iscsi_target"), ("/events?type=iscsi", b"iscsi.first_read"), ("/images", b"no images")):
        status, body = stack.get(path)
        assert status == 200 and text in body, path
    cores = min(8, len(os.sched_getaffinity(0)))  # scale.iscsi_target's default, auto, as the controller resolves it
    assert f'<td>iscsi_target</td><td>auto ({cores})</td>'.encode() in stack.get("/services")[1]
    status, body = stack.get("/events?type=tftp")
    assert b"tftp.transfer.finished" in body and b"iscsi.first_read" not in body
    status, body = stack.get("/metrics")
    assert status == 200 and b'bootfleet_iscsi_read_bytes_total{mac="52:54:00:00:00:01",pc="pc1"} 3345.0' in body


def test_stream_pushes_new_events(stack):
    got, ready = [], threading.Event()

    def listen():
        with urllib.request.urlopen(stack.url + "/events/stream", timeout=30) as r:
            for line in r:
                if line.startswith(b": connected"):
                    ready.set()
                if line.startswith(b"data: "):
                    got.append(json.loads(line[6:]))
                    if len(got) >= 2:
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert ready.wait(20), "the stream did not open"
    stack.feeder.events(booted_pc()[:2])
    t.join(30)
    assert [e["type"] for e in got] == ["dhcp.discover", "dhcp.lease.granted"]
    # a browser reconnecting with Last-Event-ID gets what it missed
    req = urllib.request.Request(stack.url + "/events/stream", headers={"Last-Event-ID": str(got[0]["id"])})
    with urllib.request.urlopen(req, timeout=30) as r:
        line = next(line for line in r if line.startswith(b"data: "))
    assert json.loads(line[6:])["id"] == got[1]["id"]


def test_other_addresses_need_a_login_for_every_request(stack, tmp_path):
    """As on a non-loopback address: reads too need the token (or a session); the login page and assets do not."""
    web = WebServer(stack.state, WebConfig(port=free_port(), password_hash=hash_password("a long passphrase", iterations=1000)))
    web.open_reads = False
    web.start()
    try:
        base = web.url.rstrip("/")

        def get(path, headers=None):
            req = urllib.request.Request(base + path, headers=headers or {})
            opener = urllib.request.build_opener(NoRedirect)
            try:
                with opener.open(req, timeout=30) as r:
                    return r.status, r.read(), r.headers
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read(), exc.headers

        assert get("/")[0] == 303 and get("/")[2]["Location"] == "/login"
        assert get("/metrics")[0] == 401 and get("/api/client-list")[0] == 401 and get("/events/stream")[0] == 401
        assert get("/login")[0] == 200 and get("/static/app.js")[0] == 200
        bearer = {"Authorization": f"Bearer {stack.token}"}
        assert get("/metrics", bearer)[0] == 200 and get("/", bearer)[0] == 200
        # a browser: log in with the token, get a session cookie, read with it
        req = urllib.request.Request(base + "/login", data=f"secret={stack.token}".encode(), method="POST")
        try:
            urllib.request.build_opener(NoRedirect).open(req, timeout=30)
            raise AssertionError("expected a redirect")
        except urllib.error.HTTPError as exc:
            assert exc.code == 303
            cookie = exc.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        session = {"Cookie": cookie.split(";")[0]}
        status, body, _ = get("/", session)
        assert status == 200 and b"log out" in body
        # the configured password logs in too, and works as a bearer secret
        req = urllib.request.Request(base + "/login", data=b"secret=a+long+passphrase", method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.build_opener(NoRedirect).open(req, timeout=30)
        assert exc.value.code == 303 and "bootfleet_session=" in exc.value.headers["Set-Cookie"]
        assert get("/api/status-get", {"Authorization": "Bearer a long passphrase"})[0] == 200
        bad = urllib.request.Request(base + "/login", data=b"secret=wrong", method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(bad, timeout=30)
        assert exc.value.code == 401
    finally:
        web.stop()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_tls_when_a_certificate_is_configured(stack, tmp_path):
    cert, key = self_signed(tmp_path)
    web = WebServer(stack.state, WebConfig(port=free_port(), certificate=str(cert), key=str(key))).start()
    try:
        assert web.url.startswith("https://")
        # a client that never speaks TLS does not hold the server up
        idle = socket.create_connection(web.httpd.server_address[:2])
        ctx = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(web.url + "api/version-get", context=ctx, timeout=30) as r:
            assert json.loads(r.read())["arguments"]["version"]
        idle.close()
        with pytest.raises(OSError):  # plain HTTP to the TLS port: refused (reset, or a bad status line)
            urllib.request.urlopen(web.url.replace("https", "http") + "api/version-get", timeout=10).read()
        # a bearer login over TLS gets a Secure cookie
        req = urllib.request.Request(web.url + "login", data=f"secret={stack.token}".encode(), method="POST")
        opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=ctx))
        with pytest.raises(urllib.error.HTTPError) as exc:
            opener.open(req, timeout=30)
        assert "Secure" in exc.value.headers["Set-Cookie"]
    finally:
        web.stop()


def test_images_page_and_fleet_columns_from_the_image_commands(stack):
    auth = {"Authorization": f"Bearer {stack.token}"}
    status, answer = stack.post("/api/image-create", {"name": "lab", "size": "1M"}, auth)
    assert status == 200 and answer["result"] == 0, answer
    status, answer = stack.post("/api/client-assign", {"mac": MAC, "image": "lab", "mode": "persistent"}, auth)
    assert status == 200 and answer["result"] == 0, answer
    cli_row = next(c for c in stack.cli_json("clients")["clients"] if c["mac"] == MAC)
    assert (cli_row["image"], cli_row["mode"]) == ("lab", "persistent")
    status, body = stack.get("/images")
    assert status == 200 and b"<h2>lab</h2>" in body and b"1 (current)" in body and b'data-command="image-publish"' in body
    status, body = stack.get("/")
    row = body[body.index(f'data-mac="{MAC}"'.encode()):].split(b"</tr>")[0]
    assert b">lab<" in row and b">persistent<" in row
    # the controller's refusals come back as its own answers
    status, answer = stack.post("/api/image-rollback", {"name": "lab", "version": 7}, auth)
    assert status == 400 and answer["result"] == 1 and "7" in answer["text"]
    status, body = stack.get("/metrics")
    assert b'bootfleet_image_versions{image="lab"} 1.0' in body
