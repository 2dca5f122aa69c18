"""KV cache sizes from gpu_memory_utilization, where each stage runs and which stage owns the cache, and the
admission ledger the stages of one cache share."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bagel_serve import Omni
from bagel_serve.config.deploy_loader import apply_overrides, load_deploy_config, parse_deploy_config, resolve_deploy_path
from bagel_serve.config.pipelines import PIPELINES
from bagel_serve.config.engine_options import EngineOptions
from bagel_serve.engine.kv_budget import GRAPH_RESERVE_BYTES, OTHER_PROCESS_RESERVE_BYTES, cpu_blocks, cuda_blocks
from bagel_serve.engine.request import make_request
from bagel_serve.pipeline import placement
from bagel_serve.pipeline.placement import WeightSource, ray_bundles, stage_devices, stage_setups

GIB = 2**30
GPU0, GPU1 = torch.device("cuda", 0), torch.device("cuda", 1)
ROOT = Path(__file__).resolve().parents[1]
BAGEL = load_deploy_config(resolve_deploy_path("bagel.yaml"))  # two stages on devices "0", 0.45 each
PIPE = PIPELINES["bagel"]


def blocks(**kw) -> int:
    args = dict(total_bytes=80 * GIB, utilization=0.9, weights_bytes=28 * GIB, activation_bytes=3 * GIB,
                other_processes=0, block_bytes=GIB // 1024, graphs=False, where="cuda:0 (stage 0)")
    return cuda_blocks(**{**args, **kw})


def test_the_cache_gets_what_is_left_of_the_share() -> None:
    assert blocks() == int((72 * GIB - 31 * GIB) // (GIB // 1024))
    assert blocks(graphs=True) == int((72 * GIB - 31 * GIB - GRAPH_RESERVE_BYTES) // (GIB // 1024))
    assert blocks(other_processes=1) == int((72 * GIB - 31 * GIB - OTHER_PROCESS_RESERVE_BYTES) // (GIB // 1024))


def test_a_share_too_small_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"gpu_memory_utilization 0.3 on cuda:0 \(stage 0\): 24.0 GiB allowed, but the "
                                         r"weights use 28.0 GiB, activations 3.0 GiB: nothing is left for the KV cache"):
        blocks(utilization=0.3)


def test_cpu_cache_is_small_by_default_or_as_asked() -> None:
    assert cpu_blocks(8 * 1024) == 16384  # the tiny model: capped
    assert cpu_blocks(2 * 2**20) == 1024  # a full-size model on the CPU: 2 GiB worth
    assert cpu_blocks(2 * 2**20, requested=10) == 10


def test_stage_placement_from_deploy_devices() -> None:
    """Stages with stage 0's devices share the model's GPU; another stage runs on its own device; Ray
    bundles give each GPU stage a whole GPU or an equal share of one."""
    assert stage_devices(GPU0, BAGEL, 2) == [GPU0, GPU0]
    assert stage_devices(torch.device("cpu"), BAGEL, 2) == [torch.device("cpu")] * 2
    split = apply_overrides(BAGEL, {}, {"1": {"devices": "1"}})
    assert stage_devices(GPU0, split, 2) == [GPU0, GPU1]
    assert ray_bundles([GPU0, GPU0]) == ([{"CPU": 1.0, "GPU": 0.5}] * 2, [0.5, 0.5])
    assert ray_bundles([GPU0, GPU1]) == ([{"CPU": 1.0, "GPU": 1.0}] * 2, [1.0, 1.0])
    assert ray_bundles([torch.device("cpu")]) == ([{"CPU": 1.0}], [0.0])


def test_who_owns_the_cache() -> None:
    opts = EngineOptions()
    # One process per stage on one GPU: stage 0 allocates from the pooled shares, stage 1 reads it in place.
    s0, s1 = stage_setups(PIPE, BAGEL, opts, GPU0, backend="process")
    assert (s0.utilization, s0.borrows_cache, s0.counts_weights, s0.other_processes, s0.lend) == (0.9, False, True, 1, True)
    assert (s1.borrows_cache, s1.counts_weights, s1.decodes, s1.denoises) == (True, False, False, True)
    assert s0.decodes and not s0.denoises
    # Stage 1 on another GPU has its own weights there and its own share.
    split = apply_overrides(BAGEL, {}, {"1": {"devices": "1"}})
    s0, s1 = stage_setups(PIPE, split, opts, GPU0, backend="process")
    assert (s0.utilization, s0.other_processes, s1.device, s1.utilization, s1.borrows_cache) == (0.45, 0, "cuda:1", 0.45, False)
    # A stage that gives no share gets an equal part of the default.
    raw = copy.deepcopy(split.raw)
    del raw["stages"][1]["gpu_memory_utilization"]
    unset = parse_deploy_config(raw)
    assert stage_setups(PIPE, unset, opts, GPU0, backend="process")[1].utilization == 0.9
    # Ray actors each load the weights and copy hand-offs by value.
    r0, r1 = stage_setups(PIPE, BAGEL, opts, GPU0, backend="ray")
    assert (r0.utilization, r0.borrows_cache, r0.to_cpu, r1.borrows_cache) == (0.45, False, True, False)


def test_a_multi_rank_stage_takes_its_share_of_each_gpu_it_shares() -> None:
    """A Thinker of two ranks on GPUs 0 and 1 and a DiT on GPU 0: each has its own weights and cache on GPU 0,
    so neither takes the whole default share there; stage 0's ranks load their own weights and copy hand-offs."""
    raw = copy.deepcopy(BAGEL.raw)
    for st in raw["stages"]:
        del st["gpu_memory_utilization"]
    raw["stages"][0].update(devices="0,1", tensor_parallel_size=2)
    deploy = parse_deploy_config(raw)
    weights = WeightSource("/ckpt", torch.bfloat16)
    s0, s1 = stage_setups(PIPE, deploy, EngineOptions(), GPU0, backend="process", weights=weights)
    assert (s0.num_ranks, s0.rank_devices, s0.weights, s0.lend, s0.to_cpu) == (2, ("cuda:0", "cuda:1"), weights, False, True)
    assert s0.for_rank(1).device == "cuda:1" and s0.for_rank(1).ranks.rank == 1
    assert s0.utilization == s1.utilization == 0.9 / 2
    assert (s1.borrows_cache, s1.lend, s1.num_ranks) == (False, False, 1)
    with pytest.raises(ValueError, match="worker processes"):
        stage_setups(PIPE, deploy, EngineOptions(), GPU0, backend="inline", weights=weights)


def test_inline_stages_share_one_cache_and_ledger(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stages in one process share one cache: a request's reservation, made at stage 0, covers its stage 1
    too and is given back once, when it ends; with room for one request at a time they still all complete."""
    reqs = [{"modality": "text2img", "prompt": f"a cat {i}", "steps": 3, "height": 32, "width": 32, "seed": i}
            for i in range(4)] + [{"modality": "text2text", "prompt": "hi", "max_tokens": 4}]
    probe = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml")
    need = max(probe.stage.estimate_blocks(r, probe.stage.prepare(0, r)) for r in (make_request(d, 0) for d in reqs))
    monkeypatch.setattr(placement, "cpu_blocks", lambda block_bytes, requested=None: need + 1)  # one request's worth
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml", worker_backend="inline",
                stage_overrides={"0": {"max_num_seqs": 8}, "1": {"max_num_seqs": 8}})
    s0, s1 = omni.orchestrator.transport.stages
    assert s0 is s1
    manager = s0.cache.manager
    seen: list[int] = []
    real_admit = manager.try_admit

    def admit(n: int) -> bool:
        ok = real_admit(n)
        seen.append(manager.admitted)
        return ok

    monkeypatch.setattr(manager, "try_admit", admit)
    outs = omni.generate(reqs)
    assert len(outs) == 5 and all(o.images for o in outs[:4]) and outs[4].token_ids
    assert max(seen) <= need and manager.admitted == 0 and manager.num_used == 0
    assert omni.stage_stats[0].admitted == 5 and omni.stage_stats[1].admitted == 4
