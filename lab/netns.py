"""The lab network: a namespace of its own per run, a bridge with the server address, a tap device per PC.

Nothing here touches the host's interfaces: the bridge, the taps and every server live inside the namespace,
and `Lab.close()` (also called on failure, by `with Lab() as lab:`) stops what was started in it, by PID, then
deletes the namespace, which takes the bridge and the taps with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

SERVER_IP = "10.77.0.1"
SITE_IP = "10.77.0.2"  # the site's own DHCP server (another host on the LAN) in the ProxyDHCP runs
PREFIX = 24
NETWORK = "10.77.0.0/24"
BRIDGE = "br0"


class LabError(RuntimeError):
    pass


def check_tools() -> list[str]:
    missing = []
    if shutil.which("ip") is None:
        missing.append("ip (Debian package iproute2)")
    if os.geteuid() != 0:
        missing.append("root (network namespaces and tap devices need CAP_NET_ADMIN)")
    return missing


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Lab:
    """A namespace `bf-<random>` with bridge `br0` (SERVER_IP/24) and taps `tap0`, `tap1`, ..."""

    def __init__(self, prefix: str = "bf") -> None:
        missing = check_tools()
        if missing:
            raise LabError("cannot build the lab; missing: " + "; ".join(missing))
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.taps: list[str] = []
        self.hosts: list[str] = []  # namespaces of other hosts on the LAN (add_host)
        self._procs: list[subprocess.Popen] = []
        self._up = False

    def __enter__(self) -> "Lab":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def up(self) -> None:
        _ip("netns", "add", self.name)
        self._up = True
        try:
            self._ns_ip("link", "set", "lo", "up")
            self._ns_ip("link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
            self._ns_ip("addr", "add", f"{SERVER_IP}/{PREFIX}", "dev", BRIDGE)
            self._ns_ip("link", "set", BRIDGE, "up")
        except BaseException:
            self.close()
            raise

    def _ns_ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    def add_tap(self) -> str:
        """A new tap device on the bridge, for one PC's NIC."""
        tap = f"tap{len(self.taps)}"
        self._ns_ip("tuntap", "add", "dev", tap, "mode", "tap")
        self._ns_ip("link", "set", tap, "master", BRIDGE)
        self._ns_ip("link", "set", tap, "up")
        self.taps.append(tap)
        return tap

    def add_host(self, label: str, address: str) -> str:
        """Another host on the LAN, e.g. the site's own DHCP server: a namespace `<lab>-<label>` whose `eth0`
        (address/24) is a veth pair's end, the other end on the bridge. `close()` deletes it. -> its name."""
        ns = f"{self.name}-{label}"
        _ip("netns", "add", ns)
        self.hosts.append(ns)
        port = f"v{label}"[:15]
        self._ns_ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ns_ip("link", "set", port, "master", BRIDGE)
        self._ns_ip("link", "set", port, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{address}/{PREFIX}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        return ns

    def exec_args(self, cmd: list[str], ns: str | None = None) -> list[str]:
        return ["ip", "netns", "exec", ns or self.name, *cmd]

    def run(self, cmd: list[str], ns: str | None = None, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.exec_args(cmd, ns), **kwargs)

    def popen(self, cmd: list[str], log: Path | None = None, env: dict | None = None, ns: str | None = None,
              **kwargs) -> subprocess.Popen:
        """Start a server inside the namespace (or host `ns`); `close()` stops it. Output goes to `log` if given."""
        if log is not None:
            out = open(log, "ab")
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(self.exec_args(cmd, ns), stdin=subprocess.DEVNULL, env=env, **kwargs)
        if log is not None:
            out.close()
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def _stop_leftovers(self, ns: str) -> None:
        """Processes still in the namespace (children of a server that was killed) were started by this lab:
        stop them by PID before the namespace goes, so none outlives the run."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            pids = [int(p) for p in done.stdout.split() if p.isdigit()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
                time.sleep(0.1)

    def close(self) -> None:
        """Stop every process started here (by PID), then delete the namespace. Safe to call twice."""
        for proc in reversed(self._procs):
            try:
                self.stop(proc)
            except Exception:
                pass
        self._procs.clear()
        if self._up:
            for ns in [*self.hosts, self.name]:
                self._stop_leftovers(ns)
                for _ in range(20):
                    done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
                    if done.returncode == 0 or "No such file" in done.stderr:
                        break
                    time.sleep(0.25)  # a process still holding the namespace: wait for it to go
            self.hosts.clear()
            self._up = False
