"""A real Prometheus (Debian's `prometheus`) scrapes the controller's /metrics and answers PromQL over its HTTP API."""

import json
import os
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from support import free_port, wait_for
from web_support import MAC, WebStack

PROMETHEUS = "/usr/bin/prometheus"


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
    stack = WebStack(procs, tmp_path)
    stack.boot_pc()
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
    buckets = query(port, 'bootfleet_iscsi_command_latency_seconds_bucket{le="0.005"}')
    assert [float(s["value"][1]) for s in buckets] == [33]
    # new io_stats reach Prometheus at its next scrape
    stack.feeder.events([(time.time(), "iscsi.io_stats", {"ip": "10.77.0.100", "mac": MAC, "initiator": "i", "target": "t",
                                                          "tsih": 2, "lun": 0, "reads": 1, "writes": 0, "others": 0,
                                                          "read_bytes": 655, "write_bytes": 0, "latency_us_avg": 90.0})])
    wait_for(lambda: (r := read_bytes()) and float(r[0]["value"][1]) == 4000, timeout=30, interval=0.5,
             what="the new bytes scraped")
    print(f"\nPromQL bootfleet_iscsi_read_bytes_total{{pc=\"pc1\"}} = 4000 via Prometheus on 127.0.0.1:{port}")
