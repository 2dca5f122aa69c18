"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bagel_serve.testing.checkpoint import write_checkpoint


def timed(fn):
    """(result, seconds, peak GiB allocated by this process) of fn(), with the device synchronised."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def median_cuda_s(fn, reps: int) -> float:
    """Median seconds of fn() on the device (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def machine_ceilings() -> dict[str, float]:
    """The card's bf16 GEMM rate at DiT shapes and its HBM copy bandwidth (bytes read + written), measured."""
    a = torch.randn(8192, 3584, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3584, 18944, device="cuda", dtype=torch.bfloat16)
    gemm = 2 * 8192 * 3584 * 18944 / median_cuda_s(lambda: a @ b, 20) / 1e12
    x = torch.randn(2**28, device="cuda")
    y = torch.empty_like(x)
    hbm = 2 * x.numel() * 4 / median_cuda_s(lambda: y.copy_(x), 20) / 1e12
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"bf16_gemm_tflops": gemm, "hbm_tb_s": hbm}


def sustained_gemm_tflops(seconds: float = 6.0) -> float:
    """The bf16 GEMM rate of `machine_ceilings` held for `seconds` back to back, over the last third: a long
    denoising run draws the card's full power and its clocks fall (on an H200 from 1.98 GHz to about
    1.6 GHz at the 700 W cap), so a short burst overstates what 50 steps get."""
    a = torch.randn(8192, 3584, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3584, 18944, device="cuda", dtype=torch.bfloat16)
    flop = 2 * 8192 * 3584 * 18944
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds * 2 / 3:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < seconds / 3:
        for _ in range(20):
            a @ b
        n += 20
        torch.cuda.synchronize()
    rate = n * flop / (time.perf_counter() - t1) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


def header() -> dict:
    """The card, torch version and date every result file starts with."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def report(res: dict, out: str) -> None:
    """Write the results as JSON and print them as a short table."""
    Path(out).write_text(json.dumps(res, indent=2))
    print(f"\n{'metric':<40}{'value':>14}")
    for k, v in res.items():
        print(f"{k:<40}{v:>14.4g}" if isinstance(v, float) else f"{k:<40}{v!s:>14}")


def parser(default_out: str) -> argparse.ArgumentParser:
    """The flags every bench takes: the checkpoint to load and the JSON file to write."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/bagel-full")
    ap.add_argument("--out", default=default_out)
    return ap


def median_s(fn, reps: int, device: torch.device | str) -> float:
    """`median_cuda_s` on a GPU; on the CPU (smoke runs) the median wall seconds of fn(), after one warm-up."""
    if torch.device(device).type == "cuda":
        return median_cuda_s(fn, reps)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def fp8_gemm_tflops(device: torch.device | str = "cuda", m: int = 8192, k: int = 3584, n: int = 18944,
                    reps: int = 20) -> dict[str, float]:
    """The card's FP8 (e4m3) GEMM rate at the DiT shape that `machine_ceilings` measures in bf16, through
    `torch._scaled_mm` with rowwise scales (one per row of the activations, one per output channel of the
    weight: what a per-token x per-channel FP8 linear runs) and a bf16 output, with and without fast
    accumulation. A variant the card or torch refuses is left out (its error under `*_error`)."""
    a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
    w = torch.randn(n, k, device=device).to(torch.float8_e4m3fn)  # (out, in), as a linear's weight is stored
    sa = torch.rand(m, 1, device=device) + 0.5
    sw = torch.rand(1, n, device=device) + 0.5
    out: dict[str, float] = {}
    for key, fast in (("fp8_gemm_tflops", False), ("fp8_gemm_fast_accum_tflops", True)):
        try:
            s = median_s(lambda: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16,
                                                  use_fast_accum=fast), reps, device)
            out[key] = 2 * m * k * n / s / 1e12
        except Exception as e:  # a missing kernel (older card, changed torch API) must not stop the bench
            out[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
    del a, w, sa, sw
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def timed_on(device: torch.device | str, fn):
    """`timed` on a GPU; on the CPU (smoke runs) (result, wall seconds, 0.0): there is no device peak."""
    if torch.device(device).type == "cuda":
        return timed(fn)
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, 0.0


def free_device() -> None:
    """Drop what the last engine left: Python garbage first (it holds the tensors), then the allocator cache."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_warmup_s(omni) -> dict[str, float]:
    """Capture / compile / warm-up times and graph memory the engine exposes, read by duck typing so a bench
    keeps running while those attributes come and go: every attribute of the stage and of its runner that is
    itself a `*capture_s` / `*compile_s` / `*warmup_s` number, or an object carrying one (the decode graphs'
    `capture_s` and `memory_bytes`, a later denoising graph's or compile step's). Empty when the stages run
    out of this process."""
    stage = getattr(omni, "stage", None)  # the property raises AttributeError for worker processes
    found: dict[str, float] = {}
    keys = ("capture_s", "compile_s", "warmup_s")
    for owner_name, owner in (("stage", stage), ("runner", getattr(stage, "runner", None))):
        if owner is None:
            continue
        for name, value in vars(owner).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name.endswith(keys):
                found[f"{owner_name}.{name}"] = float(value)
                continue
            for key in (*keys, "memory_bytes"):
                v = _attr(value, key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    found[f"{name}.{key.replace('memory_bytes', 'memory_gib')}"] = (
                        v / 2**30 if key == "memory_bytes" else float(v))
    return found


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (b the reference)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def psnr_db(img, ref) -> float | str:
    """PSNR of two PIL images as uint8 RGB, peak 255, in dB; "inf" (JSON has no infinity) when identical."""
    import numpy as np

    x = np.asarray(img.convert("RGB"), dtype=np.float64)
    y = np.asarray(ref.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"image sizes differ: {x.shape} vs reference {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return "inf" if mse == 0.0 else 10.0 * float(np.log10(255.0**2 / mse))


def _attr(obj, name: str):
    """obj.name, or None when it is missing or cannot be read (a property that raises)."""
    if isinstance(obj, torch.Tensor):
        return None
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def input_image(side: int) -> Image.Image:
    """A deterministic random RGB image: the img2img input of the benches."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")


def generate(omni: Any, reqs: list[dict[str, Any]]) -> list:
    """omni.generate, raising the first failed request's error (generate keeps going past failures)."""
    outs = omni.generate(reqs)
    for o in outs:
        if not o.ok:
            raise o.error
    return outs


def bench_checkpoint(args: argparse.Namespace, scratch: Path | None = None) -> float | None:
    """Point `args.ckpt` at the checkpoint the run uses: with `--smoke` a tiny one written under `scratch`,
    with `--write` the full-size one written to `--ckpt` on the GPU (returns the seconds that took), else
    `--ckpt` as given. `--tokenizer-dir` gives the Qwen tokenizer files either writes."""
    tok = Path(args.tokenizer_dir) if args.tokenizer_dir else None
    if getattr(args, "smoke", False) and scratch is not None:
        args.ckpt = str(write_checkpoint(scratch / "ckpt", "tiny", tokenizer_dir=tok))
    elif args.write:
        t0 = time.perf_counter()
        write_checkpoint(args.ckpt, "full", device="cuda", shard_bytes=4 * 2**30, tokenizer_dir=tok)
        return time.perf_counter() - t0
    return None
