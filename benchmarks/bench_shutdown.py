"""Two stages, one process per stage: a small text2img, then shutdown. Prints each stage's own KV blocks
(stage 1 reading stage 0's rows in place allocates none) and how long shutdown takes; run it with stderr
visible to see that no CUDA IPC warning appears when the parent frees the weights it shared.

    python benchmarks/bench_shutdown.py /tmp/bagel-full          # both stages on GPU 0
    python benchmarks/bench_shutdown.py /tmp/bagel-full --d2d    # stage 1 on GPU 1
"""

from __future__ import annotations

import argparse
import time

import torch

from bagel_serve import Omni


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--d2d", action="store_true", help="put stage 1 on GPU 1")
    a = ap.parse_args()
    overrides = {"stage_overrides": {"1": {"devices": "1"}}} if a.d2d else {}
    omni = Omni(a.ckpt, deploy_config="bagel.yaml", worker_backend="process", **overrides)
    omni.generate([{"modality": "text2img", "prompt": "a cat", "height": 256, "width": 256, "steps": 5, "seed": 0}])
    print("own KV blocks per stage:", [s.kv_peak_blocks for s in omni.stage_stats])
    t0 = time.perf_counter()
    omni.shutdown()
    del omni
    torch.cuda.empty_cache()
    print(f"shutdown and free: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
