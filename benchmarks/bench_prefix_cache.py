"""Prefix caching on one GPU: 32 concurrent think-mode text requests (which all start with the same
51-token think system prompt) with `enable_prefix_caching` off and on; prefill time, wall time, and how many
answers agree, next to how many agree between two uncached runs that only pack the requests in another
order (bf16 with random weights: any change of matmul shapes moves low bits, and near-tied logits turn
that into another greedy token).

    python benchmarks/bench_prefix_cache.py --ckpt /tmp/bagel-full --out results.json [--dtype float32]
"""

from __future__ import annotations


import torch
from common import header, parser, report, timed

from bagel_serve import Omni


def run(ckpt: str, enabled: bool, res: dict, tag: str, reverse: bool = False, dtype: str = "bf16") -> list:
    omni = Omni(ckpt, dtype=dtype, log_stats=True, deploy_config="bagel_single_stage.yaml",
                stage_overrides={"0": {"enable_prefix_caching": enabled}})
    omni.generate([{"modality": "text2text", "prompt": "warm up", "max_tokens": 2, "think": True}])
    reqs = [{"modality": "text2text", "prompt": f"Question {i}: why is the sky blue at noon?", "think": True,
             "max_tokens": 32, "seed": i} for i in range(32)]
    order = list(reversed(range(32))) if reverse else list(range(32))
    outs, t, _ = timed(lambda: omni.generate([reqs[i] for i in order]))
    outs = [outs[order.index(i)] for i in range(32)]
    st = omni.last_stats
    res.update({f"{tag}_wall_s": t, f"{tag}_prefill_s": st.phase_s.get("context_prefill", 0.0),
                f"{tag}_cached_blocks": len(omni.stage.cache.manager.prefix_cache) if enabled else 0})
    del omni
    torch.cuda.empty_cache()
    return outs


def main() -> None:
    ap = parser("bench_prefix_cache.json")
    ap.add_argument("--dtype", default="bf16", help="bf16 (default) or float32, to tell rounding from logic")
    a = ap.parse_args()
    res = header()
    res["dtype"] = a.dtype
    off = run(a.ckpt, False, res, "cache_off", dtype=a.dtype)
    on = run(a.ckpt, True, res, "cache_on", dtype=a.dtype)
    # The baseline for agreement: the same requests without caching, packed in the other order.
    again = run(a.ckpt, False, res, "cache_off_reversed", reverse=True, dtype=a.dtype)
    res["same_answers_on_vs_off"] = sum(x.token_ids == y.token_ids for x, y in zip(off, on))
    res["same_answers_off_reversed_vs_off"] = sum(x.token_ids == y.token_ids for x, y in zip(off, again))
    report(res, a.out)


if __name__ == "__main__":
    main()
