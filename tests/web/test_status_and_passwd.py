"""`bootfleet status` says where the dashboard is, or why it is not served (a port that cannot be bound);
`bootfleet web passwd` prints a hash `web.password_hash` takes, one the web server accepts."""

import json
import socket
import subprocess

from services.controller.web.auth import check_password
from shared.config.loader import config_from_dict
from support import ROOT, free_port

from web_support import BOOTFLEET, WebStack


def test_status_shows_the_dashboard_url(procs, tmp_path):
    stack = WebStack(procs, tmp_path)
    web = stack.cli_json("status")["controller"]["web"]
    assert web == {"state": "running", "url": f"http://127.0.0.1:{stack.port}/"}
    out = stack.cli("status")
    assert out.returncode == 0, out.stderr
    controller_line = out.stdout.splitlines()[0]
    assert controller_line.startswith("controller") and f"web: http://127.0.0.1:{stack.port}/" in controller_line


def test_a_web_port_taken_shows_failed_in_status(procs, tmp_path):
    port = free_port()
    with socket.socket() as taken:  # another server on the web port
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        stack = WebStack(procs, tmp_path, {"web": {"port": port}}, web_serves=False)
        reason = f"cannot listen on 127.0.0.1:{port}: address in use"
        web = stack.cli_json("status")["controller"]["web"]
        assert web["state"] == "failed" and web["reason"].startswith(reason), web
        out = stack.cli("status")
        assert out.returncode == 0, out.stderr  # the controller runs on without its web server
        assert f"web: failed: {reason}" in out.stdout.splitlines()[0], out.stdout
        assert stack.cli_json("clients")["clients"][0]["name"] == "pc1"
    # and the reason is in the controller's log, where the stack's logs go
    assert reason in (stack.state / "log" / "controller.log").read_text()


def passwd(*args, stdin):
    return subprocess.run([BOOTFLEET, *args, "web", "passwd"], input=stdin, capture_output=True, text=True, cwd=ROOT)


def test_web_passwd_prints_a_hash_the_config_and_server_take(procs, tmp_path):
    done = passwd(stdin="a long passphrase\n")
    assert done.returncode == 0, done.stderr
    encoded = done.stdout.strip()
    assert encoded.startswith("pbkdf2_sha256$") and check_password("a long passphrase", encoded)
    assert not check_password("another passphrase", encoded)
    assert config_from_dict({"web": {"password_hash": encoded}}).web.password_hash == encoded
    again = json.loads(passwd("--json", stdin="a long passphrase\n").stdout)["password_hash"]
    assert again != encoded and check_password("a long passphrase", again)  # salted: a new hash each time
    short = passwd(stdin="short\n")
    assert short.returncode == 1 and "at least 8 characters" in short.stderr and short.stdout == ""

    # the hash configured: the password works as a bearer secret on the running web server
    stack = WebStack(procs, tmp_path, {"web": {"password_hash": encoded}})
    status, answer = stack.post("/api/config-set", {"path": "boot.default_lun", "value": 2},
                                {"Authorization": "Bearer a long passphrase"})
    assert status == 200 and answer["result"] == 0, answer
    status, _ = stack.post("/api/config-set", {"path": "boot.default_lun", "value": 1},
                           {"Authorization": "Bearer a wrong passphrase"})
    assert status == 401
