"""The running configuration and its revision, persisted atomically in the state directory.

Kea's rule: a configuration is staged, tested, then committed. `stage()` validates a candidate (the only
validation on the controller's side) and says why it is rejected without touching the running one;
`commit()` makes the staged candidate the next revision: written to a
temporary file, fsync'd, renamed over `running.json` (the old one stays whole until the rename), and only
then published. Every committed revision is also kept as `revisions/<N>.yaml` (the last KEEP of them).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared.atomic_file import write_atomic
from shared.config.loader import ConfigError, config_from_dict
from shared.config.model import BootfleetConfig

KEEP = 20


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Candidate:
    """A validated configuration: the model, and its normalised data (defaults filled in), which is what
    gets persisted and published."""

    config: BootfleetConfig
    data: dict[str, Any]


class ConfigStore:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "controller"
        self.path = self.dir / "running.json"
        self.revision = 0
        self.data: dict[str, Any] = {}
        self.config: BootfleetConfig | None = None
        self.seed_digest: str | None = None  # digest of the file the controller was started with

    def load(self) -> bool:
        """Load the persisted running configuration; False if there is none."""
        if not self.path.exists():
            return False
        doc = json.loads(self.path.read_text())
        self.config = config_from_dict(doc["config"])
        self.data = doc["config"]
        self.revision = doc["revision"]
        self.seed_digest = doc.get("seed_digest")
        return True

    @staticmethod
    def stage(data: Any) -> Candidate:
        """Validate a candidate; raises ConfigError naming each bad field."""
        config = config_from_dict(data)
        return Candidate(config, config.model_dump(mode="json"))

    def unchanged(self, candidate: Candidate) -> bool:
        return candidate.data == self.data

    def commit(self, candidate: Candidate, *, seed_digest: str | None = None) -> int:
        """Make a staged candidate the next revision (not validated again)."""
        config, normalised = candidate.config, candidate.data
        revision = self.revision + 1
        doc = {"revision": revision, "config": normalised, "seed_digest": seed_digest or self.seed_digest}
        write_atomic(self.path, json.dumps(doc, indent=1))
        write_atomic(self.dir / "revisions" / f"{revision}.yaml", yaml.safe_dump(normalised, sort_keys=False))
        self._prune_history(revision)
        self.revision, self.data, self.config = revision, normalised, config
        self.seed_digest = doc["seed_digest"]
        return revision

    def _prune_history(self, revision: int) -> None:
        for old in (self.dir / "revisions").glob("*.yaml"):
            if old.stem.isdigit() and int(old.stem) <= revision - KEEP:
                old.unlink(missing_ok=True)

    def document(self) -> dict[str, Any]:
        return {"revision": self.revision, "config": self.data}


_PATH_RE = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_path(path: str) -> list[str | int]:
    """`dhcp.scopes[0].range.end` -> ['dhcp', 'scopes', 0, 'range', 'end']."""
    parts: list[str | int] = []
    pos = 0
    for match in _PATH_RE.finditer(path):
        gap = path[pos : match.start()]
        if gap not in ("", "."):
            raise ConfigError([f"{path}: cannot parse the path near {gap!r}"])
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        pos = match.end()
    if not parts or path[pos:]:
        raise ConfigError([f"{path}: not a configuration path (e.g. dhcp.scopes[0].lease_time)"])
    return parts


def get_path(data: Any, path: str) -> Any:
    node = data
    for part in parse_path(path) if path else []:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            raise ConfigError([f"{path}: no such setting"]) from None
    return node


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `data` with `path` set to `value` (lists grow by one when the index is their length)."""
    out = json.loads(json.dumps(data))
    parts = parse_path(path)
    node: Any = out
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        try:
            if isinstance(part, int):
                if part == len(node):
                    node.append({} if isinstance(nxt, str) else [])
                node = node[part]
            else:
                if node.get(part) is None:
                    node[part] = {} if isinstance(nxt, str) else []
                node = node[part]
        except (IndexError, AttributeError, TypeError):
            raise ConfigError([f"{path}: no such setting ({'.'.join(map(str, parts[: i + 1]))})"]) from None
    last = parts[-1]
    try:
        if isinstance(last, int) and last == len(node):
            node.append(value)
        else:
            node[last] = value
    except (IndexError, TypeError):
        raise ConfigError([f"{path}: no such setting"]) from None
    return out
