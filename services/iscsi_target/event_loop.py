"""One epoll thread per process that drives every connection in full feature phase (issue 13).

A connection's own thread (io_loop.ConnectionRunner) reads its first PDU, routes or hands it over and runs
the login, which may block (a PC's login waits for its dead sessions, which end here); once the connection
is in full feature phase its non-blocking socket is added here and that thread ends. From then on this
thread receives into the connection's buffer, feeds its sans-IO `Connection`, sends its output with
`sendmsg`, runs its timers and closes it: the runner's `loop_ready`, `loop_timer` and `loop_close`, each
under the runner's lock as in the threaded model. Why: with a thread per connection the storm spent about
four context switches per command (each thread sleeping in recv and 20 threads handing the GIL to each
other); one loop thread waits in one epoll_wait for all of them (docs/images.md, docs/iscsi.md).

Epoll is level-triggered: a readiness event is one `recv_into`. While a connection has output the peer has
not taken yet it is registered for EPOLLOUT only, so a peer that stops reading neither blocks the loop nor
makes it spin, and its input waits in the kernel until its output is out (the thread's blocking sendmsg
had the same effect). Other threads end a connection of the loop with `shutdown()` (runner.abort): the
loop sees the end of the stream and closes it here.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

log = logging.getLogger("bootfleet.iscsi_target.event_loop")

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
HUP_ERR = select.EPOLLHUP | select.EPOLLERR
TIMER_PERIOD = 1.0  # seconds between two runs of every connection's timers (NOP-In, logout grace)


class EventLoop:
    """The epoll, the fd -> runner map and the thread. Runners are added from their own threads; every
    other call on a runner happens in this thread (except `interest`, which epoll allows from any)."""

    def __init__(self, name: str = "iscsi-loop"):
        self.epoll = select.epoll()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.epoll.register(self.wake_r, EPOLLIN)
        self.runners: dict[int, object] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()

    def in_loop(self) -> bool:
        return threading.current_thread() is self.thread

    def add(self, runner) -> bool:
        """From the runner's thread, its last act: the loop may call it at once. False: stopping."""
        if self.stopping:
            return False
        fd = runner.sock.fileno()
        runner.fd = fd
        self.runners[fd] = runner
        self.epoll.register(fd, EPOLLIN)
        return True

    def interest(self, runner, out: bool) -> None:
        """Wait for room to send (out) or for input."""
        try:
            self.epoll.modify(runner.fd, EPOLLOUT if out else EPOLLIN)
        except (OSError, ValueError):
            pass  # closed meanwhile

    def remove(self, runner) -> None:
        fd = runner.fd
        if self.runners.get(fd) is runner:
            del self.runners[fd]
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def run(self) -> None:
        poll = self.epoll.poll
        runners = self.runners
        wake = self.wake_r
        next_timer = time.monotonic() + TIMER_PERIOD
        try:
            while not self.stopping:
                try:
                    events = poll(max(0.0, next_timer - time.monotonic()))
                except InterruptedError:
                    continue
                now = time.monotonic()
                for fd, mask in events:
                    runner = runners.get(fd)
                    if runner is None:
                        if fd == wake:
                            try:
                                os.read(wake, 4096)
                            except BlockingIOError:
                                pass
                        continue
                    try:
                        runner.loop_ready(mask, now)
                    except Exception:  # noqa: BLE001 - one connection's bug must not take the others down
                        log.exception("connection from %s failed", runner.peer_ip)
                        runner.loop_close("internal error")
                if now >= next_timer:
                    next_timer = now + TIMER_PERIOD
                    for runner in list(runners.values()):
                        try:
                            runner.loop_timer(now)
                        except Exception:  # noqa: BLE001
                            log.exception("connection from %s failed", runner.peer_ip)
                            runner.loop_close("internal error")
        finally:
            self.epoll.close()

    def stop(self, timeout: float = 1.0) -> None:
        """End the thread (the server has closed its connections first)."""
        self.stopping = True
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass
        if not self.in_loop():
            self.thread.join(timeout)
            if not self.thread.is_alive():
                os.close(self.wake_r)
                os.close(self.wake_w)
