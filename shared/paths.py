"""Where configured files live: a relative path in the configuration is under the state directory."""

from __future__ import annotations

from pathlib import Path


def state_path(state_dir: str | Path, path: str | Path) -> Path:
    """`path` under `state_dir` when relative; an absolute `path` stays as it is."""
    return Path(state_dir) / path  # pathlib keeps an absolute right-hand side whole
