"""What a command handler may use, and nothing else: the controller's stores and the few actions it offers.

The loop (io_loop.py) builds one `Facade` and hands it to every handler (commands.py), so handlers never
import the loop nor reach into its sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from services.controller.config_store import ConfigStore
from services.controller.event_store import EventStore
from services.controller.event_watch import Watch
from services.controller.fleet import Fleet
from services.controller.leases import Leases
from services.controller.supervisor_rpc import Supervisor
from services.controller.waiters import Waiter
from shared.config.model import BootfleetConfig

Answer = dict[str, Any]


@dataclass
class LoopStats:
    """The controller process itself, as `status-get` shows it (the loop counts, handlers read)."""

    pid: int
    started: float
    epoch: str
    events_received: int = 0
    bad_messages: int = 0
    # the web server (web/host.py): {state: running, url} / {state: off} / {state: failed, reason[, revision, url]}
    web: dict[str, Any] | None = None


@dataclass
class Facade:
    config: ConfigStore  # the running configuration and its revision (read; change it with `commit`)
    fleet: Fleet  # service processes and PCs
    events: EventStore
    leases: Leases
    supervisor: Supervisor
    stats: LoopStats
    # Validate, persist and publish a candidate as the next revision; raises ConfigError, changing nothing.
    commit: Callable[[Any], int]
    # Run a slow call (supervisord) off the loop: submit(envelope, call, finish); finish(result) is the answer.
    submit: Callable[[list[bytes] | None, Callable[[], Any], Callable[[Any], Answer]], None]
    # Ask every process of a service for an operation (a command key) and answer when `waiter` is satisfied.
    ask: Callable[[str, str, dict[str, Any], Waiter], None]
    # Hold an events-wait request until events it asks for are stored, or its deadline (event_watch.py).
    watch: Callable[[Watch], None]
    # File an event of the controller's own (shared/events.py Event), e.g. a long operation's progress.
    emit: Callable[[Any], None]
    # Images (docs/images.md): the image store, the PCs on images (pcboot.py), and the image lane: like
    # `submit`, on a worker of its own, so a 40 GiB import never delays a supervisord call; `post` is `emit`
    # for a worker thread (the loop files the event on its next turn).
    images: Any = None  # shared.images.store.ImageStore
    pcboot: Any = None  # services.controller.pcboot.PcBoots
    run_images: Callable[[list[bytes] | None, Callable[[], Any], Callable[[Any], Answer]], None] | None = None
    post: Callable[[Any], None] | None = None

    @property
    def running(self) -> BootfleetConfig:
        assert self.config.config is not None
        return self.config.config
