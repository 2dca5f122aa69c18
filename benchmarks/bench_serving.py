"""Serving engine on one GPU: text throughput with 64 concurrent requests (512 prompt / 256 output
tokens), text2img 1024² latency, and the memory cost of two stages (in this process, and one process per
stage) vs. one, as memory in use on the whole device after each topology's text2img. Each topology's
text2img latents are compared with the single stage's (same seed), and the KV blocks stage 1 allocated
itself are recorded (0 = it read stage 0's rows in place).

    python benchmarks/bench_serving.py --ckpt /tmp/bagel-full --out results.json
    python benchmarks/bench_serving.py --d2d --out results.json   # two GPUs: stage 1 on cuda:1
"""

from __future__ import annotations

import torch
from common import header, parser, report, timed

from bagel_serve import Omni

SINGLE, TWO = "bagel_single_stage.yaml", "bagel.yaml"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches ".split()


def prompt_of(omni: Omni, n_tokens: int, salt: int) -> str:
    """A prompt whose segment (<|im_start|> text <|im_end|>) is exactly n_tokens long."""
    words, i = [f"#{salt}"], 0
    while len(omni.tokenizer.segment(" ".join(words))) < n_tokens:
        words.append(WORDS[i % len(WORDS)])
        i += 1
    while len(omni.tokenizer.segment(" ".join(words))) > n_tokens:
        words.pop()
    return " ".join(words)


def device_used_gib() -> float:
    """Memory in use on the whole device (every process, allocator caches included)."""
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


REFERENCE: dict[str, torch.Tensor] = {}


def run_topology(ckpt: str, deploy: str, res: dict, tag: str, text: bool, backend: str = "inline",
                 **kwargs) -> None:
    omni = Omni(ckpt, deploy_config=deploy, worker_backend=backend, **kwargs)
    omni.generate([{"modality": "text2img", "prompt": "warm up", "height": 256, "width": 256, "steps": 3},
                   {"modality": "text2text", "prompt": "warm up", "max_tokens": 4}])
    t2i = {"modality": "text2img", "prompt": "A cute cat sitting on a windowsill at sunset.", "seed": 0,
           "return_latents": True}
    (out,), res[f"{tag}_t2i_1024_s"], res[f"{tag}_t2i_peak_gib"] = timed(lambda: omni.generate([t2i]))
    res[f"{tag}_device_used_gib"] = device_used_gib()
    if "latents" in REFERENCE:
        res[f"{tag}_t2i_latents_max_diff_vs_single"] = (out.latents - REFERENCE["latents"]).abs().max().item()
    else:
        REFERENCE["latents"] = out.latents
    if len(omni.stage_stats) > 1:
        res[f"{tag}_stage1_own_kv_blocks"] = omni.stage_stats[1].kv_peak_blocks
    if text:
        reqs = [{"modality": "text2text", "prompt": prompt_of(omni, 512, i), "max_tokens": 257, "seed": i}
                for i in range(64)]
        outs, t, peak = timed(lambda: omni.generate(reqs))
        toks = sum(len(o.token_ids) - 1 for o in outs)
        res.update({f"{tag}_text64_s": t, f"{tag}_text64_tokens": toks, f"{tag}_text64_tok_s": toks / t,
                    f"{tag}_text64_peak_gib": peak, f"{tag}_text64_prompt_tokens": 64 * 512})
    omni.shutdown()
    del omni
    torch.cuda.empty_cache()


def main() -> None:
    ap = parser("bench_serving.json")
    ap.add_argument("--skip-process", action="store_true", help="skip the one-process-per-stage topology")
    ap.add_argument("--d2d", action="store_true", help="two GPUs: single stage vs stage 1 on cuda:1 (process backend)")
    a = ap.parse_args()
    res = header()
    if a.d2d:
        run_topology(a.ckpt, SINGLE, res, "single", text=False)
        run_topology(a.ckpt, TWO, res, "d2d", text=False, backend="process",
                     stage_overrides={"1": {"devices": "1"}})
        report(res, a.out)
        return
    run_topology(a.ckpt, SINGLE, res, "single", text=True)
    run_topology(a.ckpt, TWO, res, "two_stage", text=False)
    res["two_stage_extra_gib"] = res["two_stage_device_used_gib"] - res["single_device_used_gib"]
    if not a.skip_process:
        run_topology(a.ckpt, TWO, res, "two_proc", text=False, backend="process")
        res["two_proc_extra_gib"] = res["two_proc_device_used_gib"] - res["single_device_used_gib"]
    report(res, a.out)


if __name__ == "__main__":
    main()
