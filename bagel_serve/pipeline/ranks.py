"""How one rank of a multi-rank stage joins its peers and gets its weights.

The parent starts one worker process per rank (the same entry point as every stage worker) and gives each
the stage's setup with its rank. A rank joins the stage's process groups, seeds its RNGs with the stage's
seed, and loads the weights itself: under tensor parallelism only its slices of the projections, the
embedding and the LM head (the ViT, the connector, the embedders and the VAE whole: they are small next to
the LLM and run once per image); under HSDP the whole model on the CPU, whose decoder layers, embedding and
LM head are then sharded over the ranks; under CFG parallelism alone the whole model.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from bagel_serve.distributed.hsdp import hsdp_mesh, shard_decoder_layers
from bagel_serve.distributed.parallel_state import init_stage_groups
from bagel_serve.model.loader import check_quantization_device, load_model
from bagel_serve.pipeline.placement import StageSetup


def join_stage(setup: StageSetup) -> tuple[Any, Any]:
    """Join the stage's ranks and load this rank's model and VAE onto its device."""
    layout, weights = setup.ranks, setup.weights
    if layout is None or weights is None:
        raise ValueError(f"stage {setup.stage} is not a stage of several ranks")
    device = torch.device(setup.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_stage_groups(layout, device)
    random.seed(layout.seed)
    torch.manual_seed(layout.seed)
    if layout.use_hsdp:
        # Loaded whole on the CPU (quantised there), then each decoder layer keeps its shard on the device
        # and everything else moves there whole.
        if weights.quantization is not None:
            check_quantization_device(device, weights.dtype, weights.quantization)
        loaded = load_model(weights.model_dir, device="cpu", dtype=weights.dtype, quantization=weights.quantization,
                            fp8_device_checked=weights.quantization is not None)
        shard_decoder_layers(loaded.model, hsdp_mesh(layout.hsdp_shard, layout.hsdp_replicate, device.type))
        return loaded.model, loaded.vae.to(device)
    loaded = load_model(weights.model_dir, device=device, dtype=weights.dtype, quantization=weights.quantization)
    return loaded.model, loaded.vae
