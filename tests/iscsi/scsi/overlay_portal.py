"""A target serving overlay LUNs, for libiscsi's suites (test_overlay_conformance.py), until SIGTERM.

    python tests/iscsi/scsi/overlay_portal.py PORT DIR

LUN 0: an overlay (4 KiB granules) over a 32 MiB version full of data; LUN 1: the same with 4096-byte
blocks; LUN 2: the version itself, read-only (a `readonly` PC). Built from the target's own parts
(Registry, Server) because the configuration cannot name overlays yet.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from services.iscsi_target.access import AccessPolicy  # noqa: E402
from services.iscsi_target.io_loop import Server  # noqa: E402
from services.iscsi_target.scsi import LogicalUnit, ScsiTarget  # noqa: E402
from services.iscsi_target.scsi.overlay import BaseImage, Overlay  # noqa: E402
from services.iscsi_target.service import Registry, TargetEntry  # noqa: E402
from shared.config.iscsi import AuthConfig  # noqa: E402

IQN = "iqn.2026-11.org.bootfleet.test:overlay-conformance"
SIZE = 32 << 20


def main() -> None:
    port, d = int(sys.argv[1]), Path(sys.argv[2])
    base = d / "v1.raw"
    if not base.exists():
        chunk = os.urandom(1 << 20)
        with open(base, "wb") as f:
            for _ in range(SIZE >> 20):
                f.write(chunk)
        os.chmod(base, 0o444)
    luns = {
        0: LogicalUnit(Overlay(base, d / "pc512.overlay"), 0, target_name=IQN),
        1: LogicalUnit(Overlay(base, d / "pc4k.overlay", block_size=4096), 1, target_name=IQN),
        2: LogicalUnit(BaseImage(base), 2, target_name=IQN),
    }
    registry = Registry()
    auth = AuthConfig()
    registry.discovery = AccessPolicy(auth)
    registry.portals = [("127.0.0.1", port)]
    registry.targets = {IQN: TargetEntry(IQN, None, ScsiTarget(IQN, luns), AccessPolicy(auth))}
    server = Server(registry, lambda event: None, {"busy_poll_us": 0, "nop_interval": 0, "nop_timeout": 15,
                                                    "cmd_window": 32})
    server.set_portals([("127.0.0.1", port)])
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    print("listening", flush=True)
    done.wait()
    server.stop()
    for lu in luns.values():
        lu.store.close()


if __name__ == "__main__":
    main()
