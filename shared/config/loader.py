"""Reading a configuration from YAML or a dict, with errors that name the field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shared.config.model import BootfleetConfig


class ConfigError(ValueError):
    """A configuration was rejected; `errors` lists `path: reason` lines."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "tagged-union")):
            out += f".{part}" if out else part
    return out or "(root)"


def format_validation_error(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("[key]",)))
        lines.append(f"{_path(loc)}: {msg}")
    return lines


def config_from_dict(data: Any) -> BootfleetConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(root): expected a mapping, got {type(data).__name__}"])
    try:
        return BootfleetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def parse_yaml(text: str, source: str = "<config>") -> BootfleetConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    return config_from_dict(data)


def load_config_file(path: str | Path) -> BootfleetConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"]) from None
    return parse_yaml(text, str(path))
