"""VAE tiling and VAE patch parallelism: time and peak memory of a large decode and encode, untiled, tiled on
one device, and patch-parallel over two ranks that this script spawns itself (no torchrun).

    python benchmarks/bench_vae_parallel.py --ckpt /tmp/bagel-full --out $OUT/vae_parallel.json

On CUDA: 2048² by default, float32 with TF32 off (what the engine decodes with); patch parallel 2 runs when two
GPUs are visible (NCCL, one GPU per rank). Peaks are `torch.cuda.max_memory_allocated` above what was
allocated before the call (the weights and the input), per process. Every variant is also compared with
the untiled result (random weights: the numbers say the code ran, not how a trained VAE's seams look), and
the patch-parallel result with the one-rank tiled one (it must be bitwise equal).

CPU dry run (gloo ranks; no peaks; small tiles so that 256² has several), on any checkpoint directory with a
`config.json` and `ae.safetensors`, e.g. the tiny golden one:

    python benchmarks/bench_vae_parallel.py --ckpt ../shared/golden/config_a/checkpoint --device cpu \
        --size 256 --tile-latent 16 --stride-latent 12 --reps 1 --out /tmp/vae_parallel.json
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import header, parser, rel_l2, report
from safetensors.torch import load_file

from bagel_serve.model.autoencoder import AutoEncoder, decoded_to_uint8
from bagel_serve.model.loader import AE_FILE, read_config
from bagel_serve.model.vae_tiling import tile_grid, tiled_decode, tiled_encode

RANKS = 2


def load_vae(ckpt: str, device: torch.device) -> AutoEncoder:
    ae = AutoEncoder(read_config(Path(ckpt)).vae)
    ae.load_state_dict(load_file(Path(ckpt) / AE_FILE), strict=True)
    return ae.to(device).eval().requires_grad_(False)


def inputs(ae: AutoEncoder, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent to decode and the image to encode, the same on every rank (drawn on the CPU)."""
    g = torch.Generator().manual_seed(0)
    f = ae.params.downsample
    z = torch.randn(1, ae.params.z_channels, size // f, size // f, generator=g)
    x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    return z.to(device), x.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, reps: int, group: dist.ProcessGroup | None = None):
    """(output, median seconds, peak GiB above the allocation before the call; 0 on the CPU) of fn(), after
    one warm-up call; with a group, every rep starts together (a barrier) and ends when this rank is done."""
    out = fn()
    times = []
    peak = 0.0
    for _ in range(reps):
        del out
        if group is not None:
            dist.barrier(group=group)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = max(peak, (torch.cuda.max_memory_allocated(device) - before) / 2**30)
    return out, statistics.median(times), peak


def pixel_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest difference in uint8 levels between two decoded images."""
    return int((decoded_to_uint8(a.float()).int() - decoded_to_uint8(b.float()).int()).abs().max())


def float32_convs():
    """cuDNN without TF32 and with heuristic algorithms, as the engine decodes (and as bitwise equality
    across ranks needs: no per-process benchmark choice)."""
    b = torch.backends.cudnn
    return b.flags(enabled=b.enabled, benchmark=False, deterministic=b.deterministic, allow_tf32=False)


def tiling(a, f: int) -> tuple[dict, dict]:
    """The decode tiling the flags give, and the encode tiling that matches it (the same tiles in pixels)."""
    return ({"tile_latent": a.tile_latent, "stride_latent": a.stride_latent},
            {"tile": a.tile_latent * f, "stride": a.stride_latent * f})


def one_device(a, device: torch.device) -> dict:
    ae = load_vae(a.ckpt, device)
    z, x = inputs(ae, a.size, device)
    dec, enc = tiling(a, ae.params.downsample)
    res: dict = {"size": a.size, "tiles": len(tile_grid(z.shape[2], z.shape[3], a.tile_latent, a.stride_latent)),
                 **dec}
    with torch.inference_mode(), float32_convs():
        ref, res["decode_untiled_s"], res["decode_untiled_peak_gib"] = measure(lambda: ae.decode(z), device, a.reps)
        out, res["decode_tiled_s"], res["decode_tiled_peak_gib"] = measure(
            lambda: tiled_decode(ae, z, **dec), device, a.reps)
        res["decode_tiled_rel_l2"] = rel_l2(out, ref)
        res["decode_tiled_max_level_diff"] = pixel_diff(out, ref)
        del ref, out
        ref, res["encode_untiled_s"], res["encode_untiled_peak_gib"] = measure(
            lambda: ae.encode(x, sample=False), device, a.reps)
        out, res["encode_tiled_s"], res["encode_tiled_peak_gib"] = measure(
            lambda: tiled_encode(ae, x, generator=None, sample=False, **enc), device, a.reps)
        res["encode_tiled_rel_l2"] = rel_l2(out, ref)
    return res


def rank_main(rank: int, a, store: str, out_dir: str) -> None:
    """One patch-parallel rank: NCCL on its own GPU, or gloo on the CPU."""
    if a.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    backend = {"backend": "nccl", "device_id": device} if device.type == "cuda" else {"backend": "gloo"}
    dist.init_process_group(**backend, init_method=f"file://{store}", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=120))
    try:
        group = dist.group.WORLD
        ae = load_vae(a.ckpt, device)
        z, x = inputs(ae, a.size, device)
        dec, enc = tiling(a, ae.params.downsample)
        res: dict = {}
        with torch.inference_mode(), float32_convs():
            out, res["decode_pp_s"], res["decode_pp_peak_gib"] = measure(
                lambda: tiled_decode(ae, z, group=group, **dec), device, a.reps, group)
            res["decode_pp_bitwise_equal_one_rank"] = torch.equal(out, tiled_decode(ae, z, **dec))
            del out
            out, res["encode_pp_s"], res["encode_pp_peak_gib"] = measure(
                lambda: tiled_encode(ae, x, generator=None, sample=False, group=group, **enc), device, a.reps, group)
            res["encode_pp_bitwise_equal_one_rank"] = torch.equal(
                out, tiled_encode(ae, x, generator=None, sample=False, **enc))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def patch_parallel(a) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-vae-pp-") as tmp:
        mp.spawn(rank_main, args=(a, str(Path(tmp) / "store"), tmp), nprocs=RANKS, join=True)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(RANKS)]
    res: dict = {}
    for key in ranks[0]:
        values = [r[key] for r in ranks]
        if isinstance(values[0], bool):
            res[key] = all(values)
        else:  # the slowest rank's time, the largest rank's peak
            res[key] = max(values)
    return res


def main() -> None:
    ap = parser("vae_parallel.json")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels (a multiple of 16)")
    ap.add_argument("--tile-latent", type=int, default=64, help="decode tile side in latent pixels (encode: x8)")
    ap.add_argument("--stride-latent", type=int, default=56, help="decode tile stride in latent pixels (encode: x8)")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    if a.size % 16:
        ap.error(f"--size must be a multiple of 16, got {a.size}")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no GPU is visible (use --device cpu for a dry run)")
    res = header() if device.type == "cuda" else {"device": "cpu (dry run)", "torch": torch.__version__,
                                                  "date": time.strftime("%Y-%m-%d")}
    res.update(one_device(a, device))
    print({k: v for k, v in res.items() if k.startswith(("decode", "encode"))}, flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if device.type == "cpu" or torch.cuda.device_count() >= RANKS:
        res.update(patch_parallel(a))
    else:
        res["patch_parallel"] = f"skipped: {torch.cuda.device_count()} GPU visible, {RANKS} needed"
    if device.type == "cpu":  # no device peak to report
        res = {k: v for k, v in res.items() if not k.endswith("_peak_gib")}
    report(res, a.out)


if __name__ == "__main__":
    main()
