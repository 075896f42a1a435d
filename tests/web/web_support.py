"""A controller with its web server for the web tests, and synthetic events of a booted PC fed into it through
the events socket, as the services would send them (`import web_support`: tests/web is put on sys.path)."""

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
import yaml
import zmq

from shared.bus import message as m
from support import PYTHON, ROOT, free_port, wait_for

BOOTFLEET = str(Path(PYTHON).parent / "bootfleet")
SUPERVISORD = str(Path(PYTHON).parent / "supervisord")
ARTIFACTS = ROOT / "var" / "test-artifacts" / "web"
MAC, IP, TARGET = "52:54:00:00:00:01", "10.77.0.100", "iqn.2026-11.org.bootfleet:demo"


def booted_pc(mac=MAC, ip=IP, t0=None):
    """The events of one PC's boot, as (seconds after t0, type, fields): DHCP, TFTP, firmware login, first READ,
    the OS's login, then its I/O statistics (3345 bytes read, 512 written)."""
    t0 = time.time() - 5 if t0 is None else t0
    steps = [
        (0.0, "dhcp.discover", {"mac": mac}),
        (0.4, "dhcp.lease.granted", {"mac": mac, "ip": ip, "expires": t0 + 3600, "scope": "lab"}),
        (0.9, "tftp.transfer.finished", {"ip": ip, "file": "undionly.kpxe", "bytes": 70000}),
        (1.1, "tftp.transfer.finished", {"ip": ip, "file": "boot.ipxe", "bytes": 90}),
        (1.5, "iscsi.login", {"ip": ip, "mac": mac, "initiator": "iqn.2010-04.org.ipxe:pc1", "target": TARGET, "session_type": "Normal"}),
        (1.6, "iscsi.first_read", {"ip": ip, "mac": mac, "initiator": "iqn.2010-04.org.ipxe:pc1", "target": TARGET, "tsih": 1, "lun": 0}),
        (3.9, "iscsi.login", {"ip": ip, "mac": mac, "initiator": "iqn.1993-08.org.debian:01:pc1", "target": TARGET, "session_type": "Normal"}),
        (4.0, "iscsi.io_stats", {"ip": ip, "mac": mac, "initiator": "iqn.1993-08.org.debian:01:pc1", "target": TARGET, "tsih": 2,
                                 "lun": 0, "reads": 10, "writes": 1, "others": 2, "read_bytes": 1000, "write_bytes": 512,
                                 "latency_us_avg": 180.0}),
        (4.5, "iscsi.io_stats", {"ip": ip, "mac": mac, "initiator": "iqn.1993-08.org.debian:01:pc1", "target": TARGET, "tsih": 2,
                                 "lun": 0, "reads": 20, "writes": 0, "others": 0, "read_bytes": 2345, "write_bytes": 0,
                                 "latency_us_avg": 3200.0}),
    ]
    return [(t0 + dt, type_, fields) for dt, type_, fields in steps]


SERVICE_OF = {"dhcp": "dhcp", "tftp": "tftp", "iscsi": "iscsi_target"}


class Feeder:
    """Pushes `event` and `beat` messages into the controller's events socket (PUSH → its PULL)."""

    def __init__(self, state: Path):
        self.sock = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.linger = 2000
        self.sock.connect(f"ipc://{state / 'bus' / 'events.sock'}")
        self.pid = 4_000_000  # no such process: rows of these are the synthetic services'

    def event(self, ts, type_, fields, instance=0):
        service = SERVICE_OF[type_.split(".")[0]]
        self.sock.send(m.pack(m.EVENT, service=service, instance=instance, pid=self.pid, ts=ts, type=type_, fields=fields))

    def events(self, items):
        for ts, type_, fields in items:
            self.event(ts, type_, fields)

    def beat(self, service, counters, revision=1, instance=0, emitted=0):
        self.sock.send(m.pack(m.BEAT, service=service, instance=instance, pid=self.pid, started=time.time() - 10,
                              revision=revision, emitted=emitted, dropped=0, counters=counters, controller=True))

    def close(self):
        self.sock.close()


class WebStack:
    """A controller (alone, or under supervisord with the real DHCP service) whose web server listens on a free
    loopback port."""

    def __init__(self, procs, tmp_path, config=None, supervised=False, web_serves=True):
        self.procs, self.tmp = procs, tmp_path
        self.state = tmp_path / "state"
        (self.state / "log").mkdir(parents=True)
        self.port = free_port()
        cfg = {"bus": {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0}, "web": {"port": self.port},
               "clients": [{"mac": MAC, "name": "pc1"}]}
        for key, value in (config or {}).items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        self.config_file = tmp_path / "bootfleet.yaml"
        self.config_file.write_text(yaml.safe_dump(cfg))
        scheme = "https" if cfg["web"].get("certificate") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        if supervised:
            env = {"BOOTFLEET_HOME": str(ROOT), "BOOTFLEET_PYTHON": PYTHON, "BOOTFLEET_STATE_DIR": str(self.state),
                   "BOOTFLEET_CONFIG": str(self.config_file)}
            procs.start([SUPERVISORD, "-n", "-c", str(ROOT / "deploy" / "supervisord.conf")], env=env, log=tmp_path / "supervisord.out")
        else:
            procs.start([PYTHON, "-m", "services.controller", "--config", str(self.config_file), "--state-dir", str(self.state)],
                        log=self.state / "log" / "controller.log")
        wait_for(lambda: self.cli("status").returncode == 0, timeout=60, interval=0.2, what="controller answering")
        if scheme == "http" and web_serves:
            wait_for(self.web_up, timeout=30, interval=0.1, what=f"web server on port {self.port}")
        self.feeder = Feeder(self.state)

    def web_up(self):
        try:
            with urllib.request.urlopen(self.url + "/static/app.js", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def token(self):
        return (self.state / "web-token").read_text().strip()

    def cli(self, *args, timeout=20):
        return subprocess.run([BOOTFLEET, "--state-dir", str(self.state), "--timeout", str(timeout), *args],
                              capture_output=True, text=True)

    def cli_json(self, *args):
        out = self.cli("--json", *args)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def get(self, path, headers=None):
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path, args, headers=None):
        req = urllib.request.Request(self.url + path, data=json.dumps(args).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def boot_pc(self):
        """One booted PC's events and a heartbeat of an iSCSI process, filed by the controller."""
        self.feeder.events(booted_pc())
        self.feeder.beat("iscsi_target", {"sessions": 1, "connections": 1})
        wait_for(lambda: self.cli_json("client", MAC)["client"]["state"] == "running", timeout=30, what="pc1 running")
