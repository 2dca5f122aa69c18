"""HSDP (FSDP2 over the decoder layers) in real multi-process gloo groups on the CPU, float32, on the golden
checkpoint: a sharded model gives bitwise the same text and image as the unsharded one, and each rank holds
1/shard of the decoder layers' weights.

Bitwise, not within rounding: FSDP's all-gather only copies bytes, so each layer's forward multiplies the
very same full float32 weights with the same kernels over the same rows as the unsharded model does.
Every rank compares against an unsharded copy in its own process, under the engine's `inference_mode`.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
import time
import weakref
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from bagel_serve.distributed.hsdp import (hsdp_mesh, shard_decoder_layers, unsharded_layer_bytes,
                                          weight_bytes_per_rank)

JOIN_TIMEOUT_S = 120
PRELOAD = ["torch.distributed.fsdp", "bagel_serve.model.loader", "bagel_serve.engine.stage_engine",
           "bagel_serve.distributed.hsdp"]
"""Imported once by the fork server, so that each rank starts without paying the imports again."""
REQUESTS = [
    {"modality": "text2text", "prompt": "Hello there", "max_tokens": 4},
    {"modality": "text2img", "prompt": "a red cat", "steps": 2, "height": 32, "width": 32, "seed": 3,
     "return_latents": True},
]


def _stage(model, vae, ckpt: Path):
    from bagel_serve.engine.kv_cache import KVCache
    from bagel_serve.engine.stage_engine import Stage
    from bagel_serve.engine.tokenizer import BagelTokenizer

    llm = model.config.llm
    cache = KVCache(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, 32)
    return Stage(model, vae, BagelTokenizer(ckpt), cache, enforce_eager=True)


def _generate(stage, d: dict):
    from bagel_serve.engine.request import make_request

    req = make_request(d)
    return stage.run_alone(stage.program(0, req, stage.prepare(0, req)))


def _same_outputs(ref_stage, stage) -> None:
    for d in REQUESTS:
        want, got = _generate(ref_stage, d), _generate(stage, d)
        assert got.token_ids == want.token_ids and got.text == want.text, d["modality"]
        if want.latents is not None:
            assert torch.equal(got.latents, want.latents)
            assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))


def _worker(rank: int, world: int, store: str, ckpt: str, shard: int, replicate: int, prefetch: bool) -> None:
    from bagel_serve.model.loader import load_model

    torch.set_num_threads(1)  # the ranks share two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        loaded = load_model(ckpt, device="cpu")
        model, ref = loaded.model, copy.deepcopy(loaded.model)
        layers = model.language_model.model.layers
        sharded = [layers, model.language_model.model.embed_tokens, model.language_model.lm_head]
        full_sharded = sum(weight_bytes_per_rank(m) for m in sharded)
        full_layers = weight_bytes_per_rank(layers)
        full_total = weight_bytes_per_rank(model)
        gathered = unsharded_layer_bytes(model)
        originals = [weakref.ref(p) for p in layers.parameters()]

        mesh = hsdp_mesh(shard, replicate, "cpu")
        assert mesh.ndim == (1 if replicate == 1 else 2)
        shard_decoder_layers(model, mesh, prefetch=prefetch)

        # Only the decoder layers, the token embedding and the LM head are sharded, each rank holds exactly
        # its 1/shard of them (every sharded dimension of the golden config divides by 2), and the full
        # tensors they were cut from are gone.
        assert all(isinstance(p, DTensor) for m in sharded for p in m.parameters())
        prefixes = ("language_model.model.layers.", "language_model.model.embed_tokens.", "language_model.lm_head.")
        rest = [p for n, p in model.named_parameters() if not n.startswith(prefixes)]
        assert rest and not any(isinstance(p, DTensor) for p in rest)
        gc.collect()
        assert all(r() is None for r in originals)
        assert weight_bytes_per_rank(layers) * shard == full_layers
        assert weight_bytes_per_rank(model) == full_total - full_sharded + full_sharded // shard
        assert unsharded_layer_bytes(model) == gathered

        # Inside a layer's forward its linears see the gathered full weight as a plain tensor.
        seen: list[tuple[type, tuple[int, ...]]] = []
        probes = [layers[0].self_attn.qkv_proj, layers[-1].mlp_moe_gen.down_proj]
        ref_probes = [ref.language_model.model.layers[0].self_attn.qkv_proj,
                      ref.language_model.model.layers[-1].mlp_moe_gen.down_proj]
        hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((type(m.weight), tuple(m.weight.shape))))
                 for m in probes]

        _same_outputs(_stage(ref, loaded.vae, Path(ckpt)), _stage(model, loaded.vae, Path(ckpt)))
        for h in hooks:
            h.remove()
        full_shapes = {(torch.nn.Parameter, tuple(m.weight.shape)) for m in ref_probes}
        assert seen and set(seen) == full_shapes
        # Resharded after every forward: nothing gathered is left behind.
        assert all(isinstance(p, DTensor) for m in sharded for p in m.parameters())
        assert weight_bytes_per_rank(model) == full_total - full_sharded + full_sharded // shard

        if replicate > 1:
            # A shard size of 1 shards nothing (FSDP2's one-rank path cannot run under inference_mode).
            plain = copy.deepcopy(ref)
            shard_decoder_layers(plain, hsdp_mesh(1, world, "cpu"))
            assert not any(isinstance(p, DTensor) for p in plain.parameters())
            _same_outputs(_stage(ref, loaded.vae, Path(ckpt)), _stage(plain, loaded.vae, Path(ckpt)))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, *args) -> None:
    """Run `_worker` on `world` ranks; a rank's failure fails the test with its traceback, and a hang is
    killed after JOIN_TIMEOUT_S instead of stalling the run. The ranks are forked from a fresh fork server
    (no threads or state of this test process leak into them)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    ctx = mp.start_processes(_worker, args=(world, *args), nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"HSDP ranks did not finish within {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


@pytest.mark.parametrize("shard,replicate,prefetch", [(2, 1, False), (2, 2, True)], ids=["fsdp2", "hsdp2x2"])
def test_sharded_layers_match_unsharded(golden_a: Path, tmp_path: Path, shard: int, replicate: int,
                                        prefetch: bool) -> None:
    _spawn(shard * replicate, str(tmp_path / "store"), str(golden_a / "checkpoint"), shard, replicate, prefetch)


def test_mesh_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="hsdp_shard_size"):
        hsdp_mesh(0, 1, "cpu")
    with pytest.raises(ValueError, match="hsdp_replicate_size"):
        hsdp_mesh(2, 0, "cpu")
    with pytest.raises(TypeError, match="hsdp_shard_size"):
        hsdp_mesh(2.0, 1, "cpu")
    with pytest.raises(RuntimeError, match="init_process_group"):
        hsdp_mesh(2, 1, "cpu")
