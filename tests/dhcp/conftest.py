import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dhcp_lab import Lab  # noqa: E402

CONFIG = """
logging: {level: info}
boot:
  server: 10.77.0.1  # targets live on another server: no iscsi.targets needed here
  default_target: iqn.2026-11.org.bootfleet:demo
clients:
  - {mac: "52:54:00:00:00:0a", target: "iqn.2026-11.org.bootfleet:pc10"}
dhcp:
  interfaces: [{name: @SRV_IF@, ipv6_ra: true}]
  lease_file: @TMP@/leases.sqlite
  offer_hold: 5
  classes:
    # the seed's setup: class gPXE gets option 67 script.gpxe and option 17
    - name: gPXE
      user_class: gPXE
      options: {67: script.gpxe, 17: "iscsi:10.77.0.1::::iqn.2026-11.org.bootfleet:seed"}
  scopes:
    - name: lan
      subnet: 10.77.0.0/24
      interface: @SRV_IF@
      ranges: [{start: 10.77.0.100, end: 10.77.0.199}]
      lease_time: 60
      renewal_time: 2
      rebinding_time: 50
      options:
        routers: 10.77.0.1
        domain-name-servers: [10.77.0.1]
        domain-name: boot.lan
      reservations:
        - {mac: "52:54:00:00:00:0b", ip: 10.77.0.50, hostname: pc11, target: "iqn.2026-11.org.bootfleet:pc11",
           options: {domain-name: host.lan}}
    - name: remote
      subnet: 10.88.0.0/24
      ranges: [{start: 10.88.0.100, end: 10.88.0.102}]
      options: {routers: 10.88.0.1}
"""


def _need_root():
    if os.geteuid() != 0:
        pytest.fail("the DHCP integration tests create network namespaces: run them as root")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _need_root()
    lab = Lab(tmp_path_factory.mktemp("dhcp"))
    try:
        lab.up()
        lab.start_server(lab.write_config(CONFIG))
        yield lab
    finally:
        lab.stop_server()
        lab.down()


@pytest.fixture
def fresh_lab(tmp_path):
    _need_root()
    lab = Lab(tmp_path)
    try:
        lab.up()
        yield lab
    finally:
        lab.stop_server()
        lab.down()
