"""A revision that changes the `web` section restarts the dashboard inside the running controller (web/host.py):
a new port, a port taken (the old server serves on; status and an event say why), a password, TLS on the same
port (its listening socket handed over: no connection made meanwhile is refused), a certificate that does not
load (the old server serves on), and off."""

import json
import socket
import ssl
import threading
import urllib.request

from services.controller.control_client import Control
from services.controller.web.auth import hash_password
from support import free_port, self_signed, wait_for
from web_support import WebStack


def answers(url, context=None):
    try:
        with urllib.request.urlopen(url + "/api/version-get", timeout=5, context=context) as r:
            return json.loads(r.read())["result"] == 0
    except OSError:
        return False


def call(stack, command, **arguments):
    """A control request from this process (the CLI's own client; a `bootfleet` run costs a second each)."""
    answer = Control(stack.state, 20).call(command, **arguments)
    assert answer["result"] == 0, answer
    return answer["arguments"]


def web_status(stack):
    return call(stack, "status-get")["controller"]["web"]


def events_of(stack, kind):
    return call(stack, "events-list", type=kind, limit=50)["events"]


def set_web(stack, value):
    return call(stack, "config-set", path="web", value=value)["revision"]


def test_a_web_revision_restarts_the_dashboard_in_the_running_controller(procs, tmp_path):
    stack = WebStack(procs, tmp_path)
    pid = call(stack, "status-get")["controller"]["pid"]
    first = f"http://127.0.0.1:{stack.port}"

    # another port: the new server listens, the old one is gone
    port2 = free_port()
    revision = set_web(stack, {"port": port2})
    second = f"http://127.0.0.1:{port2}"
    wait_for(lambda: web_status(stack) == {"state": "running", "url": second + "/"}, timeout=15, what="the web server on the new port")
    assert answers(second) and not answers(first)
    [applied] = wait_for(lambda: events_of(stack, "web.applied"), timeout=10, what="web.applied")
    assert applied["fields"] == {"revision": revision, "state": "running", "url": second + "/"}

    # a port another program holds: the old server serves on, status and an event say why
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port3 = taken.getsockname()[1]
        revision = set_web(stack, {"port": port3})
        reason = f"cannot listen on 127.0.0.1:{port3}: address in use"
        failed = wait_for(lambda: (w := web_status(stack))["state"] == "failed" and w, timeout=15, what="web: failed")
        assert failed["reason"].startswith(reason) and failed["url"] == second + "/" and failed["revision"] == revision, failed
        assert answers(second)
        line = stack.cli("status").stdout.splitlines()[0]
        assert f"web: failed: {reason}" in line and f"(revision {revision}; {second}/ serves on)" in line, line
        [event] = events_of(stack, "web.apply_failed")
        assert event["fields"]["reason"].startswith(reason) and event["fields"]["url"] == second + "/"

    # a password, on the port now free: the server moves there and takes the password
    secret = "a long passphrase"
    set_web(stack, {"port": port3, "password_hash": hash_password(secret, iterations=1000)})
    third = f"http://127.0.0.1:{port3}"
    wait_for(lambda: web_status(stack) == {"state": "running", "url": third + "/"}, timeout=15, what="the web server on the freed port")
    assert not answers(second)
    req = urllib.request.Request(third + "/api/version-get", data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["result"] == 0  # the password is an action's login now

    # TLS on the same port, while a client keeps asking: the listening socket is handed over, nothing refused
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(cafile=str(cert))
    stop, refused, done = threading.Event(), [], []

    def ask():
        while not stop.is_set():
            try:
                socket.create_connection(("127.0.0.1", port3), timeout=5).close()
                done.append(1)
            except ConnectionRefusedError as exc:
                refused.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        set_web(stack, {"port": port3, "certificate": str(cert), "key": str(key)})
        wait_for(lambda: web_status(stack) == {"state": "running", "url": f"https://127.0.0.1:{port3}/"}, timeout=15,
                 what="the web server with TLS")
    finally:
        stop.set()
        asker.join()
    assert not refused and done, (len(refused), len(done))
    assert answers(f"https://127.0.0.1:{port3}", tls) and not answers(third)

    # a certificate that does not load: the TLS server serves on, the reason names the file
    revision = set_web(stack, {"port": port3, "certificate": str(tmp_path / "gone.pem"), "key": str(key)})
    failed = wait_for(lambda: (w := web_status(stack))["state"] == "failed" and w, timeout=15, what="web: failed")
    assert "gone.pem" in failed["reason"] and failed["url"] == f"https://127.0.0.1:{port3}/", failed
    assert answers(f"https://127.0.0.1:{port3}", tls)

    # off, and the controller is the same process throughout
    set_web(stack, {"enabled": False})
    wait_for(lambda: web_status(stack) == {"state": "off"}, timeout=15, what="the web server off")
    assert not answers(f"https://127.0.0.1:{port3}", tls)
    assert call(stack, "status-get")["controller"]["pid"] == pid
    assert [e["fields"]["state"] for e in events_of(stack, "web.applied")] == ["running", "running", "running", "off"]
