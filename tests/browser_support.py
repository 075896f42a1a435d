"""Debian's chromium driven by Selenium, for the dashboard tests (tests/web and the e2e lab), and a way to drive it
inside a lab's network namespace, where the controller's web server listens on the namespace's own 127.0.0.1.

`import browser_support` (tests/ is on sys.path via tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path
from typing import Any, Callable

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1400,1000"]
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def chromium(work: Path):
    """A headless chromium under chromedriver (both started here, stopped on exit); profile and log in `work`."""
    for tool in (CHROMIUM, CHROMEDRIVER):
        assert os.access(tool, os.X_OK), f"{tool} is missing: apt-get install chromium chromium-driver (deploy/system-deps.sh)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers or browsers on the network
    os.environ["SE_AVOID_STATS"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={work / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(work / "chromedriver.log")), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, artifacts: Path, name: str) -> Path:
    path = artifacts / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"\nscreenshot: {path}")
    return path


def in_netns(netns: str, fn: Callable[[], Any]) -> Any:
    """fn() run by a thread that first joins network namespace `netns` (setns(2) moves only the calling thread):
    its sockets, and the processes it starts (chromedriver, then chromium), live in the namespace, so
    http://127.0.0.1:PORT is the namespace's loopback. The pytest process itself stays where it was; an
    exception in fn (a failed assert) is raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"in-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
