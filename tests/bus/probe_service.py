"""A minimal real service for bus tests: it records each revision it applies and can flood events.

Run as `python tests/bus/probe_service.py --state-dir DIR [--config FILE]` (PYTHONPATH = the checkout).
Each applied configuration appends `<boot.default_lun> <unix time>` to <state_dir>/probe-<instance>.applied.
PROBE_FLOOD=N: emit N events as fast as possible after the first apply, then write
<state_dir>/probe-<instance>.flood with how long the N emit() calls took.
"""

import os
import time

from shared.config.model import BootfleetConfig
from shared.service import BaseService, main


class ProbeService(BaseService):
    name = "probe"

    async def start(self, config: BootfleetConfig) -> None:
        self.applied = 0
        await self.apply(config)
        flood = int(os.environ.get("PROBE_FLOOD", "0"))
        if flood:
            t0 = time.perf_counter()
            for i in range(flood):
                self.ctx.emit("probe.flood", n=i)
            took = time.perf_counter() - t0
            (self.ctx.state_dir / f"probe-{self.ctx.instance}.flood").write_text(f"{took:.6f}\n")

    async def apply(self, config: BootfleetConfig) -> None:
        self.applied += 1
        path = self.ctx.state_dir / f"probe-{self.ctx.instance}.applied"
        with open(path, "a") as f:
            f.write(f"{config.boot.default_lun} {time.time():.6f}\n")

    async def stop(self) -> None:
        pass

    def counters(self) -> dict[str, float]:
        return {"applied": self.applied}


if __name__ == "__main__":
    main(ProbeService)
