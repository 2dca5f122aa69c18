"""Batching: 4 text2img prompts at 512² (20 steps) in one run vs. 4 single runs, on a full-size checkpoint,
in the single-stage topology (one engine batches all four).

    python benchmarks/bench_batch.py --ckpt /tmp/bagel-full --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import timed

from bagel_serve import Omni

PROMPTS = ["A cute cat on a windowsill", "A red fox in the snow", "A lighthouse at dusk", "A bowl of ramen"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/bagel-full")
    ap.add_argument("--out", default="bench_batch.json")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    omni = Omni(a.ckpt, deploy_config="bagel_single_stage.yaml")
    reqs = [{"modality": "text2img", "prompt": p, "height": a.size, "width": a.size, "steps": a.steps, "seed": i}
            for i, p in enumerate(PROMPTS)]
    omni.generate([{**reqs[0], "steps": 3}])  # warm-up
    singles = []
    for r in reqs:
        _, t, _ = timed(lambda: omni.generate([r]))
        singles.append(t)
    _, batch, peak = timed(lambda: omni.generate(reqs))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "size": a.size, "steps": a.steps, "single_s": singles, "single_total_s": sum(singles),
           "single_per_image_s": sum(singles) / len(reqs), "batch_s": batch, "batch_per_image_s": batch / len(reqs),
           "speedup": sum(singles) / batch, "batch_peak_gib": peak}
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"\n{'metric':<24}{'value':>10}")
    for k in ("single_per_image_s", "batch_per_image_s", "speedup", "batch_peak_gib"):
        print(f"{k:<24}{res[k]:>10.3f}")


if __name__ == "__main__":
    main()
