"""A two-namespace lab for the DHCP tests: server namespace and client namespace joined by a veth pair.

Nothing touches the host's interfaces: both namespaces and the veth pair are created with unique names and
deleted at teardown. `Lab.inside(ns)` moves the calling thread into a namespace while sockets are opened
there (setns(2)); the sockets stay in that namespace afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

SERVER_IP = "10.77.0.1"
CLIENT_IP = "10.77.0.2"  # the relay's address on the server's link
RELAY_IP = "10.88.0.1"  # giaddr of the relayed scope


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


class Lab:
    def __init__(self, tmp: Path):
        tag = secrets.token_hex(3)
        self.tmp = tmp
        self.srv, self.cli = f"bf-dhcp-s{tag}", f"bf-dhcp-c{tag}"
        self.srv_if, self.cli_if = f"bfds{tag}", f"bfdc{tag}"
        self.procs: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None
        self.log = tmp / "dhcp.log"

    # -- namespaces ------------------------------------------------------------------------------------------

    def up(self) -> "Lab":
        sh("ip", "netns", "add", self.srv)
        sh("ip", "netns", "add", self.cli)
        sh("ip", "link", "add", self.srv_if, "netns", self.srv, "type", "veth", "peer", "name", self.cli_if, "netns", self.cli)
        for ns, ifname in ((self.srv, self.srv_if), (self.cli, self.cli_if)):
            # no duplicate address detection: link-local addresses usable at once (the RA test)
            sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{ifname}.accept_dad=0")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.srv, "addr", "add", f"{SERVER_IP}/24", "dev", self.srv_if)
        sh("ip", "-n", self.srv, "link", "set", self.srv_if, "up")
        sh("ip", "-n", self.srv, "route", "add", "10.88.0.0/24", "via", CLIENT_IP)
        sh("ip", "-n", self.cli, "link", "set", self.cli_if, "up")
        return self

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        sh("ip", "netns", "del", self.srv, check=False)
        sh("ip", "netns", "del", self.cli, check=False)

    def add_relay_addresses(self) -> None:
        sh("ip", "-n", self.cli, "addr", "add", f"{CLIENT_IP}/24", "dev", self.cli_if)
        sh("ip", "-n", self.cli, "addr", "add", f"{RELAY_IP}/24", "dev", "lo")

    @contextlib.contextmanager
    def inside(self, ns: str):
        """Run the block with this thread in network namespace `ns` (sockets opened here stay there)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns}")
            yield
        finally:
            _libc.setns(own, CLONE_NEWNET)
            os.close(own)
            os.close(target)

    def run(self, ns: str, *args: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=timeout, check=check)

    def spawn(self, ns: str, *args: str, log: Path | None = None) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.procs.append(proc)
        return proc

    # -- the server ------------------------------------------------------------------------------------------

    def write_config(self, text: str) -> Path:
        path = self.tmp / "bootfleet.yaml"
        path.write_text(text.replace("@SRV_IF@", self.srv_if).replace("@TMP@", str(self.tmp)))
        return path

    def start_server(self, config: Path) -> subprocess.Popen:
        self.server = self.spawn(self.srv, sys.executable, "-m", "services.dhcp", "--config", str(config),
                                 "--state-dir", str(self.tmp), log=self.log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise AssertionError(f"dhcp exited with {self.server.returncode}:\n{self.log.read_text()}")
            if "serving " in self.log.read_text() or self._bound_67():
                return self.server
            time.sleep(0.05)
        raise AssertionError(f"dhcp did not start:\n{self.log.read_text()}")

    def _bound_67(self) -> bool:
        return ":67 " in self.run(self.srv, "ss", "-Huln", "sport", "=", ":67", check=False).stdout

    def stop_server(self) -> None:
        if self.server and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(10)

    def events(self, kind: str | None = None) -> list[dict]:
        """Events the standalone service logged: `event <type> k=v k=v`."""
        out = []
        for line in self.log.read_text().splitlines():
            m = re.search(r"\.event: (\S+) ?(.*)$", line)
            if not m or (kind and m.group(1) != kind):
                continue
            fields = dict(re.findall(r"(\w+)=(\S*)", m.group(2)))
            fields["type"] = m.group(1)
            out.append(fields)
        return out

    def wait_event(self, kind: str, timeout: float = 10, **match) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events(kind):
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            time.sleep(0.05)
        raise AssertionError(f"no {kind} event {match} within {timeout} s; log:\n{self.log.read_text()[-3000:]}")


def raw_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((ifname, 0))
    sock.settimeout(0.2)
    return sock
