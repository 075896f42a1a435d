"""Bootfleet itself inside the lab: one config file, supervisord (deploy/supervisord.conf) in the namespace.

The controller starts the DHCP, TFTP and iSCSI services as its `scale` section says; DHCP serves `br0` only.
`bootfleet --state-dir DIR ...` (the CLI) reaches the controller over ipc sockets in the state directory, a
filesystem path, so it works from outside the namespace too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lab.netns import BRIDGE, NETWORK, SERVER_IP, Lab, LabError
from shared.config.model import SERVICES

REPO = Path(__file__).resolve().parent.parent
PYTHON = Path(sys.executable)
BOOTFLEET = PYTHON.parent / "bootfleet"  # the CLI's entry point, as `pip install -e .` made it


@dataclass
class LabClient:
    name: str
    mac: str
    iqn: str
    image: Path


@dataclass
class LabConfig:
    """What the lab asks of Bootfleet; `render()` gives the YAML document (the project's own config schema)."""

    clients: list[LabClient]
    tftp_root: Path
    ipv6_ra: bool = True  # end iPXE's IPv6 wait at once (dhcp.interfaces[].ipv6_ra); the bench turns it off to compare
    log_level: str = "info"
    dhcp_mode: str = "server"  # proxy: ProxyDHCP beside the site's own DHCP server (lab/reference.SiteDhcp)
    unknown: str = "default"  # boot.unknown: what a PC in no clients[] entry gets
    unassigned: tuple[str, ...] = ()  # names of PCs left out of clients[] (their targets still exist): `new` PCs
    extra: dict = field(default_factory=dict)  # merged into the document section by section (http, boot.transport)

    def document(self) -> dict:
        doc = {
            "version": 1,
            "logging": {"level": self.log_level},
            "boot": {"server": SERVER_IP, "default_target": self.clients[0].iqn, "keep_san": True,
                     "unknown": self.unknown},
            "clients": [{"mac": c.mac, "name": c.name, "target": c.iqn, "lun": 0} for c in self.clients
                        if c.name not in self.unassigned],
            "iscsi": {
                "portals": [{"ip": SERVER_IP, "port": 3260}],
                "targets": [
                    {"name": c.iqn, "alias": c.name,
                     "luns": [{"id": 0, "backstore": {"type": "file", "path": str(c.image), "create": False}}]}
                    for c in self.clients
                ],
            },
            "dhcp": {
                "interfaces": [{"name": BRIDGE, "ipv6_ra": self.ipv6_ra}],
                "scopes": [{
                    "name": "lab", "subnet": NETWORK, "interface": BRIDGE,
                    "ranges": [{"start": "10.77.0.100", "end": "10.77.0.199"}], "lease_time": 3600,
                }],
            } if self.dhcp_mode == "server" else {
                "mode": "proxy", "interfaces": [{"name": BRIDGE, "ipv6_ra": self.ipv6_ra}],
            },
            "tftp": {"root": str(self.tftp_root), "address": SERVER_IP, "port": 69},
        }
        for section, value in self.extra.items():
            if isinstance(value, dict) and isinstance(doc.get(section), dict):
                doc[section] = {**doc[section], **value}
            else:
                doc[section] = value
        return doc

    def write(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.document(), sort_keys=False))
        return path


class BootfleetStack:
    """supervisord + controller + services inside `lab`, state in `state_dir`, config in `state_dir/bootfleet.yaml`."""

    def __init__(self, lab: Lab, state_dir: Path, config: LabConfig):
        self.lab = lab
        self.state_dir = state_dir
        self.config = config
        self.config_file = state_dir / "bootfleet.yaml"
        self.supervisord: subprocess.Popen | None = None

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(
            BOOTFLEET_HOME=str(REPO), BOOTFLEET_PYTHON=str(PYTHON),
            BOOTFLEET_STATE_DIR=str(self.state_dir), BOOTFLEET_CONFIG=str(self.config_file),
        )
        return env

    def start(self, timeout: float = 30.0) -> None:
        (self.state_dir / "log").mkdir(parents=True, exist_ok=True)
        self.config.tftp_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.config.write(self.config_file)
        test = subprocess.run([str(BOOTFLEET), "config", "test", str(self.config_file)],
                              capture_output=True, text=True, cwd=REPO)
        if test.returncode != 0:
            raise LabError(f"the lab's config does not validate:\n{test.stdout}{test.stderr}")
        self.supervisord = self.lab.popen(
            [str(PYTHON), "-m", "supervisor.supervisord", "-n", "-c", str(REPO / "deploy" / "supervisord.conf")],
            log=self.state_dir / "log" / "supervisord.stdout", env=self.env(), cwd=REPO,
        )
        self.wait_ready(timeout)

    def cli(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BOOTFLEET), "--state-dir", str(self.state_dir), *args],
            capture_output=True, text=True, cwd=REPO, timeout=timeout,
        )

    def cli_json(self, *args: str) -> dict:
        done = self.cli("--json", *args)
        if done.returncode != 0:
            raise LabError(f"bootfleet {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return json.loads(done.stdout)

    def status(self) -> dict:
        return self.cli_json("status")

    def wait_ready(self, timeout: float) -> None:
        """Until every service process reports the controller's current revision as applied."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.supervisord and self.supervisord.poll() is not None:
                raise LabError(f"supervisord exited ({self.supervisord.returncode}): {self.logs()}")
            try:
                done = self.cli("--timeout", "3", "--json", "status", timeout=15)
            except subprocess.TimeoutExpired:
                last = "bootfleet status did not answer within 15 s"
                continue
            if done.returncode == 0:
                last = done.stdout
                if self._all_applied(json.loads(done.stdout)):
                    return
            else:
                last = done.stderr or done.stdout
            time.sleep(0.3)
        raise LabError(f"Bootfleet not ready within {timeout:.0f} s; last status: {last.strip()[-1500:]}\n{self.logs()}")

    @staticmethod
    def _all_applied(status: dict) -> bool:
        revision = status.get("controller", {}).get("revision")
        procs = status.get("processes", [])
        if not set(SERVICES) <= {p.get("service") for p in procs}:
            return False
        return all(p.get("revision") == revision and p.get("health") == "ok" for p in procs)

    def logs(self, tail: int = 30) -> str:
        out = []
        for log in sorted((self.state_dir / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        if self.supervisord is not None:
            self.lab.stop(self.supervisord, timeout=20)
            self.supervisord = None
