"""The SCSI layer alone: microseconds of CPU per `ScsiTarget.execute` for 64 KiB READ(10) and WRITE(10),
on a file image (mmap reads, pwrite writes) and on a RAM disk, in a tight loop on one thread.

    .venv/bin/python bench/iscsi_scsi.py [--seconds 2]

There is no reference to run beside it: tgtd's SCSI emulation cannot be called without its transport.
The end-to-end comparison with tgtd (transport and SCSI together) is bench/iscsi.py.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.iscsi_target.scsi import FileBackstore, LogicalUnit, Nexus, RamBackstore, ScsiTarget  # noqa: E402

SIZE = 64 << 20
BLOCKS = 128  # 64 KiB of 512-byte blocks


def cdbs(opcode: int) -> list[memoryview]:
    span = SIZE // 512 - BLOCKS
    return [memoryview(bytes([opcode, 0]) + struct.pack(">IxHx", (i * BLOCKS) % span, BLOCKS) + bytes(6))
            for i in range(1024)]


def loop(target, nexus, commands, data, seconds: float) -> float:
    n = 0
    execute = target.execute
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for cdb in commands:
            execute(nexus, 0, cdb, data)
        n += len(commands)
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores = [("file", FileBackstore(os.path.join(tmp, "bench.img"), SIZE)), ("ram", RamBackstore(SIZE))]
        payload = memoryview(bytes(BLOCKS * 512))
        print(f"{'store':6} {'command':24} {'us/call':>8}")
        for name, store in stores:
            target = ScsiTarget("iqn.2026-11.org.bootfleet.bench:scsi", {0: LogicalUnit(store, 0)})
            nexus = Nexus("iqn.2026-11.org.bootfleet.bench:init,i,0x000000000001",
                          "iqn.2026-11.org.bootfleet.bench:scsi,t,0x0001", 1)
            target.execute(nexus, 0, memoryview(bytes(16)), None)  # the power-on unit attention
            read_us = loop(target, nexus, cdbs(0x28), None, args.seconds)
            write_us = loop(target, nexus, cdbs(0x2A), payload, args.seconds)
            print(f"{name:6} {'READ(10) 64 KiB':24} {read_us:8.2f}")
            print(f"{name:6} {'WRITE(10) 64 KiB':24} {write_us:8.2f}")
            store.close()


if __name__ == "__main__":
    main()
