"""The fast core on one GPU, against the machine measured in the same run: decode batch 1, 64 concurrent text
requests, think text2img 512², text2img 1024² (latency and peak memory), two stages on one GPU, the decode
CUDA graphs (capture time, memory, and float32 graph vs eager tokens), all through `Omni`.

    python benchmarks/bench_core.py --ckpt /tmp/bagel-full --write --tokenizer-dir .bench/tok --out $OUT/core.json

Targets (issue "Fast core"): batch-1 decode >= 200 tok/s; 64 x (512 prompt / 256 output) >= 5,000 output tok/s;
think text2img 512² with a 200-token plan, 20 steps <= 2.5 s; text2img 1024² <= 12.3 s and <= 31 GiB
allocated; two stages on one GPU <= 2 GiB more than one.
"""

from __future__ import annotations

import gc
import statistics

import torch
from bench_serving import device_used_gib, prompt_of
from common import bench_checkpoint, header, machine_ceilings, parser, report, timed

from bagel_serve import Omni

SINGLE, TWO = "bagel_single_stage.yaml", "bagel.yaml"
STAGE0 = {"max_num_seqs": 256, "enforce_eager": False}  # the limits this engine runs with (decode graphs on)
T2I_1024 = {"modality": "text2img", "prompt": "A cute cat sitting on a windowsill at sunset.", "seed": 0,
            "return_latents": True}
WARM = [{"modality": "text2img", "prompt": "warm up", "height": 256, "width": 256, "steps": 3, "seed": 1},
        {"modality": "text2text", "prompt": "warm up", "max_tokens": 4}]


def decode_bytes(omni: Omni) -> int:
    """Bytes a text token reads: the understanding expert of every layer, the final norm and the LM head
    (one row of the embedding table)."""
    total = 0
    for name, p in omni.model.named_parameters():
        if not name.startswith("language_model.") or "moe_gen" in name:
            continue
        total += p.shape[1] * p.element_size() if "embed_tokens" in name else p.numel() * p.element_size()
    return total


def phases(omni: Omni, reqs: list[dict]) -> dict[str, float]:
    """Seconds per phase of one more run of `reqs` with per-phase timing on."""
    omni.orchestrator.generate(omni.make_requests(reqs), timed=True)
    return omni.last_stats.phase_s


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = parser("bench_core.json")
    ap.add_argument("--write", action="store_true", help="write the full-size random checkpoint first")
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: text64 think t2i peak two_stage fp32")
    a = ap.parse_args()
    res = header()
    res.update(machine_ceilings())
    print("ceilings", res, flush=True)
    write_s = bench_checkpoint(a)
    if write_s is not None:
        res["write_s"] = write_s

    # Timings come from untimed runs (per-phase timing synchronises the device at every forward); the phases
    # come from one more run of the same requests with timing on.
    omni, res["load_s"], _ = timed(lambda: Omni(a.ckpt, deploy_config=SINGLE, stage_overrides={"0": STAGE0}))
    graphs = omni.stage.runner.graphs
    res["graphs"] = graphs is not None
    if graphs is not None:
        res["graph_capture_s"], res["graph_memory_gib"] = graphs.capture_s, graphs.memory_bytes / 2**30
    res["kv_cache_gib"] = omni.stage.cache.usage()["total_bytes"] / 2**30
    omni.generate(WARM)
    per_token = decode_bytes(omni)
    res["decode_gb_per_token"] = per_token / 1e9
    res["decode_ceiling_tok_s"] = res["hbm_tb_s"] * 1e12 / per_token

    one = {"modality": "text2text", "prompt": "Tell me a long story about a red apple.", "max_tokens": 256, "seed": 0}
    (out,), t, _ = timed(lambda: omni.generate([one]))
    res["batch1_tokens"] = len(out.token_ids)
    res["batch1_tok_s"] = len(out.token_ids) / t
    res["batch1_of_ceiling"] = res["batch1_tok_s"] / res["decode_ceiling_tok_s"]
    print("batch1", res["batch1_tok_s"], flush=True)

    if "text64" not in a.skip:
        reqs = [{"modality": "text2text", "prompt": prompt_of(omni, 512, i), "max_tokens": 256, "seed": i}
                for i in range(64)]
        outs, t, _ = timed(lambda: omni.generate(reqs))
        toks = sum(len(o.token_ids) for o in outs)
        st = phases(omni, reqs)
        res.update(text64_s=t, text64_tokens=toks, text64_tok_s=toks / t,
                   text64_prefill_s=st.get("context_prefill", 0.0), text64_decode_s=st.get("decode", 0.0))
        print("text64", res["text64_tok_s"], flush=True)

    if "think" not in a.skip:
        think = {"modality": "text2img", "prompt": "A lighthouse on a cliff at dawn.", "height": 512, "width": 512,
                 "steps": 20, "think": True, "max_think_tokens": 200, "seed": 0}
        omni.generate([dict(think, max_think_tokens=4, steps=3)])
        runs = [timed(lambda: omni.generate([think])) for _ in range(3)]
        res.update(think_t2i_512_s=statistics.median(t for _, t, _ in runs), think_t2i_512_runs_s=[t for _, t, _ in runs],
                   think_plan_tokens=len(runs[0][0][0].token_ids))
        res.update({f"think_{k}_s": v for k, v in phases(omni, [think]).items()})
        plain = {"modality": "text2img", "prompt": "A lighthouse on a cliff at dawn.", "height": 512, "width": 512,
                 "steps": 20, "seed": 0}
        res["t2i_512_20_s"] = statistics.median(timed(lambda: omni.generate([plain]))[1] for _ in range(3))
        print("think", res["think_t2i_512_s"], flush=True)

    if "t2i" not in a.skip:
        (out,), t, _ = timed(lambda: omni.generate([T2I_1024]))
        res["t2i_1024_s"] = t
        res["t2i_floor_s"] = 90 * 60e12 / (res["bf16_gemm_tflops"] * 1e12)
        reference = out.latents
        print("t2i", t, flush=True)
    omni.shutdown()
    del omni, out, graphs
    free()

    if "peak" not in a.skip:
        # The engine's whole footprint for a 1024² image: weights, a KV cache sized for the job (64 blocks,
        # 1024 tokens), activations, CUDA graphs, the VAE decode.
        small = Omni(a.ckpt, deploy_config=SINGLE, stage_overrides={"0": {**STAGE0, "kv_cache_blocks": 64}})
        small.generate(WARM)
        torch.cuda.reset_peak_memory_stats()
        (out,), t, peak = timed(lambda: small.generate([T2I_1024]))
        res.update(t2i_small_cache_s=t, t2i_peak_gib=peak, weights_gib=sum(
            p.numel() * p.element_size() for m in (small.model, small.stage.vae) for p in m.parameters()) / 2**30)
        res["single_device_used_gib"] = device_used_gib()
        small.shutdown()
        del small, out
        free()

    if "two_stage" not in a.skip:
        two = Omni(a.ckpt, deploy_config=TWO, stage_overrides={"0": {**STAGE0, "kv_cache_blocks": 64}})
        two.generate(WARM)
        (out,), t, _ = timed(lambda: two.generate([T2I_1024]))
        res["two_stage_t2i_s"] = t
        res["two_stage_device_used_gib"] = device_used_gib()
        if "single_device_used_gib" in res:
            res["two_stage_extra_gib"] = res["two_stage_device_used_gib"] - res["single_device_used_gib"]
        if "t2i" not in a.skip:
            res["two_stage_latents_max_diff"] = (out.latents - reference).abs().max().item()
        two.shutdown()
        del two, out
        free()

    if "fp32" not in a.skip:
        # Float32: CUDA-graph decode and eager decode must give identical tokens (16 requests x 64 tokens).
        reqs = [{"modality": "text2text", "prompt": f"Question {i}: what is the colour of the sky?", "max_tokens": 64,
                 "seed": i} for i in range(16)]
        got = []
        for eager in (False, True):
            o = Omni(a.ckpt, deploy_config=SINGLE, dtype="float32", enforce_eager=eager,
                     stage_overrides={"0": {**STAGE0, "kv_cache_blocks": 2048}})
            res[f"fp32_graphs_{'off' if eager else 'on'}"] = o.stage.runner.graphs is not None
            got.append([x.token_ids for x in o.generate(reqs)])
            o.shutdown()
            del o
            free()
        res["fp32_graph_vs_eager_identical"] = f"{sum(x == y for x, y in zip(*got))}/{len(reqs)}"
    report(res, a.out)


if __name__ == "__main__":
    main()
