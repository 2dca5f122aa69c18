"""How many KV cache blocks a stage allocates at start.

vLLM's meaning of `gpu_memory_utilization`: the share of a device's memory the engine may use in all. What is
left of it after the weights, the activation peak (measured by running the largest forwards the stage will
run: `profile_activation_bytes`), room for the CUDA graphs and for the other processes on the device, is the
KV cache. Stages on one device pool their shares: the two stages of the Thinker -> DiT topology share one
copy of the weights and one KV cache (the DiT reads the Thinker's blocks in place), so only one of them
allocates. On the CPU the cache is a fixed number of blocks (`kv_cache_blocks`, or a default that stays small).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from bagel_serve.distributed.parallel_state import decodes_images
from bagel_serve.engine.diffusion import VaeMode, decode_image
from bagel_serve.engine.kv_cache import Context, KVCache
from bagel_serve.engine.runner import ModelRunner
from bagel_serve.engine.sequence import Work
from bagel_serve.engine.tokenizer import SpecialTokens
from bagel_serve.model.layout import LatentPiece, TextPiece, flattened_position_ids
from bagel_serve.model.autoencoder import AutoEncoder
from bagel_serve.model.bagel import Bagel

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
OTHER_PROCESS_RESERVE_BYTES = 6 * 2**30
"""Kept for each other process computing on the device (its activations: a 1024x1024 denoising step and the
VAE decode after it need ~4 GiB) and its CUDA context."""
GRAPH_RESERVE_BYTES = 2**30
"""Kept for the CUDA graphs (decode and denoising: their static buffers and the memory pool they share)."""
CPU_DEFAULT_BYTES = 2 * 2**30
CPU_MAX_BLOCKS = 16384


def cpu_blocks(block_bytes: int, requested: int | None = None) -> int:
    """A CPU cache's size: `requested`, else as many blocks as fit in 2 GiB, at most 16384."""
    if requested is not None:
        return requested
    return max(64, min(CPU_MAX_BLOCKS, CPU_DEFAULT_BYTES // block_bytes))


def cuda_blocks(*, total_bytes: int, utilization: float, weights_bytes: int, activation_bytes: int,
                other_processes: int, block_bytes: int, graphs: bool, where: str) -> int:
    """Blocks that fit in `utilization` of the device after everything else; ValueError with the numbers when
    nothing is left for the cache."""
    allowed = utilization * total_bytes
    kept = weights_bytes + activation_bytes + other_processes * OTHER_PROCESS_RESERVE_BYTES
    kept += GRAPH_RESERVE_BYTES if graphs else 0
    blocks = int((allowed - kept) // block_bytes)
    if blocks < 2:
        gib = 2**30
        raise ValueError(
            f"gpu_memory_utilization {utilization:g} on {where}: {allowed / gib:.1f} GiB allowed, but the weights use "
            f"{weights_bytes / gib:.1f} GiB, activations {activation_bytes / gib:.1f} GiB"
            + (f", {other_processes} other stage process(es) {other_processes * OTHER_PROCESS_RESERVE_BYTES / gib:.1f} GiB"
               if other_processes else "")
            + (f", CUDA graphs {GRAPH_RESERVE_BYTES / gib:.1f} GiB" if graphs else "")
            + ": nothing is left for the KV cache (raise gpu_memory_utilization, lower max_num_batched_tokens, "
              "or set kv_cache_blocks)")
    return blocks


def weights_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the modules' parameters and buffers on this device (also for meta-device skeletons): a
    parameter sharded over ranks (HSDP) counts its local shard."""
    return sum(_local(t).numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.inference_mode()
def profile_activation_bytes(model: Bagel, vae: AutoEncoder, special: SpecialTokens, *, max_rows: int,
                             denoises: bool, vae_mode: VaeMode = VaeMode()) -> int:
    """Peak device memory above the weights while running the largest forwards a stage will run: a prompt of
    `max_rows` tokens and, for a stage that makes images, a denoising step of three CFG branches at the
    largest image and the VAE decode of that image."""
    cfg, dev = model.config, model.device
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    llm = cfg.llm
    attn = model.language_model.model.layers[0].self_attn  # this rank's heads, under TP
    cache = KVCache(llm.num_hidden_layers, attn.num_kv_heads, llm.head_dim, 2, dtype=model.dtype, device=dev)
    runner = ModelRunner(model, cache, special, enforce_eager=True)
    ctx = Context(cache)
    runner.execute([Work(ctx, TextPiece(torch.zeros(max_rows, dtype=torch.long)), commit=False)])
    if denoises:
        side = cfg.max_latent_size
        pos = flattened_position_ids(side, side, side)
        x = torch.randn(side * side, cfg.patch_latent_dim)
        v = runner.execute([Work(ctx, LatentPiece(x, 1.0, pos), commit=False, want_output=True) for _ in range(3)])
        del v
        if decodes_images():
            decode_image(vae, x.to(dev), cfg.max_image_side, cfg.max_image_side, cfg, vae_mode)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del runner, ctx, cache
    torch.cuda.empty_cache()
    return peak
