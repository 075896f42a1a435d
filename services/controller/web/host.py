"""The controller's web server across revisions: the one server.py runs, in step with the `web` section.

`WebHost.apply(config, revision)` starts the server the section asks for at the controller's start, and again
when a revision changes the section (address, port, TLS, password, session length, off or on), without a
controller restart:
- on the same address and port the new server takes over the old one's listening socket (connections that
  arrive in between wait in its backlog: none is refused), and keeps its logins unless the password or the
  session length changed;
- on another address or port the new one is bound first, and the old one stops only once it listens;
- a new server that cannot start (the port taken, a certificate that does not load) changes nothing: the old
  one serves on with its settings, and `status` says `failed: <reason>` with the URL that is still served,
  as a service that cannot apply a revision does.
It runs off the controller's loop (an executor of its own, io_loop.py); what it returns is what `status-get`
shows (`controller.web`) and the event the controller files (`web.applied` or `web.apply_failed`).
"""

from __future__ import annotations

import logging
import ssl
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from services.controller.web.server import WebServer
from shared.config.web import WebConfig
from shared.failures import listen_reason, reason

log = logging.getLogger("bootfleet.web")


def failure(exc: Exception, config: WebConfig) -> str:
    """Why a server on `config` could not start, as one sentence."""
    if isinstance(exc, ssl.SSLError):
        return f"web.certificate/web.key: {exc.reason or exc}"
    # the bind is the one step that names no file; a certificate or key that cannot be read names its own
    if isinstance(exc, OSError) and not exc.filename:
        return listen_reason(config.address, config.port, exc, "web")
    return reason(exc)


class WebHost:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.server: WebServer | None = None
        self.status: dict[str, Any] = {"state": "off"}
        self._applied: WebConfig | None = None  # the section last asked for
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="web-host")

    def submit(self, config: WebConfig, revision: int | None = None) -> Future:
        """`apply` in the host's own thread: the controller's loop never waits on a bind or a shutdown."""
        return self._executor.submit(self.apply, config, revision)

    def apply(self, config: WebConfig, revision: int | None = None) -> dict[str, Any]:
        """Run the server `config` asks for; returns the status (`{state: running, url}`, `{state: off}`, or
        `{state: failed, reason, revision, url?}`, the url being the old server's when it serves on)."""
        with self._lock:
            if config == self._applied:
                return self.status
            self._applied = config
            self.status = self._apply(config, revision)
            return self.status

    def _apply(self, config: WebConfig, revision: int | None) -> dict[str, Any]:
        old = self.server
        if not config.enabled:
            if old is not None:
                old.stop()
                self.server = None
                log.info("web: turned off (was %s)", old.url)
            return {"state": "off"}
        if old is not None and old.config == config:
            return {"state": "running", "url": old.url}  # back to the settings it serves with (after a failure)
        same_place = old is not None and (old.config.address, old.config.port) == (config.address, config.port)
        same_logins = old is not None and (old.config.password_hash, old.config.session_hours) == (
            config.password_hash, config.session_hours)
        try:
            new = WebServer(self.state_dir, config, listener=old.httpd.socket if same_place else None,
                            auth=old.auth if same_logins else None)
        except (OSError, ssl.SSLError) as exc:
            why = failure(exc, config)
            failed: dict[str, Any] = {"state": "failed", "reason": why}
            if revision is not None:
                failed["revision"] = revision
            if old is not None:
                failed["url"] = old.url
                log.error("web: %s (the web server on %s serves on with the previous settings)", why, old.url)
            else:
                log.error("web: %s (the dashboard and /metrics are off)", why)
            return failed
        if old is not None:
            old.stop(close_listener=not same_place)
        self.server = new.start()
        log.info("web: dashboard at %s (actions need the token in %s)%s", new.url, self.state_dir / "web-token",
                 " (restarted)" if old is not None else "")
        if not config.loopback and not config.tls:
            log.warning("web: %s is not a loopback address and no web.certificate is set: the token or password "
                        "crosses the network in clear", config.address)
        return {"state": "running", "url": new.url}

    def stop(self) -> None:
        with self._lock:
            if self.server is not None:
                self.server.stop()
                self.server = None
        self._executor.shutdown(wait=False, cancel_futures=True)
