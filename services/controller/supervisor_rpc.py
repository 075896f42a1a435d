"""Processes through supervisord's XML-RPC interface (its unix socket in the state directory).

Each service is a supervisord program with `numprocs` slots (`dhcp:dhcp_0` ... `dhcp:dhcp_7`), none started
by supervisord itself; the controller starts as many as `scale.<service>` asks, and restarts them one by
one, so a service never goes down all at once.
"""

from __future__ import annotations

import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

RUNNING_STATES = {"RUNNING", "STARTING", "BACKOFF"}


class SupervisorError(RuntimeError):
    pass


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / "supervisor.sock"


class Supervisor:
    def __init__(self, state_dir: Path):
        self.socket = socket_path(state_dir)

    def available(self) -> bool:
        return self.socket.exists()

    def _proxy(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._proxy(), method)(*args)
        except xmlrpc.client.Fault as exc:
            raise SupervisorError(f"supervisord: {method}{args}: {exc.faultString}") from None
        except OSError as exc:
            raise SupervisorError(f"supervisord is not reachable at {self.socket}: {exc}") from None

    def processes(self) -> list[dict[str, Any]]:
        return self._call("getAllProcessInfo")

    def slots(self, service: str) -> list[dict[str, Any]]:
        """The service's process slots, in instance order."""
        procs = [p for p in self.processes() if p["group"] == service]
        return sorted(procs, key=lambda p: int(p["name"].rsplit("_", 1)[1]))

    def scale(self, service: str, count: int) -> dict[str, list[str]]:
        slots = self.slots(service)
        if not slots:
            raise SupervisorError(f"supervisord has no program {service!r}")
        if count > len(slots):
            raise SupervisorError(f"{service}: at most {len(slots)} processes (numprocs in supervisord.conf)")
        started, stopped = [], []
        for index, proc in enumerate(slots):
            name = f"{service}:{proc['name']}"
            running = proc["statename"] in RUNNING_STATES
            if index < count and not running:
                self._call("startProcess", name, True)
                started.append(name)
            elif index >= count and running:
                self._call("stopProcess", name, True)
                stopped.append(name)
        return {"started": started, "stopped": stopped}

    def restart(self, service: str, settle: float = 0.5) -> list[str]:
        """Restart each running process of the service, one after the other."""
        names = []
        for proc in self.slots(service) if service != "controller" else []:
            if proc["statename"] not in RUNNING_STATES:
                continue
            name = f"{service}:{proc['name']}"
            self._call("stopProcess", name, True)
            self._call("startProcess", name, True)
            names.append(name)
            time.sleep(settle)  # let it take its snapshot before the next one goes down
        return names
