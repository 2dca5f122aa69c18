"""Shared fixtures: the golden reference data produced by the official implementation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN_DIR}")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden_a(golden_dir: Path) -> Path:
    """Directory of golden config A (checkpoint/, inputs/, cases/, cases.json)."""
    return golden_dir / "config_a"


@pytest.fixture(scope="session")
def golden_a_cases(golden_a: Path) -> dict:
    return json.loads((golden_a / "cases.json").read_text())


@pytest.fixture(scope="session")
def golden_a_config(golden_a: Path) -> dict:
    return json.loads((golden_a / "checkpoint" / "config.json").read_text())
