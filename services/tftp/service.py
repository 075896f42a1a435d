"""The TFTP service process: the configuration in, the serving thread (server.py), events out.

`apply` swaps the policy (root, limits, dynamic names) for new requests; transfers in flight keep the file and
the options they negotiated. A new address or port opens a new request socket; transfers on the old address go on.
"""

from __future__ import annotations

import os
import resource

from shared.service import BaseService
from services.tftp.server import Policy, TftpServer


class TftpService(BaseService):
    name = "tftp"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.server: TftpServer | None = None

    async def start(self, config) -> None:
        _raise_file_limit(config.tftp.max_transfers * 2 + 64)  # a socket and maybe a file per transfer
        self.server = TftpServer(Policy(config, self.ctx.mac_for_ip), self.ctx.emit, self.ctx.instance)
        self.server.bind(config.tftp.address, config.tftp.port)
        self.server.start()
        t = config.tftp
        self.log.info("serving %s on %s:%d (%s)", self.server.policy.jail.root, t.address, self.server.port,
                      f"uploads into {t.upload_dir}" if t.upload_dir else "read-only")
        self._check_root(config)

    async def apply(self, config) -> None:
        old = self.server.policy.tftp
        self.server.policy = Policy(config, self.ctx.mac_for_ip)
        self.server.busy_poll = config.tftp.busy_poll_us / 1e6
        self.server.gso = config.tftp.gso
        self.server.cache.max_bytes = config.tftp.cache_mib << 20
        self.server.cache.max_file = config.tftp.cache_max_file_mib << 20
        if (config.tftp.address, config.tftp.port) != (old.address, old.port):
            self.server.bind(config.tftp.address, config.tftp.port)
            self.log.info("now listening on %s:%d", config.tftp.address, self.server.port)
        self._check_root(config)

    def _check_root(self, config) -> None:
        root = self.server.policy.jail.root
        if not os.path.isdir(root):
            self.log.warning("tftp.root %s does not exist: every read will get 'File not found'", root)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def counters(self) -> dict[str, float]:
        return self.server.counters() if self.server else {}


def _raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
