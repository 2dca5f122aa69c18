"""Shared fixtures: the golden reference data produced by the official implementation, the tiny checkpoint,
the engine the server tests serve, and waiting for it to settle."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

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


@pytest.fixture(scope="module")
def omni(tiny_checkpoint: Path) -> Any:
    """The tiny checkpoint on the CPU in one stage, as the server tests serve it (one per module; a module
    that needs another engine defines its own `omni`)."""
    from bagel_serve import Omni

    with Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml") as o:
        yield o


@pytest.fixture(scope="module")
def fp8(tiny_checkpoint: Path) -> Any:
    """The same with `quantization="fp8"` (the FP8 tests' engine; one per module)."""
    from bagel_serve import Omni

    with Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml", quantization="fp8") as o:
        yield o


def _wait_until(cond: Callable[[], Any], timeout: float = 30.0, poll: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(poll)
    return bool(cond())


@pytest.fixture
def wait_until() -> Callable[..., bool]:
    """`wait_until(cond, timeout=30.0)`: True as soon as `cond()` is true, False when it is still false after
    `timeout` seconds (for what another thread or process finishes: cancellations, stage workers)."""
    return _wait_until


class EngineIdle:
    """Stage 0's KV blocks in use when a test starts; `wait()` asserts that the test's requests all end and
    give their blocks back (a leaked or uncancelled request fails it, naming what is left)."""

    def __init__(self, omni: Any) -> None:
        self.orchestrator = omni.orchestrator
        self.blocks = self.used_blocks()

    def used_blocks(self) -> int:
        return self.orchestrator.usage()[0]["used_blocks"]

    def wait(self, timeout: float = 60.0) -> None:
        orch = self.orchestrator
        assert _wait_until(lambda: orch.in_flight == 0, timeout), f"{orch.in_flight} request(s) still in flight"
        assert _wait_until(lambda: self.used_blocks() == self.blocks, timeout), \
            f"KV blocks still in use: {self.used_blocks()} (at the start: {self.blocks}); {orch.usage()}"


@pytest.fixture
def engine_idle(omni: Any) -> EngineIdle:
    return EngineIdle(omni)
