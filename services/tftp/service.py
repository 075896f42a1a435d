"""The TFTP service process: the configuration in, the serving loops (io_loop.py), events out; and the HTTP
listener (http_server.py, in this process's asyncio loop) when `http.enabled`, serving the same root and scripts.

Each loop calls back from its own thread when its core has events; they go to `ctx.emit`, which is thread-safe.

`apply` swaps the policy (root, limits, dynamic names) for new requests; transfers in flight keep the file and
the options they negotiated. A new address or port opens a new request socket; transfers on the old address go on.
HTTP follows the same policy from each connection's next request; a new HTTP address or port, or HTTP turned off,
never cuts a reply in flight (docs/http.md).
"""

from __future__ import annotations

import os
import resource

from shared.service import BaseService
from services.tftp.files import FileCache
from services.tftp.core import Policy
from services.tftp.http_server import HttpListener
from services.tftp.io_loop import TftpLoop


class TftpService(BaseService):
    name = "tftp"
    sections = ("tftp", "http", "boot", "clients", "iscsi")  # boot/clients/iscsi: per-PC iPXE scripts

    def __init__(self, ctx):
        super().__init__(ctx)
        self.servers: list[TftpLoop] = []
        self.cache: FileCache | None = None
        self.http = HttpListener(ctx.emit)

    async def start(self, config) -> None:
        t = config.tftp
        # two sockets and maybe a file per transfer; a socket and a file per HTTP connection
        _raise_file_limit(t.max_transfers * 3 * t.threads + 2 * config.http.max_connections + 64)
        policy = Policy(config, self.ctx.mac_for_ip, self.ctx.state_dir)
        self.cache = FileCache(t.cache_mib << 20, t.cache_max_file_mib << 20)
        port = t.port
        for i in range(t.threads):
            server = TftpLoop(policy, cache=self.cache, name=f"tftp-serve-{i}")
            server.on_events = self._emitter(server)
            server.bind(t.address, port)  # each thread its own SO_REUSEPORT socket: the kernel spreads clients
            port = server.port
            self.servers.append(server)
        for server in self.servers:
            server.start()
        self.http.apply(config, policy.jail, policy.dynamic)
        self.log.info("serving %s on %s:%d with %d thread(s) (%s)", policy.jail.root, t.address, port, t.threads,
                      f"uploads into {t.upload_dir}" if t.upload_dir else "read-only")
        self._check_root(policy)

    async def apply(self, config) -> None:
        t = config.tftp
        old = self.servers[0].policy.tftp
        if t.threads != len(self.servers):
            self.log.warning("tftp.threads changes on restart only; still %d", len(self.servers))
        policy = Policy(config, self.ctx.mac_for_ip, self.ctx.state_dir)
        self.cache.max_bytes = t.cache_mib << 20
        self.cache.max_file = t.cache_max_file_mib << 20
        for server in self.servers:
            server.policy = policy
            server.busy_poll = t.busy_poll_us / 1e6
            server.gso = t.gso
        if (t.address, t.port) != (old.address, old.port):
            port = t.port
            for server in self.servers:
                server.bind(t.address, port)
                port = server.port
            self.log.info("now listening on %s:%d", t.address, port)
        self.http.apply(config, policy.jail, policy.dynamic)
        self._check_root(policy)

    def _emitter(self, server: TftpLoop):
        def emit() -> None:
            for event in server.take_events():
                self.ctx.emit(event)
        return emit

    def _check_root(self, policy) -> None:
        if not os.path.isdir(policy.jail.root):
            self.log.warning("tftp.root %s does not exist: every read will get 'File not found'", policy.jail.root)

    async def stop(self) -> None:
        self.http.stop()
        for server in self.servers:
            server.stop()

    def counters(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for server in self.servers:
            for key, value in server.counters().items():
                total[key] = total.get(key, 0) + value
        total.update(self.http.counters())
        if self.cache is not None:  # shared: counted once
            total.update(cache_bytes=self.cache.bytes, cache_hits=self.cache.hits, cache_misses=self.cache.misses)
        return total


def _raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
