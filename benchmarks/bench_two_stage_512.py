"""text2img 512x512, 20 steps, through the default deploy (bagel.yaml: the Thinker and the DiT in two processes
on one GPU, the DiT reading the Thinker's KV cache in place): three runs after a warm-up, and how many of the
forwards replayed a CUDA graph.

    PYTHONPATH=. python benchmarks/bench_two_stage_512.py --ckpt /tmp/bagel-full
"""

from __future__ import annotations

import argparse
import time

from bagel_serve import Omni

REQUEST = {"modality": "text2img", "prompt": "A cute cat sitting on a windowsill at sunset.", "steps": 20,
           "height": 512, "width": 512, "seed": 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/bagel-full")
    a = ap.parse_args()
    t0 = time.perf_counter()
    with Omni(a.ckpt) as omni:
        print(f"two-stage load {time.perf_counter() - t0:.1f} s", flush=True)
        omni.generate([REQUEST])
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = omni.generate([REQUEST])
            walls.append(round(time.perf_counter() - t0, 3))
            if not out[0].ok:
                raise out[0].error
        st = omni.last_stats
        print(f"two-stage t2i 512 20 steps: runs {walls} median {sorted(walls)[1]} s; graphed forwards "
              f"{st.graph_forwards} of {st.forwards} ({st.denoise_steps} denoising steps)", flush=True)


if __name__ == "__main__":
    main()
