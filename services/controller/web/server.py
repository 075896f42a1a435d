"""The controller's web server: the dashboard, the JSON API under /api/, server-sent events, /metrics.

Why a `ThreadingHTTPServer` in a thread of its own (and not an asyncio loop): the standard library parses
HTTP/1.1 for it, wraps it in TLS with `ssl`, and needs no dependency; a dashboard has a few viewers, so a
thread per connection (an open /events/stream holds one) costs nothing that matters; and every request
ends in a blocking call anyway, the control channel's REQ socket, which an asyncio loop would have to push
into threads. The controller's own loop (io_loop.py, a ZeroMQ poll loop) never waits on a browser.

One control channel: every page and every API call is a `{command, arguments}` request to the controller's
control socket, through the CLI's own client (`control_client.Control`): the same commands, handlers and answers as
`bootfleet`, no second model. Live updates: /events/stream holds an `events-wait` request (answered by the
controller when it files new events) and forwards what it gets; while the controller lacks events-wait,
it asks events-list once a second instead.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from services.controller.control_client import CliError, Control
from services.controller.web import metrics, pages
from services.controller.web.auth import COOKIE, Auth, ensure_token
from shared.config.model import SERVICES
from shared.config.web import WebConfig
from shared.paths import state_path

log = logging.getLogger("bootfleet.web")

STATIC = Path(__file__).parent / "static"
UNSUPPORTED = 2
SECRET_READS = {"config-get"}  # read commands that show secrets (CHAP): a login even on loopback
STREAM_WAIT = 20.0  # seconds an events-wait is held before the stream asks again


def read_only(command: str) -> bool:
    """The commands a GET may run: the -list and -get ones."""
    return command.endswith("-list") or command.endswith("-get") or command == "list-commands"


class WebServer:
    """One web server on one `web` configuration. `listener`: the listening socket of the server it replaces on
    the same address and port (host.py), taken over instead of bound again, so no connection is refused in
    between; `auth`: that server's logins, kept when the password and session length stay the same."""

    def __init__(self, state_dir: Path, config: WebConfig, call_timeout: float = 60.0, listener=None,
                 auth: Auth | None = None):
        self.state_dir = Path(state_dir)
        self.config = config
        self.control = Control(self.state_dir, call_timeout)
        self.stream_control = Control(self.state_dir, STREAM_WAIT + 15)
        self.auth = auth or Auth(ensure_token(self.state_dir), config.password_hash, config.session_hours * 3600)
        self.open_reads = config.loopback  # loopback: pages and read commands without a login (as Kea's agent)
        self.tls: ssl.SSLContext | None = None
        if config.tls:
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert, key = state_path(self.state_dir, config.certificate), state_path(self.state_dir, config.key)
            try:
                self.tls.load_cert_chain(cert, key)
            except OSError as exc:
                if exc.filename or isinstance(exc, ssl.SSLError):
                    raise
                # ssl's own OSError names no file: name the one that cannot be read, so the reason says which
                missing = next((p for p in (cert, key) if not os.access(p, os.R_OK)), cert)
                raise OSError(exc.errno, exc.strerror, str(missing)) from None
        self.httpd = _Server((config.address, config.port), _Handler, self, bind_and_activate=listener is None)
        if listener is not None:
            self.httpd.socket.close()
            self.httpd.socket = listener
            self.httpd.server_address = listener.getsockname()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}/"

    def start(self) -> "WebServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="web", daemon=True)
        self.thread.start()
        return self

    def stop(self, close_listener: bool = True) -> None:
        """Stop accepting (requests in flight finish; event streams end within a second or a held wait);
        `close_listener` False leaves the listening socket open for the server that takes it over."""
        self.stopping.set()
        if self.thread is not None:
            self.httpd.shutdown()
        if close_listener:
            self.httpd.server_close()

    def call(self, command: str, **arguments: Any) -> dict[str, Any]:
        """One control request; a controller that does not answer is an error answer, not an exception."""
        try:
            return self.control.call(command, **arguments)
        except CliError as exc:
            return {"result": 1, "text": str(exc), "arguments": {}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, handler, web: WebServer, bind_and_activate: bool = True):
        self.web = web
        super().__init__(address, handler, bind_and_activate)

    def finish_request(self, request, client_address):
        # TLS is negotiated here, in the connection's own thread: a slow or silent client never holds up accept()
        if self.web.tls is not None:
            request.settimeout(10)
            try:
                request = self.web.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", client_address[0], exc)
                return
            request.settimeout(None)
        self.RequestHandlerClass(request, client_address, self)

    def handle_error(self, request, client_address):
        log.debug("web request from %s failed", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "bootfleet"

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.client_address[0], *args)

    @property
    def web(self) -> WebServer:
        return self.server.web

    # -- helpers --------------------------------------------------------------------------------------------
    def send(self, status: int, body: bytes | str, content_type: str = "text/html; charset=utf-8", headers: dict | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self'; img-src 'self' data:")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, status: int, obj: Any) -> None:
        self.send(status, json.dumps(obj, default=str), "application/json")

    def session(self):
        return self.web.auth.session(self.headers.get("Cookie"), time.time())

    def page(self, title: str, body: str, status: int = 200) -> None:
        session = self.session()
        self.send(status, pages.layout(title, body, path=urlsplit(self.path).path, csrf=session.csrf if session else None,
                                       logged_in=session is not None))

    def authorised_to_read(self) -> bool:
        return self.web.open_reads or self.web.auth.may_read(self.headers, time.time())

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1 << 20:
            raise ValueError("request body over 1 MiB")
        return self.rfile.read(length) if length else b""

    # -- GET ------------------------------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        path, params = url.path, dict(parse_qsl(url.query))
        if path.startswith("/static/"):
            return self.static(path[len("/static/") :])
        if path == "/login":
            return self.page("Log in", pages.login(), 200)
        if not self.authorised_to_read():
            if path.startswith("/api/") or path in ("/metrics", "/events/stream"):
                return self.send_json(401, {"result": 1, "text": "log in first: a bearer token or password", "arguments": {}})
            return self.send(303, "", headers={"Location": "/login"})
        if path.startswith("/api/"):
            return self.api_get(unquote(path[len("/api/") :]), params)
        if path == "/metrics":
            return self.metrics()
        if path == "/events/stream":
            return self.stream(params)
        return self.route_page(path, params)

    def route_page(self, path: str, params: dict[str, str]) -> None:
        call = self.web.call
        if path == "/":
            answer = call("client-list")
            if answer.get("result") == 1:
                return self.page("Fleet", self.error_block(answer), 503)
            return self.page("Fleet", pages.fleet(answer.get("arguments") or {}, answer.get("text", "")))
        if path.startswith("/pc/"):
            mac = unquote(path[len("/pc/") :])
            detail = call("client-get", mac=mac)
            if detail.get("result") == 1:
                return self.page("PC", self.error_block(detail), 400)
            events = call("events-list", mac=mac.lower(), limit=200).get("arguments", {}).get("events") or []
            return self.page(f"PC {mac}", pages.pc(detail.get("arguments") if detail.get("result") == 0 else None, mac, events))
        if path == "/images":
            listing = call("image-list")
            clients = call("client-list").get("arguments") or {}
            if listing.get("result") == UNSUPPORTED:
                return self.page("Images", pages.images(None, clients, "this controller has no image commands yet"))
            found = []
            for row in (listing.get("arguments") or {}).get("images") or []:
                info = call("image-info", name=row["name"]) if row.get("in_store", True) else {}
                found.append({**row, **info["arguments"]["image"]} if info.get("result") == 0 else row)
            return self.page("Images", pages.images({"images": found}, clients, listing.get("text", "")))
        if path == "/services":
            status = call("status-get")
            if status.get("result") == 1:
                return self.page("Services", self.error_block(status), 503)
            scale = call("config-get", path="scale").get("arguments", {}).get("value") or {}
            return self.page("Services", pages.services(status.get("arguments") or {}, SERVICES, scale))
        if path == "/events":
            events = call("events-list", **pages.events_query(params)).get("arguments", {}).get("events") or []
            return self.page("Events", pages.events_page(events[-200:], params))
        self.page("Not found", f"<h1>Not found</h1><p>{pages.e(path)}</p>", 404)

    def error_block(self, answer: dict[str, Any]) -> str:
        return f'<h1>The controller did not answer</h1><p class="error">{pages.e(answer.get("text"))}</p>'

    def static(self, name: str) -> None:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            return self.send(404, "not found", "text/plain")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.send(200, path.read_bytes(), ctype + ("; charset=utf-8" if ctype.startswith(("text/", "application/javascript")) else ""))

    def api_get(self, command: str, params: dict[str, str]) -> None:
        if not read_only(command):
            return self.send_json(405, {"result": 1, "text": f"{command}: POST it, with the token", "arguments": {}})
        if command in SECRET_READS and not self.web.auth.may_read(self.headers, time.time()):
            return self.send_json(401, {"result": 1, "text": f"{command} shows secrets: log in first", "arguments": {}})
        args: dict[str, Any] = {}
        for k, v in params.items():
            try:
                args[k] = json.loads(v)  # numbers and booleans as JSON; anything else as the text it is
            except ValueError:
                args[k] = v
        self.send_json(200, self.web.call(command, **args))

    def metrics(self) -> None:
        call = self.web.call
        images = call("image-list")
        data = {
            "status": call("status-get").get("arguments"),
            "clients": call("client-list").get("arguments", {}).get("clients"),
            "leases": call("lease-list").get("arguments", {}).get("leases"),
            "dhcp": call("config-get", path="dhcp").get("arguments", {}).get("value"),
            "images": None if images.get("result") in (1, UNSUPPORTED) else images.get("arguments"),
        }
        self.send(200, metrics.render(data), metrics.CONTENT_TYPE)

    def stream(self, params: dict[str, str]) -> None:
        """Server-sent events: each event the controller files, as `data: {json}`, until the browser goes."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        newest = self.web.call("events-list", limit=1).get("arguments", {}).get("events") or []
        # a browser that reconnects says where it stopped (Last-Event-ID): it misses nothing in between
        resume = self.headers.get("Last-Event-ID") or params.get("after_id")
        after = int(resume) if resume and resume.isdigit() else (newest[-1]["id"] if newest else 0)
        filters = {k: params[k] for k in ("type", "mac") if params.get(k)}
        push = True
        try:
            self.wfile.write(b"retry: 2000\n: connected\n\n")
            self.wfile.flush()
            while not self.web.stopping.is_set():
                if push:
                    try:
                        answer = self.web.stream_control.call("events-wait", after_id=after, wait=STREAM_WAIT, **filters)
                    except CliError as exc:
                        answer = {"result": 1, "text": str(exc)}
                    if answer.get("result") == UNSUPPORTED:
                        push = False
                        continue
                    if answer.get("result") == 1:
                        time.sleep(2)  # the controller is restarting; the browser keeps its stream
                else:
                    time.sleep(1.0)
                    answer = self.web.call("events-list", after_id=after, limit=1000, **filters)
                events = answer.get("arguments", {}).get("events") or []
                for ev in events:
                    self.wfile.write(f"id: {ev['id']}\ndata: {json.dumps(ev, default=str)}\n\n".encode())
                    after = max(after, ev["id"])
                after = max(after, int(answer.get("arguments", {}).get("last_id") or 0))
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            return

    # -- POST -----------------------------------------------------------------------------------------------
    def do_POST(self):
        path = urlsplit(self.path).path
        try:
            raw = self.body()
        except ValueError as exc:
            return self.send_json(413, {"result": 1, "text": str(exc), "arguments": {}})
        if path == "/login":
            return self.login(raw)
        if path == "/logout":
            self.web.auth.logout(self.headers.get("Cookie"))
            return self.send(303, "", headers={"Location": "/", "Set-Cookie": f"{COOKIE}=; Path=/; Max-Age=0"})
        if not path.startswith("/api/"):
            return self.send_json(404, {"result": 1, "text": "not found", "arguments": {}})
        if not self.web.auth.may_act(self.headers, time.time()):
            return self.send_json(401, {"result": 1, "text": "an action needs a login (or the bearer token)", "arguments": {}})
        try:
            args = json.loads(raw or b"{}")
            if not isinstance(args, dict):
                raise ValueError("expected a JSON object of arguments")
        except ValueError as exc:
            return self.send_json(400, {"result": 1, "text": f"bad request: {exc}", "arguments": {}})
        command = unquote(path[len("/api/") :])
        answer = self.web.call(command, **args)
        status = 200 if answer.get("result") in (0, 3) else 501 if answer.get("result") == UNSUPPORTED else 400
        self.send_json(status, answer)

    def login(self, raw: bytes) -> None:
        form = dict(parse_qsl(raw.decode("utf-8", "replace")))
        made = self.web.auth.login(form.get("secret", ""), time.time())
        if made is None:
            time.sleep(0.5)  # a guesser gets two tries a second per connection
            return self.page("Log in", pages.login("that is neither the token nor the password"), 401)
        sid, _ = made
        secure = "; Secure" if self.web.tls else ""
        cookie = f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(self.web.auth.session_seconds)}{secure}"
        self.send(303, "", headers={"Location": "/", "Set-Cookie": cookie})
