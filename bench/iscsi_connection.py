"""The iSCSI transport without sockets: microseconds of CPU per 4 KiB READ(10) through the sans-IO `Connection`
(PDU framing, CmdSN, dispatch, the SCSI layer on a RAM LUN, Data-In with status, the per-LUN counters), one
thread, commands built beforehand.

    .venv/bin/python bench/iscsi_connection.py [--commands 20000] [--slices 5]

Prints the best and the median slice. To compare two versions of the data path, run this file from each tree
(`git archive REV | tar -x -C DIR`, then `.venv/bin/python DIR/bench/iscsi_connection.py`), alternating; hold
/tmp/bench.lock. bench/iscsi.py is the end-to-end comparison with tgtd.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.iscsi_target.scsi import LogicalUnit, RamBackstore, ScsiTarget  # noqa: E402
from tests.iscsi.initiator import TARGET, logged_in, read10  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=20000)
    parser.add_argument("--slices", type=int, default=5)
    args = parser.parse_args()
    scsi = ScsiTarget(TARGET, {})
    scsi.add_lun(0, LogicalUnit(RamBackstore(64 << 20), 0))
    ini = logged_in(scsi=scsi)
    raws = []
    for i in range(args.commands):
        _, raw = ini.cmd(read10(i % 10000 * 8, 8), edtl=4096, read=True)
        raws.append(memoryview(raw))
    conn, per = ini.conn, args.commands // args.slices
    slices = []
    for k in range(args.slices):
        started = time.process_time()
        for raw in raws[k * per:(k + 1) * per]:
            conn.receive(raw, 0.0)
            conn.take_output()
        slices.append((time.process_time() - started) / per * 1e6)
    st = conn.session.stats[0]
    reads = st.reads
    # the first one gets the LUN's power-on UNIT ATTENTION (CHECK CONDITION): an "other"
    assert reads + st.others == args.commands and st.others <= 1, (reads, st.others)
    print(f"{ROOT}: 4 KiB READ(10) through Connection: {min(slices):.2f} us CPU per command (best of {args.slices} "
          f"slices of {per}), median {statistics.median(slices):.2f}; {reads} READs answered with data")


if __name__ == "__main__":
    main()
