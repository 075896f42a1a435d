"""Stopping a bench's own server processes, by the Popen that started them."""

from __future__ import annotations

import signal
import subprocess


def stop(proc: subprocess.Popen | None, hard: bool = False, wait: float = 10) -> None:
    """SIGTERM (SIGKILL when `hard`: tgtd ignores SIGTERM), then SIGKILL if it has not exited within `wait`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
