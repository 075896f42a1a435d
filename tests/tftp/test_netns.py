"""Replies leave from the address the request came to: a server on 0.0.0.0:69 in its own network namespace,
two addresses on its loopback, requests to each."""

from __future__ import annotations

import subprocess
import uuid

import pytest
import yaml

import support

pytestmark = [pytest.mark.integration, pytest.mark.netns]

CLIENT = r"""
import socket, sys
sys.path.insert(0, sys.argv[1])
from services.tftp import packets as pk
for server in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.250.0.3", 0))
    s.settimeout(5)
    s.sendto(pk.build_request(pk.RRQ, "f.bin", "octet", {"blksize": 512}), (server, 69))
    data, addr = s.recvfrom(600)
    assert pk.opcode_of(data) == pk.OACK, data
    s.sendto(pk.build_ack(0), addr)
    data, addr2 = s.recvfrom(600)
    print(server, addr[0], addr2[0], data[4:].decode())
# a window of blocks larger than the MTU (1500 here): the kernel refuses to segment them (GSO), the server
# sends them one by one
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(pk.build_request(pk.RRQ, "big.bin", "octet", {"blksize": 4000, "windowsize": 4}), ("10.250.0.1", 69))
data, addr = s.recvfrom(600)
s.sendto(pk.build_ack(0), addr)
blocks = [s.recvfrom(5000)[0] for _ in range(4)]
print("window", [pk.HEADER.unpack_from(b)[1] for b in blocks], sum(len(b) - 4 for b in blocks),
      bytes(b"".join(b[4:] for b in blocks)) == bytes(range(256)) * 62 + bytes(range(128)))
"""


@pytest.fixture
def netns():
    name = f"bf-tftp-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up", "mtu", "1500"], check=True)
        for address in ("10.250.0.1", "10.250.0.2", "10.250.0.3"):
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_reply_from_the_address_the_request_came_to(netns, tmp_path, procs):
    root = tmp_path / "root"
    root.mkdir()
    (root / "f.bin").write_bytes(b"hello")
    (root / "big.bin").write_bytes(bytes(range(256)) * 100)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "tftp": {"root": str(root), "address": "0.0.0.0", "port": 69}}))
    log = tmp_path / "tftp.log"
    procs.start(["ip", "netns", "exec", netns, support.PYTHON, "-m", "services.tftp", "--config", str(config),
                 "--state-dir", str(tmp_path / "state")], log=log)
    support.wait_for(lambda: "serving" in log.read_text(), timeout=15, what="the server in the namespace")
    out = subprocess.run(["ip", "netns", "exec", netns, support.PYTHON, "-c", CLIENT, str(support.ROOT),
                          "10.250.0.1", "10.250.0.2", "127.0.0.1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr + log.read_text()
    lines = out.stdout.splitlines()
    assert [line.split() for line in lines[:3]] == [[a, a, a, "hello"] for a in ("10.250.0.1", "10.250.0.2", "127.0.0.1")]
    assert lines[3] == "window [1, 2, 3, 4] 16000 True"
