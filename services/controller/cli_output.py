"""How the CLI prints: tables (rich on a terminal, plain aligned columns through a pipe), ages and times."""

from __future__ import annotations

import os
import re
import sys
import time
from datetime import datetime
from typing import Any

from services.controller.control_client import CliError


def _table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    """A table: rich on a terminal; plain aligned columns through a pipe (no escapes, no wrapping)."""
    cells = [["-" if v is None or v == "" else str(v) for v in row] for row in rows]
    if not sys.stdout.isatty():
        if title:
            print(title)
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        for line in [columns, *cells]:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for col in columns:
        table.add_column(col)
    for row in cells:
        table.add_row(*row, style="red" if any(v.startswith("failed") for v in row) else None)
    Console(width=max(100, _terminal_width())).print(table)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 160


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def parse_since(text: str) -> float:
    """`90s`, `10m`, `2h`, `1d` ago, or an ISO date/time."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise CliError(f"--since {text}: expected 10m, 2h, 1d or an ISO date such as 2026-11-26T10:00") from None
