"""Progress of long operations in the `bootfleet` CLI: one helper every long command uses.

`ProgressBar` draws a rich progress bar on a terminal and, when its stream is not one (a pipe, a log, cron),
prints one plain line per 10 % instead, so logs stay short and readable. It writes to stderr, so what a
command prints on stdout stays data.

`follow_operation()` shows an operation run elsewhere (the controller or a service) from its events:
`operation.progress` {op, name, done, total, unit} and `operation.finished` {op, name, ok, text}, taken with
the controller's `events-wait` (pushed, no polling). The contract is in docs/control.md ("Long operations").

    after = last_event_id(ctl)                          # before the command: none of its events is missed
    answer = ctl.call("image-import", name="win11", file="/srv/win11.qcow2", op=new_op_id())
    follow_operation(ctl, answer["arguments"]["op"], after, "import win11", error=CliError)  # raises when it failed

A command that does the work itself (reading a file to import) uses `ProgressBar` directly:

    with ProgressBar("import demo.img", total=size) as bar:
        for chunk in ...: bar.advance(len(chunk))
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any, Callable, TextIO


def new_op_id() -> str:
    """An id for an operation this CLI asks for; its progress events carry it as `op`."""
    return uuid.uuid4().hex[:12]


def _amount(n: float, unit: str) -> str:
    if unit != "bytes":
        return f"{n:.0f} {unit}"
    for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= size:
            return f"{n / size:.1f} {name}"
    return f"{n:.0f} B"


class ProgressBar:
    def __init__(self, title: str, total: int | None = None, unit: str = "bytes", stream: TextIO | None = None):
        self.title = title
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.tty = self.stream.isatty()
        self._next_tenth = 1  # piped: the next 10 % step to print
        self._bar = None
        self._task = None
        self._finished = False

    def __enter__(self) -> "ProgressBar":
        return self

    def _start_bar(self) -> None:
        """On a terminal, the bar starts at the first update: by then the unit is known (bytes, %, files)."""
        if self.tty and self._bar is None and not self._finished:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                                       TextColumn, TimeRemainingColumn, TransferSpeedColumn)

            amount = {"bytes": (DownloadColumn(), TransferSpeedColumn()), "%": ()}.get(self.unit, (MofNCompleteColumn(),))
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *amount,
                                 TimeRemainingColumn(), console=Console(file=self.stream), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=self.total)

    def update(self, done: int, total: int | None = None) -> None:
        """Where the operation is now: `done` of `total` (which may become known late)."""
        if total is not None:
            self.total = total
        self.done = done
        self._start_bar()
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total)
            return
        if not self.total:
            return
        tenth = int(done * 10 // self.total)
        if tenth >= self._next_tenth and tenth < 10:
            self._next_tenth = tenth + 1
            amount = "" if self.unit == "%" else f" ({_amount(done, self.unit)} of {_amount(self.total, self.unit)})"
            self._line(f"{tenth * 10}%{amount}")

    def advance(self, amount: int) -> None:
        self.update(self.done + amount)

    def _line(self, text: str) -> None:
        print(f"{self.title}: {text}", file=self.stream, flush=True)

    def finish(self, ok: bool = True, text: str = "") -> None:
        if self._finished:
            return
        self._finished = True
        if self._bar is not None:
            if ok and self.total:
                self._bar.update(self._task, completed=self.total)
            self._bar.stop()
            self._bar = None
        elif ok:
            amount = f" ({_amount(self.total, self.unit)})" if self.total and self.unit != "%" else ""
            self._line("100%" + amount + (f": {text}" if text else ""))

    def __exit__(self, kind, exc, tb) -> None:
        self.finish(ok=kind is None)


def last_event_id(ctl) -> int:
    """The newest stored event's id: follow an operation from here, so none of its events is missed."""
    return int(ctl.call("events-wait", after_id=0, limit=1, wait=0)["arguments"].get("last_id", 0))


def follow_operation(ctl, op: str, after_id: int, title: str, *, error: Callable[[str], Exception] = RuntimeError,
                     timeout: float | None = None, stream: TextIO | None = None) -> dict[str, Any]:
    """Show operation `op`'s progress until its `operation.finished`; return that event's fields.

    Raises `error(text)` when the operation failed, or when nothing finished it within `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with ProgressBar(title, stream=stream) as bar:
        while True:
            wait = 25.0 if deadline is None else max(0.0, min(25.0, deadline - time.monotonic()))
            answer = ctl.call("events-wait", after_id=after_id, type="operation", op=op, wait=wait, limit=1000)
            if answer.get("result") in (1, 2):
                raise error(answer.get("text", "events-wait failed"))
            after_id = answer["arguments"].get("last_id", after_id)
            for e in answer["arguments"].get("events", []):
                f = e["fields"]
                if e["type"] == "operation.progress":
                    bar.unit = f.get("unit") or bar.unit
                    bar.update(int(f.get("done") or 0), f.get("total"))
                elif e["type"] == "operation.finished":
                    bar.finish(ok=bool(f.get("ok")), text=f.get("text", ""))
                    if not f.get("ok"):
                        raise error(f"{f.get('name', 'operation')} {op}: {f.get('text') or 'failed'}")
                    return f
            if deadline is not None and time.monotonic() >= deadline:
                raise error(f"operation {op}: not finished within {timeout:.0f} s")
