"""KV budgets from gpu_memory_utilization, and the pool's admission ledger shared by the stages of a pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bagel_serve import Omni
from bagel_serve.engine.kv_cache import KVPool
from bagel_serve.engine.memory import ACTIVATION_RESERVE_BYTES, DEFAULT_GPU_MEMORY_UTILIZATION, StagePlacement, \
    kv_block_budgets

GIB = 2**30
GPU0, GPU1 = torch.device("cuda", 0), torch.device("cuda", 1)
H100 = {GPU0: 80 * GIB, GPU1: 80 * GIB}
ROOT = Path(__file__).resolve().parents[1]


def budgets(stages, one_process=False, weights=28 * GIB, block=GIB // 1024):
    return kv_block_budgets(stages, weights_bytes=weights, block_bytes=block, one_process=one_process,
                            total_memory=H100.__getitem__)


def test_two_stages_on_one_gpu_pool_their_shares_and_count_the_weights_once() -> None:
    # bagel.yaml: 0.45 + 0.45 of 80 GiB = 72 GiB; weights 28 once; a 6 GiB reserve per worker process.
    got = budgets([StagePlacement(GPU0, 0.45, False), StagePlacement(GPU0, 0.45, False)])
    kv = 72 * GIB - 28 * GIB - 2 * ACTIVATION_RESERVE_BYTES
    assert got == [kv // 2 // (GIB // 1024)] * 2
    # In one process (inline) one reserve.
    inline = budgets([StagePlacement(GPU0, 0.45, False), StagePlacement(GPU0, 0.45, False)], one_process=True)
    assert sum(inline) == (72 * GIB - 28 * GIB - ACTIVATION_RESERVE_BYTES) // (GIB // 1024)


def test_stage_on_another_gpu_has_its_own_weights_and_budget() -> None:
    got = budgets([StagePlacement(GPU0, 0.5, False), StagePlacement(GPU1, 0.9, True)])
    block = GIB // 1024
    assert got == [int((40 * GIB - 28 * GIB - ACTIVATION_RESERVE_BYTES) // block),
                   int((72 * GIB - 28 * GIB - ACTIVATION_RESERVE_BYTES) // block)]


def test_no_share_given_means_the_default_and_cpu_is_unbounded() -> None:
    got = budgets([StagePlacement(GPU0, None, False)], one_process=True)
    assert got == [int((DEFAULT_GPU_MEMORY_UTILIZATION * 80 * GIB - 28 * GIB - ACTIVATION_RESERVE_BYTES) // (GIB // 1024))]
    assert budgets([StagePlacement(torch.device("cpu"), 0.5, False)]) == [None]


def test_a_share_too_small_for_the_weights_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"gpu_memory_utilization on cuda:0 \(stage 0: 0.3\): 24.0 GiB allowed, but "
                                         r"the weights use 28.0 GiB and activations need 6.0 GiB: nothing is left"):
        budgets([StagePlacement(GPU0, 0.3, False)])


def test_admission_ledger() -> None:
    pool = KVPool(2, 1, 4, max_blocks=10)
    assert pool.try_admit(6) and not pool.try_admit(5) and pool.try_admit(4)
    pool.unadmit(6)
    assert pool.admitted == 4 and pool.try_admit(6)
    with pytest.raises(RuntimeError, match=r"unadmit\(11\) with only 10 blocks reserved"):
        pool.unadmit(11)
    assert KVPool(2, 1, 4).try_admit(10**9)  # unbounded


def test_inline_stages_share_one_ledger(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stages on one pool: a request's reservation, made at stage 0, covers its stage 1 too and is
    given back once, when it ends; with room for one request at a time they still all complete."""
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config=ROOT / "deploy" / "bagel.yaml", worker_backend="inline",
                stage_overrides={"0": {"max_num_seqs": 8}, "1": {"max_num_seqs": 8}})
    runner, pool = omni.runner, omni.runner.pool
    reqs = [{"modality": "text2img", "prompt": f"a cat {i}", "steps": 3, "height": 32, "width": 32, "seed": i}
            for i in range(4)] + [{"modality": "text2text", "prompt": "hi", "max_tokens": 4}]
    need = max(runner.estimate_blocks(r, runner.prepare(0, r)) for r in map(_req, reqs))
    pool.max_blocks = need  # one request's worth
    seen: list[int] = []
    real_admit = pool.try_admit

    def admit(n: int) -> bool:
        ok = real_admit(n)
        seen.append(pool.admitted)
        return ok

    monkeypatch.setattr(pool, "try_admit", admit)
    outs = omni.generate(reqs)
    assert len(outs) == 5 and all(o.images for o in outs[:4]) and outs[4].token_ids
    assert max(seen) <= need and pool.admitted == 0
    assert omni.stage_stats[0].admitted == 5 and omni.stage_stats[1].admitted == 4


def _req(d: dict):
    from bagel_serve.engine.request import make_request

    return make_request(d, 0)


def test_stage_placement_from_deploy_devices() -> None:
    """Stages with stage 0's devices share the model's GPU; another stage runs on its first device; Ray
    bundles give each GPU stage a whole GPU or an equal share of one."""
    from bagel_serve.config.deploy import apply_overrides, load_deploy_config
    from bagel_serve.pipeline.ray_workers import _bundles
    from bagel_serve.pipeline.workers import stage_devices

    same = load_deploy_config(ROOT / "deploy" / "bagel.yaml")  # both stages on devices "0"
    assert stage_devices(GPU0, same, 2) == [GPU0, GPU0]
    assert stage_devices(torch.device("cpu"), same, 2) == [torch.device("cpu")] * 2
    split = apply_overrides(same, {}, {"1": {"devices": "1,2"}})
    assert stage_devices(GPU0, split, 2) == [GPU0, GPU1]
    assert _bundles([GPU0, GPU0]) == ([{"CPU": 1.0, "GPU": 0.5}] * 2, [0.5, 0.5])
    assert _bundles([GPU0, GPU1]) == ([{"CPU": 1.0, "GPU": 1.0}] * 2, [1.0, 1.0])
    assert _bundles([torch.device("cpu")]) == ([{"CPU": 1.0}], [0.0])
