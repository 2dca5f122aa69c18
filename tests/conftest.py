"""Shared fixtures: the golden reference data produced by the official implementation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(os.environ.get("BAGEL_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    # Missing goldens must fail the run, never skip it: parity is the definition of correct.
    assert GOLDEN_DIR.is_dir(), f"golden data not found at {GOLDEN_DIR} (set BAGEL_GOLDEN_DIR)"
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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint in the real layout with the real Qwen2.5 tokenizer, written once."""
    from bagel_serve.testing.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0)
