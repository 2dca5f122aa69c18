r"""Where a denoising step's time goes: a few text2img / img2img steps through `Omni` under the torch profiler,
kernels grouped by name, and the device's busy time against the wall time.

    python benchmarks/profile_denoise.py --ckpt /tmp/bagel-full --out $OUT/profile \
        [--quantization fp8 [--fp8-attention]]

Each case writes `<out>/<case>.txt` (the 40 kernels with the most device time) and prints one line per case.
`--timed` instead runs each case at full length (50 steps at 1024², 20 at 512²) without the profiler and
prints its wall time and the engine's per-phase seconds (per-phase timing synchronises every forward).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from common import parser
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from bagel_serve import Omni

CASES = {
    "t2i_1024": {"modality": "text2img", "prompt": "A cute cat sitting on a windowsill at sunset.", "steps": 5, "seed": 0},
    "t2i_512": {"modality": "text2img", "prompt": "A cute cat sitting on a windowsill at sunset.", "steps": 5,
                "height": 512, "width": 512, "seed": 0},
    "i2i_1024": {"modality": "img2img", "prompt": "Make it winter.", "steps": 4, "cfg_img_scale": 2.0,
                 "cfg_interval": [0.0, 1.0], "cfg_renorm_type": "text_channel", "seed": 0},
}


def main() -> None:
    ap = parser("profile")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--deploy", default="bagel_single_stage.yaml")
    ap.add_argument("--timed", action="store_true", help="full-length runs with per-phase times, no profiler")
    ap.add_argument("--repeat", type=int, default=1, help="with --timed: untimed runs per case (each printed)")
    ap.add_argument("--steps", type=int, default=None, help="steps of the profiled runs (default: each case's)")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="profile the FP8 engine")
    ap.add_argument("--fp8-attention", action="store_true", help="with --quantization fp8: FP8 attention too")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    omni = Omni(a.ckpt, deploy_config=a.deploy, quantization=a.quantization, fp8_attention=a.fp8_attention or None)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
    for name in a.cases:
        req = dict(CASES[name])
        if req["modality"] == "img2img":
            req["image"] = image
        omni.generate([req])  # warm-up: plans, allocator
        torch.cuda.synchronize()
        if a.timed:
            req["steps"] = 20 if req.get("height") == 512 else 50
            walls = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                omni.generate([req])
                torch.cuda.synchronize()
                walls.append(round(time.perf_counter() - t0, 3))
            wall = sorted(walls)[len(walls) // 2]
            omni.orchestrator.generate(omni.make_requests([req]), timed=True)
            phases = {k: round(v, 3) for k, v in omni.last_stats.phase_s.items()}
            print(f"{name:<10} wall {wall:7.3f} s (runs {walls})  steps {req['steps']}  phases {phases}", flush=True)
            continue
        if a.steps:
            req["steps"] = a.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            omni.generate([req])
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in events) / 1e6
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
        (out / f"{name}.txt").write_text(f"wall {wall:.3f} s, device busy {busy:.3f} s\n\n{table}")
        print(f"{name:<10} wall {wall:7.3f} s  device busy {busy:7.3f} s  steps {req['steps']}", flush=True)
    omni.shutdown()


if __name__ == "__main__":
    main()
