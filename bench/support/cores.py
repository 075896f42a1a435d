"""Where a bench's processes run: the cores split between the servers and their clients.

Real boot clients are other machines; on one 2-core VM a client that shares the server's core decides the
figure as much as the server does (docs/tftp.md, Performance). The benches print that shared-core figure and,
beside it, the one with the servers on the last core and the clients on the others.
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def pinned(cpus: set[int] | None):
    """Processes started inside run on `cpus` (they inherit this process's affinity, and so does all they
    fork later); None: wherever the kernel likes."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def split_cores() -> tuple[set[int], set[int]] | None:
    """-> (the server core, the client cores), or None on a one-core machine."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[-1]}, set(cpus[:-1])) if len(cpus) >= 2 else None
