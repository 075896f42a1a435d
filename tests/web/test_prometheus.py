"""A real Prometheus (Debian's `prometheus`) scrapes the controller's /metrics and answers PromQL over its HTTP API:
a booted PC's figures fed in as events, and a real iSCSI target process's latency histogram and opcode counters
after qemu-io (libiscsi) has read from it."""

import json
import os
import time
import urllib.parse
import urllib.request

import math
import shutil
import subprocess

import pytest
import yaml

from support import PYTHON, free_port, wait_for
from web_support import MAC, WebStack, booted_pc

PROMETHEUS = "/usr/bin/prometheus"
TARGET = "iqn.2026-12.org.test:metrics"


def query(port, promql):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.loads(r.read())
    except OSError:
        return None
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.integration
def test_prometheus_scrapes_metrics_and_answers_promql(procs, tmp_path):
    assert os.access(PROMETHEUS, os.X_OK), f"{PROMETHEUS} is missing: apt-get install prometheus (deploy/system-deps.sh)"
    qemu_io = shutil.which("qemu-io")
    assert qemu_io, "qemu-io is missing: apt-get install qemu-utils (deploy/system-deps.sh)"
    iscsi_port = free_port()
    stack = WebStack(procs, tmp_path, {"iscsi": {
        "portals": [{"ip": "127.0.0.1", "port": iscsi_port}], "io_stats_interval": 0,  # a session's figures at its end
        "targets": [{"name": TARGET, "luns": [{"id": 0, "backstore": {"type": "ram", "size": "8MiB"}}]}]}})
    # the fed PC's iSCSI figures come from a made-up process, instance 1; the real target below is instance 0
    for ts, type_, fields in booted_pc():
        stack.feeder.event(ts, type_, fields, instance=1)
    stack.feeder.beat("iscsi_target", {"sessions": 1, "connections": 1}, instance=1)
    wait_for(lambda: stack.cli_json("client", MAC)["client"]["state"] == "running", timeout=30, what="pc1 running")
    procs.start([PYTHON, "-m", "services.iscsi_target", "--state-dir", str(stack.state), "--instance", "0"],
                log=tmp_path / "iscsi.log")
    wait_for(lambda: any(p["service"] == "iscsi_target" and p["instance"] == 0 and p.get("health") == "ok"
                         for p in stack.cli_json("status")["processes"]), timeout=30, what="the iSCSI target on revision 1")
    url = f"iscsi://127.0.0.1:{iscsi_port}/{TARGET}/0"
    io = subprocess.run([qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", "-c", "flush", url],
                        capture_output=True, text=True, timeout=60)
    assert io.returncode == 0 and "error" not in io.stdout.lower(), io.stdout + io.stderr
    stack.feeder.beat("dhcp", {"discovers": 3, "requests": 2, "offers": 3, "acks": 2, "naks": 1, "leases": 1})
    (tmp_path / "token").write_text(stack.token)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{
            "job_name": "bootfleet",
            "static_configs": [{"targets": [f"127.0.0.1:{stack.port}"]}],
            # loopback needs no login; the token is how a remote Prometheus would authenticate
            "authorization": {"type": "Bearer", "credentials_file": str(tmp_path / "token")},
        }],
    }))
    procs.start([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], log=tmp_path / "prometheus.log")

    def read_bytes():
        result = query(port, f'bootfleet_iscsi_read_bytes_total{{pc="pc1"}}')
        return result if result else None

    [sample] = wait_for(read_bytes, timeout=90, interval=0.5, what="Prometheus to scrape bootfleet_iscsi_read_bytes_total")
    assert sample["metric"]["mac"] == MAC and sample["metric"]["job"] == "bootfleet"
    assert float(sample["value"][1]) == 3345
    [up] = query(port, 'up{job="bootfleet"}')
    assert up["value"][1] == "1"
    naks = query(port, 'bootfleet_dhcp_replies_total{type="nak"}')
    assert [float(s["value"][1]) for s in naks] == [1]
    # Prometheus keeps its own `instance` (the scraped address) and renames ours exported_instance
    buckets = query(port, 'bootfleet_iscsi_command_latency_seconds_bucket{le="0.005",exported_instance="1"}')
    assert [float(s["value"][1]) for s in buckets] == [33]
    real = '{service="iscsi_target",exported_instance="0"}'
    [commands] = wait_for(lambda: query(port, f'sum(bootfleet_iscsi_command_latency_seconds_bucket{real[:-1]},le="+Inf"}}) > 0'),
                          timeout=30, interval=0.5, what="the real target's latency histogram scraped")
    [reads] = query(port, f'sum(bootfleet_iscsi_commands_total{real[:-1]},op=~"READ_10|READ_16"}}) > 0')
    [writes] = query(port, f'sum(bootfleet_iscsi_commands_total{real[:-1]},op=~"WRITE_10|WRITE_16"}}) > 0')
    [median] = query(port, f'histogram_quantile(0.5, sum by (le) (bootfleet_iscsi_command_latency_seconds_bucket{real}))')
    [count] = query(port, f'bootfleet_iscsi_command_latency_seconds_count{real}')
    total = float(commands["value"][1])
    assert float(count["value"][1]) == total >= float(reads["value"][1]) + float(writes["value"][1])
    p50 = float(median["value"][1])
    assert math.isfinite(p50) and 0 < p50 <= 1.0, median
    [inquiries] = query(port, f'bootfleet_iscsi_commands_total{real[:-1]},op="INQUIRY"}}')
    assert float(inquiries["value"][1]) >= 1  # qemu's iSCSI driver asks INQUIRY at open
    [logins] = query(port, f'bootfleet_iscsi_logins_total{real}')
    [read_mib] = query(port, f'bootfleet_iscsi_process_read_bytes_total{real} / 2^20')
    [written_mib] = query(port, f'bootfleet_iscsi_process_write_bytes_total{real} / 2^20')
    assert float(logins["value"][1]) >= 1 and float(read_mib["value"][1]) >= 1 and float(written_mib["value"][1]) == 1
    print(f"\nPromQL on the real target: {total:.0f} commands, {float(reads['value'][1]):.0f} READs, "
          f"{float(writes['value'][1]):.0f} WRITEs, median latency {p50 * 1e6:.0f} us (histogram_quantile)")
    # new io_stats reach Prometheus at its next scrape
    stack.feeder.event(time.time(), "iscsi.io_stats", {"ip": "10.77.0.100", "mac": MAC, "initiator": "i", "target": "t",
                                                       "tsih": 2, "lun": 0, "reads": 1, "writes": 0, "others": 0,
                                                       "read_bytes": 655, "write_bytes": 0, "latency_us_avg": 90.0},
                       instance=1)
    wait_for(lambda: (r := read_bytes()) and float(r[0]["value"][1]) == 4000, timeout=30, interval=0.5,
             what="the new bytes scraped")
    print(f"\nPromQL bootfleet_iscsi_read_bytes_total{{pc=\"pc1\"}} = 4000 via Prometheus on 127.0.0.1:{port}")
