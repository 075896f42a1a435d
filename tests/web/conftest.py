"""tests/web: its helpers (web_support.py) importable by the test files; the screenshots' folder."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from web_support import ARTIFACTS  # noqa: E402


@pytest.fixture
def artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
