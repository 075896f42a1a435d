"""A minimal real service for bus tests: it records each revision it applies and can flood events.

Run as `python tests/bus/probe_service.py --state-dir DIR [--config FILE]` (PYTHONPATH = the checkout).
Each applied configuration appends `<boot.default_lun> <unix time>` to <state_dir>/probe-<instance>.applied.
PROBE_EVENTS=FILE: emit the events listed in FILE (JSON [[type, fields, delay_s], ...]) after the first apply.
PROBE_FLOOD=N: emit N events as fast as possible after the first apply, then write
<state_dir>/probe-<instance>.flood with how long the N emit() calls took.
"""

import asyncio
import dataclasses
import json
import os
import time
from typing import Any, ClassVar

from shared.config.model import BootfleetConfig
from shared.events import Event, event
from shared.service import BaseService, main


@event
class ProbeFlood(Event):
    type: ClassVar[str] = "probe.flood"
    n: int


_scripted: dict[tuple[str, tuple[str, ...]], type] = {}


def scripted(type_: str, fields: dict[str, Any]) -> Event:
    """An event of any type and fields read from PROBE_EVENTS: an Event dataclass made for that shape, so
    the wire carries what a service's own event class would send."""
    key = (type_, tuple(fields))
    cls = _scripted.get(key)
    if cls is None:
        cls = dataclasses.make_dataclass(
            "Scripted", [(name, Any) for name in fields], bases=(Event,), namespace={"type": type_},
            slots=True, kw_only=True,
        )
        _scripted[key] = cls
    return cls(**fields)


class ProbeService(BaseService):
    name = "probe"

    async def start(self, config: BootfleetConfig) -> None:
        self.applied = 0
        await self.apply(config)
        script = os.environ.get("PROBE_EVENTS")
        if script:
            asyncio.get_running_loop().create_task(self._replay(json.loads(open(script).read())))
        flood = int(os.environ.get("PROBE_FLOOD", "0"))
        if flood:
            t0 = time.perf_counter()
            for i in range(flood):
                self.ctx.emit(ProbeFlood(n=i))
            took = time.perf_counter() - t0
            (self.ctx.state_dir / f"probe-{self.ctx.instance}.flood").write_text(f"{took:.6f}\n")

    async def _replay(self, items) -> None:
        for type, fields, delay in items:
            await asyncio.sleep(delay)
            self.ctx.emit(scripted(type, fields))

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
