"""At most `rate` log lines a second for one kind of noise (malformed packets, refused requests).

One limiter per kind of noise; what it drops is counted and said in one line when the next second begins, so a
flood of bad packets costs a few log lines, never the log.
"""

from __future__ import annotations

import logging
import time


class LogLimiter:
    def __init__(self, logger: logging.Logger, what: str = "log lines", rate: int = 20):
        self.logger = logger
        self.what = what
        self.rate = rate
        self.second = 0
        self.count = 0
        self.dropped = 0

    def allow(self, now: float | None = None) -> bool:
        """True if one more line may be logged in this second."""
        second = int(time.monotonic() if now is None else now)
        if second != self.second:
            if self.dropped:
                self.logger.warning("%d more %s were not logged", self.dropped, self.what)
            self.second, self.count, self.dropped = second, 0, 0
        self.count += 1
        if self.count > self.rate:
            self.dropped += 1
            return False
        return True
