"""First GPU numbers: load a full-size random checkpoint, one text2img at 1024² (50 steps, default CFG)
and one 256-token text2text, with the machine's own ceilings measured in the same run.

    python benchmarks/bench_foundation.py --ckpt /tmp/bagel-full --write --tokenizer-dir DIR --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from common import timed

from bagel_serve import Omni, __version__
from bagel_serve.testing.checkpoint import write_checkpoint


def _time_cuda(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def machine_ceilings() -> dict[str, float]:
    a = torch.randn(8192, 3584, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3584, 18944, device="cuda", dtype=torch.bfloat16)
    t = _time_cuda(lambda: a @ b, 20)
    gemm = 2 * 8192 * 3584 * 18944 / t / 1e12
    x = torch.empty(2**30, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    t = _time_cuda(lambda: y.copy_(x), 10)
    hbm = 2 * x.numel() * 4 / t / 1e12
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"bf16_gemm_tflops": gemm, "hbm_tb_s": hbm}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/bagel-full")
    ap.add_argument("--write", action="store_true", help="write the full-size random checkpoint first")
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--out", default="bench_foundation.json")
    ap.add_argument("--decode-tokens", type=int, default=256)
    a = ap.parse_args()
    res: dict = {"version": __version__, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                 "date": time.strftime("%Y-%m-%d"), "host": platform.node()}
    res.update(machine_ceilings())
    print("ceilings", res, flush=True)
    if a.write:
        t0 = time.perf_counter()
        write_checkpoint(a.ckpt, "full", device="cuda", shard_bytes=4 * 2**30,
                         tokenizer_dir=Path(a.tokenizer_dir) if a.tokenizer_dir else None)
        res["write_s"] = time.perf_counter() - t0
        print("written", res["write_s"], flush=True)
    omni, res["load_s"], res["load_peak_gib"] = timed(lambda: Omni(a.ckpt))
    print("loaded", res["load_s"], flush=True)

    # Warm-up: kernels, allocator, cuDNN plans.
    omni.generate([{"modality": "text2img", "prompt": "warm up", "height": 256, "width": 256, "steps": 3, "seed": 1},
                   {"modality": "text2text", "prompt": "warm up", "max_tokens": 4}])

    req = {"modality": "text2text", "prompt": "Describe a red apple on a wooden table.",
           "max_tokens": a.decode_tokens + 1, "seed": 0}
    (out,), t, _ = timed(lambda: omni.generate([req]))
    n = len(out.token_ids) - 1
    res.update(decode_tokens=n, decode_s=t, decode_tok_s=n / t)
    res["decode_ceiling_tok_s"] = res["hbm_tb_s"] * 1e12 / 14.1e9
    print("decode", n, t, flush=True)

    req = {"modality": "text2img", "prompt": "A cute cat sitting on a windowsill at sunset.", "seed": 0}
    (out,), t, peak = timed(lambda: omni.generate([req]))
    res.update(t2i_1024_s=t, t2i_peak_gib=peak)
    forwards = 41 * 2 + 8
    res["t2i_floor_s"] = forwards * 60e12 / (res["bf16_gemm_tflops"] * 1e12)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    out.images[0].save(Path(a.out).with_suffix(".png"))
    Path(a.out).write_text(json.dumps(res, indent=2))

    print(f"\n{'metric':<28}{'value':>12}")
    for k in ("device", "bf16_gemm_tflops", "hbm_tb_s", "write_s", "load_s", "load_peak_gib", "decode_tok_s",
              "decode_ceiling_tok_s", "t2i_1024_s", "t2i_floor_s", "t2i_peak_gib"):
        v = res.get(k)
        print(f"{k:<28}{v:>12.2f}" if isinstance(v, float) else f"{k:<28}{v!s:>12}")


if __name__ == "__main__":
    main()
