"""Shared fixtures: the golden reference data produced by the official implementation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run under Triton's interpreter on machines without a GPU; it must be chosen before any
# `triton.jit` decorates, i.e. before the kernel modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
