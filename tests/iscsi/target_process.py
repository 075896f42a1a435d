"""A target process for the tests that drive one over loopback: started, waited for until its port
listens (failing with the end of its log if it exits first), stopped; and libiscsi's iscsi-test-cu run
against it with its totals checked."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from support import ROOT, wait_for


def wait_listening(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 15,
                   what: str = "the target to listen") -> None:
    """Wait until 127.0.0.1:`port` accepts; fails with the end of the log if `proc` exits first."""

    def listening():
        assert proc.poll() is None, f"target exited: {Path(log_path).read_text(errors='replace')[-2000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(listening, timeout=timeout, what=what)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM the process this test started (by its Popen), SIGKILL if it outlives `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def start_target(config: Path, state_dir: Path, log, port: int, timeout: float = 15) -> subprocess.Popen:
    """`python -m services.iscsi_target` on `config`, output to the open file `log`, once its port listens."""
    proc = subprocess.Popen([sys.executable, "-m", "services.iscsi_target", "--config", str(config),
                             "--state-dir", str(state_dir)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(proc, port, Path(log.name), timeout)
    except BaseException:
        stop_process(proc)
        raise
    return proc


@contextmanager
def target_process(cmd: list[str], port: int, log_path: Path, timeout: float = 20, cwd=None,
                   what: str = "the target to listen"):
    """Run `cmd` (output to `log_path`) until the block ends; yields the Popen once 127.0.0.1:`port` accepts."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(proc, port, log_path, timeout, what)
        yield proc
    finally:
        stop_process(proc)
        log.close()


def run_cu_suite(url: str, suite: str, timeout: float = 120) -> tuple[int, int]:
    """iscsi-test-cu's `suite` against `url`: (tests passed, asserts passed); fails on any failed one."""
    tool = shutil.which("iscsi-test-cu")
    assert tool, "iscsi-test-cu is not installed (deploy/system-deps.sh installs libiscsi-bin)"
    r = subprocess.run([tool, "--dataloss", f"--test={suite}", url], capture_output=True, text=True,
                       timeout=timeout)
    out = r.stdout + r.stderr
    tests = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    asserts = re.search(r"asserts\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert tests and asserts, out[-3000:]
    failed = int(tests.group(4)) + int(asserts.group(4))
    assert failed == 0, out[-4000:]
    return int(tests.group(3)), int(asserts.group(3))
