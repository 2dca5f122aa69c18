"""Stages of several ranks on the CPU: real processes in real gloo groups, float32, on the golden checkpoint.

Each layout runs golden cases through `Omni` (one worker process per rank, started by the engine) and must
reproduce the official outputs with the single-process parity suite's tolerances, and the outputs of one
rank: the same tokens, latents within float32 rounding (a sharded or split forward sums in another order).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from bagel_serve import Omni
from bagel_serve.pipeline.orchestrator import WorkerDiedError
from test_golden_parity import GOLDEN, TOL, case, image_diff, kwargs_to_request, rel

TEXT = ["t2t_greedy_0", "img2text_rgb"]
IMAGE = ["t2i_64x64", "img2img", "interleave_edit_2img"]
SEER = "img2img"
"""The case also run with TaylorSeer: under CFG parallelism each rank must still cache every branch."""


def _stage(devices: str, **keys: object) -> str:
    lines = ["  - stage_id: {id}", f'    devices: "{devices}"', "    max_num_seqs: 8"]
    lines += [f"    {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]
    return "\n".join(lines)


def _yaml(tmp: Path, name: str, *stages: str, pipeline: str | None = None) -> Path:
    body = (f"pipeline: {pipeline}\n" if pipeline else "") + "stages:\n"
    body += "\n".join(s.format(id=i) for i, s in enumerate(stages)) + "\n"
    path = tmp / f"{name}.yaml"
    path.write_text(body)
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One rank's outputs of every case (the reference the layouts must match)."""
    omni = Omni(GOLDEN / "checkpoint", device="cpu", dtype=torch.float32, deploy_config="bagel_single_stage.yaml")
    try:
        outs = {name: omni.generate([kwargs_to_request(case(name)[0])])[0] for name in TEXT + IMAGE}
        outs["taylorseer"] = omni.generate([_with_taylorseer(SEER)])[0]
        return outs
    finally:
        omni.shutdown()


def _with_taylorseer(name: str) -> dict:
    # 12 steps: past TaylorSeer's first five full ones, so that most are predicted.
    return {**kwargs_to_request(case(name)[0]), "enable_taylorseer": True, "steps": 12}


def _check(omni: Omni, names: list[str], single: dict[str, object]) -> None:
    for name in names:
        c, g = case(name)
        (out,) = omni.generate([kwargs_to_request(c)])
        one = single[name]
        assert out.token_ids == one.token_ids, name
        if name in TEXT:
            assert out.token_ids == g["gen_text_0_ids"].tolist()[1:], name
            assert out.text == c["outputs"][0]["text"], name
            continue
        assert rel(out.latents, g["final_latent_packed"]) < TOL, name
        assert rel(out.latents, one.latents) < TOL, name
        assert image_diff(out.images[0], g["image_uint8"]) <= 1, name
    if SEER in names and omni.deploy_config.stage(omni.pipeline.num_stages - 1).cfg_parallel_size > 1:
        # TaylorSeer predicts most steps from cached hidden rows: every rank must hold every branch's.
        (out,) = omni.generate([_with_taylorseer(SEER)])
        assert rel(out.latents, single["taylorseer"].latents) < TOL


LAYOUTS: dict[str, tuple[str | list[str], str | None, list[str]]] = {
    # name: (a bundled deploy config, or stages for a written one; its pipeline; the cases it runs)
    "bagel_tp2_vae_pp2.yaml": ("bagel_tp2_vae_pp2.yaml", None, TEXT + IMAGE),
    "bagel_thinker_tp2.yaml": ("bagel_thinker_tp2.yaml", None, ["t2t_greedy_0", "img2img"]),
    "bagel_cfg3.yaml": ("bagel_cfg3.yaml", None, IMAGE),
    "bagel_hsdp4.yaml": ("bagel_hsdp4.yaml", None, ["t2i_64x64"]),
    # CFG parallel 2 (img2img: three branches on two ranks) with HSDP shard 2 over the same two ranks.
    "cfg2_hsdp2": ([_stage("0,1", cfg_parallel_size=2, use_hsdp=True, hsdp_shard_size=2)], "bagel_single_stage",
                   ["t2t_greedy_0", "t2i_64x64", "img2img"]),
    "thinker_tp1_dit_tp2": ([_stage("0"), _stage("0,1", tensor_parallel_size=2)], None, ["t2i_64x64"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_reproduces_the_goldens_and_one_rank(layout: str, single: dict[str, object], tmp_path: Path) -> None:
    config, pipeline, names = LAYOUTS[layout]
    deploy = config if isinstance(config, str) else _yaml(tmp_path, layout, *config, pipeline=pipeline)
    omni = Omni(GOLDEN / "checkpoint", device="cpu", dtype=torch.float32, deploy_config=deploy)
    try:
        assert omni.topology["worker_backend"] == "process"
        _check(omni, names, single)
        if layout == "thinker_tp1_dit_tp2":
            _kill_a_rank(omni)
    finally:
        omni.shutdown()


def _kill_a_rank(omni: Omni) -> None:
    """A rank that dies (rank 1 of the DiT stage, idle) takes its stage down: the engine's health names the
    rank, and a request fails with WorkerDiedError at once instead of waiting on a collective for ever."""
    follower = omni.orchestrator.transport.rank_procs[1][1]
    os.kill(follower.pid, signal.SIGKILL)
    follower.wait(timeout=10)
    assert "rank 1" in (omni.orchestrator.health() or "")
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match="stage 1 worker"):
        omni.generate([kwargs_to_request(case("t2i_64x64")[0])])
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("backend", ["inline", "ray"])
def test_a_stage_of_several_ranks_needs_worker_processes(backend: str) -> None:
    from bagel_serve.config.engine_options import EngineOptionError

    with pytest.raises(EngineOptionError, match=rf"worker_backend={backend}: a stage of several ranks .* ranks per "
                                                 r"stage \[2\]\) .* use worker_backend process"):
        Omni(GOLDEN / "checkpoint", device="cpu", dtype=torch.float32, deploy_config="bagel_tp2_vae_pp2.yaml",
             worker_backend=backend)
