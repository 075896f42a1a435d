"""The controller and real service processes on the bus: revisions, restarts, rejections, event floods."""

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from support import PYTHON, ROOT, wait_for

BOOTFLEET = str(Path(PYTHON).parent / "bootfleet")
PROBE = str(ROOT / "tests" / "bus" / "probe_service.py")


class Stack:
    def __init__(self, procs, tmp_path):
        self.procs = procs
        self.dir = tmp_path / "state"
        self.dir.mkdir()
        self.config = tmp_path / "bootfleet.yaml"
        self.config.write_text(yaml.safe_dump({"bus": {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}}))
        self.controller = None

    def start_controller(self):
        self.controller = self.procs.start(
            [PYTHON, "-m", "services.controller", "--config", str(self.config), "--state-dir", str(self.dir)],
            log=self.dir / "controller.log",
        )
        wait_for(timeout=30, predicate=lambda: self.cli_ok("status"), what="controller answering")

    def start_probe(self, instance, env=None):
        return self.procs.start(
            [PYTHON, PROBE, "--state-dir", str(self.dir), "--instance", str(instance)],
            log=self.dir / f"probe-{instance}.log",
            env=env,
        )

    def cli(self, *args):
        return subprocess.run([BOOTFLEET, "--state-dir", str(self.dir), "--timeout", "15", *args], capture_output=True, text=True)

    def cli_ok(self, *args):
        return self.cli(*args).returncode == 0

    def status(self):
        out = self.cli("--json", "status")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def revisions(self):
        return {p["instance"]: p.get("revision") for p in self.status()["processes"] if p["service"] == "probe"}

    def applied(self, instance):
        path = self.dir / f"probe-{instance}.applied"
        return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def holds_for(check, seconds: float, interval: float = 0.1) -> None:
    """Run `check` (it asserts) repeatedly for `seconds`: for claims that something does not happen."""
    deadline = time.monotonic() + seconds
    while True:
        check()
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def read_lines(pipe, count: int, timeout: float) -> list[str]:
    """`count` lines from a text pipe, failing after `timeout` seconds instead of blocking forever."""
    fd, buf, deadline = pipe.fileno(), b"", time.monotonic() + timeout
    while buf.count(b"\n") < count:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out after {timeout} s waiting for {count} lines, got {buf!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the pipe closed after {buf!r}"
            buf += chunk
    return [line + "\n" for line in buf.decode().split("\n")[:count]]


@pytest.fixture
def stack(procs, tmp_path):
    return Stack(procs, tmp_path)


def test_revisions_reach_every_service_including_late_joiners(stack):
    stack.start_controller()
    stack.start_probe(0)
    stack.start_probe(1)
    wait_for(timeout=30, predicate=lambda: stack.revisions() == {0: 1, 1: 1}, what="revision 1 everywhere")
    assert stack.cli("config", "set", "boot.default_lun", "5").returncode == 0
    assert stack.cli("config", "set", "boot.default_lun", "6").returncode == 0
    stack.start_probe(2)  # joins at revision 3: snapshot, then updates
    wait_for(timeout=30, predicate=lambda: stack.revisions() == {0: 3, 1: 3, 2: 3}, what="revision 3 everywhere")
    assert stack.applied(0) == ["0", "5", "6"]
    assert stack.applied(2) == ["6"]
    # applying the same configuration again is not a new revision
    same = stack.cli("config", "set", "boot.default_lun", "6")
    assert same.returncode == 0 and stack.status()["controller"]["revision"] == 3


def test_invalid_config_is_rejected_and_old_revision_stays(stack, tmp_path):
    stack.start_controller()
    stack.start_probe(0)
    wait_for(timeout=30, predicate=lambda: stack.revisions() == {0: 1}, what="revision 1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"clients": [{"mac": "52:54:00:12:34:56", "ip": "192.168.1.300"}]}))
    out = stack.cli("config", "apply", str(bad))
    assert out.returncode == 1
    assert "clients[0].ip: 192.168.1.300 is not an IPv4 address" in out.stderr
    assert "revision 1 stays" in out.stderr
    test = stack.cli("config", "test", str(bad))
    assert test.returncode == 1 and "clients[0].ip" in test.stderr
    out = stack.cli("config", "set", "scale.tftp", "99")
    assert out.returncode == 1 and "scale.tftp" in out.stderr
    assert stack.status()["controller"]["revision"] == 1
    # the next good candidate is revision 2, and the service applies it right after revision 1: had a
    # rejected candidate been published, it would show here (a revision 3, or a line in between)
    assert stack.cli("config", "set", "boot.default_lun", "2").returncode == 0
    wait_for(timeout=30, predicate=lambda: stack.revisions() == {0: 2}, what="revision 2")
    assert stack.applied(0) == ["0", "2"]
    # the CLI's list of commands is the running controller's list-commands
    listed = stack.cli("commands")
    assert listed.returncode == 0 and "(the controller)" in listed.stdout and "lease-release" in listed.stdout
    # usage errors exit 2
    assert stack.cli("config", "frobnicate").returncode == 2


def test_controller_killed_services_keep_serving_then_resync(stack):
    stack.start_controller()
    probe = stack.start_probe(0)
    wait_for(timeout=30, predicate=lambda: stack.revisions() == {0: 1}, what="revision 1")
    assert stack.cli("config", "set", "boot.default_lun", "7").returncode == 0
    wait_for(timeout=30, predicate=lambda: stack.applied(0) == ["0", "7"], what="revision 2 applied")
    stack.controller.send_signal(signal.SIGKILL)
    stack.controller.wait()
    # a service restarted while the controller is away starts on its cached revision
    probe.send_signal(signal.SIGTERM)
    probe.wait(timeout=10)
    probe = stack.start_probe(0)
    wait_for(timeout=30, predicate=lambda: stack.applied(0) == ["0", "7", "7"], what="start from the cached revision")
    assert probe.poll() is None
    stack.start_controller()  # persisted revision 2 comes back; services resync to the new epoch
    wait_for(timeout=30, predicate=lambda: stack.revisions() == {0: 2}, what="resync after controller restart")
    assert stack.cli("config", "set", "boot.default_lun", "8").returncode == 0
    wait_for(timeout=30, predicate=lambda: stack.applied(0)[-1] == "8", what="revision 3 after resync")
    assert stack.revisions() == {0: 3}


def test_event_flood_does_not_block_and_counts_match(stack):
    # events are also logged, one line each at INFO; a busy service runs at warning
    stack.config.write_text(yaml.safe_dump({"logging": {"level": "warning"}, "bus": {"heartbeat_interval": 0.2}}))
    stack.start_controller()
    stack.start_probe(0, env={"PROBE_FLOOD": "100000"})
    flood = stack.dir / "probe-0.flood"
    wait_for(flood.exists, timeout=60, what="flood done")
    took = float(flood.read_text())
    assert took < 5.0, f"100k emit() calls took {took:.2f} s"

    def settled():
        rows = [p for p in stack.status()["processes"] if p["service"] == "probe"]
        if not rows:
            return None
        r = rows[0]
        # +2: service.started and service.applied are events too
        return r if r["events_emitted"] >= 100_002 and r["events_received"] + r["events_dropped"] == r["events_emitted"] else None

    row = wait_for(settled, timeout=60, interval=0.5, what="controller counts = arrived + dropped")
    print(f"\n100k events: emit() took {took:.2f} s; received {row['events_received']}, dropped {row['events_dropped']}")
    stored = stack.status()["controller"]["events_stored"]
    assert stored == row["events_received"]


def test_events_clients_and_boot_timeline_from_the_cli(stack, tmp_path):
    mac, ip = "52:54:00:00:00:01", "10.0.0.5"
    script = [
        ["dhcp.discover", {"mac": mac}, 0.2],
        ["dhcp.lease.granted", {"mac": mac, "ip": ip, "expires": 2e9}, 0.1],
        ["tftp.transfer.finished", {"ip": ip, "file": "boot.ipxe", "bytes": 90}, 0.1],
        ["iscsi.login", {"ip": ip, "initiator": "iqn.2010-04.org.ipxe:pc", "target": "iqn.2026-11.org.bootfleet:demo", "session_type": "normal"}, 0.1],
        ["iscsi.first_read", {"ip": ip, "target": "iqn.2026-11.org.bootfleet:demo", "lun": 0}, 0.05],
        ["iscsi.login", {"ip": ip, "initiator": "iqn.1993-08.org.debian:01:pc", "target": "iqn.2026-11.org.bootfleet:demo", "session_type": "normal"}, 0.3],
    ]
    events_file = tmp_path / "events.json"
    events_file.write_text(json.dumps(script))
    demo = {"name": "iqn.2026-11.org.bootfleet:demo", "luns": [{"id": 0, "backstore": {"type": "ram", "size": 1048576}}]}
    stack.config.write_text(yaml.safe_dump({"boot": {"default_target": demo["name"]}, "iscsi": {"targets": [demo]},
                                            "clients": [{"mac": mac, "name": "pc1"}]}))
    stack.start_controller()
    stack.start_probe(0, env={"PROBE_EVENTS": str(events_file)})
    wait_for(timeout=30, predicate=lambda: "iqn.1993-08" in stack.cli("events", "--type", "iscsi.login").stdout, what="events stored")
    out = stack.cli("events", "--type", "dhcp", "--since", "5m")
    assert out.returncode == 0
    assert "dhcp.discover" in out.stdout and "dhcp.lease.granted" in out.stdout and "iscsi" not in out.stdout
    clients = json.loads(stack.cli("--json", "clients").stdout)["clients"]
    assert clients == [
        {**clients[0], "mac": mac, "name": "pc1", "ip": ip, "state": "running", "target": "iqn.2026-11.org.bootfleet:demo lun 0"}
    ]
    detail = json.loads(stack.cli("--json", "client", mac).stdout)
    steps = [s["step"] for s in detail["timeline"]]
    assert steps == ["DHCP discover", "DHCP ack", "TFTP file", "iSCSI login (firmware)", "first READ", "iSCSI login (OS)"]
    assert detail["timeline"][-1]["t"] >= 0.5
    table = stack.cli("client", mac)
    assert table.returncode == 0 and "iSCSI login (OS)" in table.stdout
    assert stack.cli("client", "52:54:00:99:99:99").returncode == 1
    assert stack.cli("events", "--since", "yesterday-ish").returncode == 1
    # no DHCP lease store in this stack: the controller answers from the lease events it saw
    assert json.loads(stack.cli("--json", "leases").stdout)["leases"] == [{"ip": ip, "mac": mac, "state": "bound", "expires": 2e9}]


def test_tcp_bus_with_curve_keys_admits_only_authorized_services(stack, tmp_path):
    from support import free_port

    assert stack.cli("keys", "generate").returncode == 0
    assert stack.cli("keys", "generate").returncode == 1  # never overwrites keys silently
    port = free_port()
    stack.config.write_text(yaml.safe_dump({"bus": {"transport": "tcp", "host": "127.0.0.1", "port_base": port,
                                                    "curve": True, "heartbeat_interval": 0.2}}))
    stack.start_controller()
    bus = {"BOOTFLEET_BUS": f"tcp://127.0.0.1:{port}"}
    stack.start_probe(0, env=bus)
    wait_for(timeout=30, predicate=lambda: stack.revisions() == {0: 1}, what="a keyed service on revision 1 over tcp")
    # a service host with keys the controller never authorized gets nothing and is not heard
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    assert subprocess.run([BOOTFLEET, "--state-dir", str(stranger), "keys", "generate"], capture_output=True).returncode == 0
    import shutil
    shutil.copy(stack.dir / "keys" / "server.key", stranger / "keys" / "server.key")  # it knows the server's public key
    intruder = stack.procs.start([PYTHON, PROBE, "--state-dir", str(stranger), "--instance", "7"], env=bus,
                                 log=stranger / "probe.log")
    assert stack.cli("config", "set", "boot.default_lun", "4").returncode == 0
    wait_for(timeout=30, predicate=lambda: stack.applied(0) == ["0", "4"], what="the keyed service gets revision 2")

    def refused():
        assert intruder.poll() is None, "the unauthorized service should be running, and refused"
        assert not (stranger / "probe-7.applied").exists(), "the unauthorized service got a configuration"
        assert 7 not in stack.revisions(), "the controller heard the unauthorized service"

    holds_for(refused, seconds=2.0)  # a refusal is an absence: watched for a while, failing at the first sign


def test_events_follow_prints_new_events_as_they_arrive(stack, tmp_path):
    stack.start_controller()
    follow = subprocess.Popen([BOOTFLEET, "--state-dir", str(stack.dir), "events", "--follow", "--type", "probe"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        script = tmp_path / "events.json"
        script.write_text(json.dumps([["probe.ping", {"n": i}, 0.2] for i in range(3)]))
        stack.start_probe(0, env={"PROBE_EVENTS": str(script)})
        lines = read_lines(follow.stdout, 3, timeout=30)
        assert [l.split()[-1] for l in lines] == ["n=0", "n=1", "n=2"], lines
        assert all("probe.ping" in l for l in lines)
    finally:
        follow.terminate()
        follow.wait(10)
