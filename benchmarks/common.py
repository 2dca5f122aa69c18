"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


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
