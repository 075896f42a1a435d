"""`make demo`: one virtual PC with no disk boots through Bootfleet, its serial console on this terminal.

It builds the lab (a network namespace with a bridge and a tap), starts the whole stack in it from one config
file (DHCP on the lab's bridge only), powers the PC on, streams its console (SeaBIOS, iPXE, syslinux, the
guest's init), then prints `bootfleet clients` and `bootfleet client MAC` (the boot timeline) and removes
everything it made. Needs root (namespaces, tap devices) and the Debian packages it names when one is missing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lab import image
from lab.qemu import ConsoleLine, VirtualPC
from lab.scenario import BootfleetLab, missing_tools


def _print_line(pc: VirtualPC, line: ConsoleLine) -> None:
    print(f"\033[2m[{line.t:6.2f}]\033[0m {line.text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-ra", action="store_true",
                        help="do not answer iPXE's router solicitation (shows its ~15 s IPv6 wait)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, state) afterwards")
    args = parser.parse_args(argv)

    missing = missing_tools()
    if missing:
        print("make demo needs what this host lacks:", file=sys.stderr)
        for item in missing:
            print(f"  - {item}", file=sys.stderr)
        print("As root on Debian: bash deploy/system-deps.sh installs the packages.", file=sys.stderr)
        return 1

    print("== building the boot disk (cached under var/cache/lab/)", flush=True)
    try:
        disk = image.build()
    except image.ImageError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="bf-demo-", dir="/tmp"))
    print(f"== starting the lab and Bootfleet (work dir {workdir})", flush=True)
    started = time.monotonic()
    try:
        with BootfleetLab(workdir, pcs=1, disk=disk, ipv6_ra=not args.no_ra, on_line=_print_line) as bl:
            print(f"== stack up in {time.monotonic() - started:.1f} s; powering on pc0 ({bl.results[0].mac})",
                  flush=True)
            result = bl.boot()[0]
            print("==", result.summary(), flush=True)
            time.sleep(1.0)  # the last events (the OS's logout) reach the controller
            for cmd in (["clients"], ["client", result.mac]):
                done = bl.stack.cli(*cmd)
                print(f"\n$ bootfleet {' '.join(cmd)}\n{done.stdout}{done.stderr}", end="", flush=True)
            if not result.ok:
                print(bl.stack.logs(15), file=sys.stderr)
            code = 0 if result.ok else 1
    except KeyboardInterrupt:
        print("\n== interrupted; the lab was torn down", file=sys.stderr)
        code = 130
    except Exception as exc:
        print(f"demo: {exc}", file=sys.stderr)
        code = 1
    finally:
        if args.keep:
            print(f"== kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("== lab removed (namespace, bridge, tap, every process it started)")
    return code


if __name__ == "__main__":
    sys.exit(main())
