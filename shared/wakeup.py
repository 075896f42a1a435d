"""A self-pipe: another thread wakes a poll/epoll loop that sleeps in the kernel.

`fd` goes into the loop's poller for reading; `wake()` (any thread) makes it readable; the loop calls `drain()`
when it sees it ready. Both ends are non-blocking: a wake-up while one is already pending costs nothing.
"""

from __future__ import annotations

import os


class Wakeup:
    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)

    def wake(self) -> None:
        try:
            os.write(self._w, b"x")
        except BlockingIOError:  # the pipe is full: a wake-up is already pending
            pass

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self.fd, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
