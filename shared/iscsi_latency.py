"""The upper bounds of the iSCSI command latency buckets: one set, counted by the target and summed by the controller.

The target counts each command of a LUN in a session into one of len(LATENCY_BOUNDS) + 1 buckets (session.LunStats;
the last one: slower than the last bound), an `iscsi.io_stats` event carries the interval's counts in that order,
and the controller adds them up into the Prometheus histogram `bootfleet_iscsi_command_latency_seconds`, whose
`le` labels are these bounds. A bucket counts a latency <= its bound and > the bound before (Prometheus' `le`).
From 50 us (a page-cache READ over loopback) to 1 s (a stalled backstore).
"""

from __future__ import annotations

LATENCY_BOUNDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BOUNDS)  # what the target bisects: its clock is in ns
BUCKETS = len(LATENCY_BOUNDS) + 1  # counts per set, the last one above every bound (+Inf)
