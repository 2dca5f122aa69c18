"""FP8 attention (`fp8_attention`) against bf16 at the denoising steps' attention shapes, on one Hopper GPU.

    PYTHONPATH=.:benchmarks python benchmarks/bench_fp8_attention.py --out bench_fp8_attention.json

For each shape (queries x keys of one sequence, 28 query heads, 4 KV heads, head dim 128: a 1024² text2img's
sequences with and without text, img2img's long context, a 512² image) it measures, per call:
  bf16     the engine's bf16 kernel (`CudaBackend.attend`: cuDNN from 2,048 queries, flash below)
  fp8      cuDNN's FP8 SDPA on operands already packed in e4m3 (`layers.fp8_attention.CudnnFp8Attention`)
  pack     the packing launches that quantise a sequence's operands (`kernels.gather.pack_attention_rows_fp8`)
with TFLOP/s of 4 * queries * keys * 128 * 28, the first graph's build time for a shape, and each output's
relative L2 distance from float32 attention of the same bf16 operands (random, logits of standard deviation
about 4; the FP8 figure includes the e4m3 rounding of its output, which the FP8 o_proj applies anyway).
About 30 s on an H200.
"""

from __future__ import annotations

import time

import torch
from common import header, parser, report

from bagel_serve.layers.attention_backends import CudaBackend, exact_attention
from bagel_serve.layers.fp8_attention import CudnnFp8Attention
from bagel_serve.layers.kernels.gather import ATTENTION_SCALES, pack_attention_rows_fp8

H, HKV, D = 28, 4, 128
SHAPES = {"t2i_1024_text": (4098, 4128), "t2i_1024_no_text": (4098, 4104), "i2i_1024_context": (4098, 13098),
          "t2i_512_text": (1026, 1056)}


def per_call_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 attention, a few heads at a time (the scores of all 28 would not fit beside the rest)."""
    group = q.shape[1] // k.shape[1]
    return torch.cat([exact_attention(q[:, h : h + group].float(), k[:, h // group : h // group + 1].float(),
                                      v[:, h // group : h // group + 1].float(), False)
                      for h in range(0, q.shape[1], group)], dim=1)


def main() -> None:
    a = parser("bench_fp8_attention.json").parse_args()
    res = header()
    backend, fp8 = CudaBackend(), CudnnFp8Attention()
    g = torch.Generator(device="cuda").manual_seed(0)
    descale_o = ATTENTION_SCALES.index("descale_o")
    for name, (lq, lk) in SHAPES.items():
        q = torch.randn(lq, H, D, device="cuda", generator=g).mul(2).bfloat16()
        k = torch.randn(lk, HKV, D, device="cuda", generator=g).mul(2).bfloat16()
        v = torch.randn(lk, HKV, D, device="cuda", generator=g).bfloat16()
        flops = 4 * lq * lk * D * H
        r: dict = {"queries": lq, "keys": lk}
        ref = exact(q, k, v)
        ob = backend.attend(q, k, v, False)
        r["bf16_ms"] = per_call_ms(lambda: backend.attend(q, k, v, False))
        r["bf16_rel_l2"] = rel(ob, ref)
        rows, src = torch.arange(lq, device="cuda"), torch.arange(lk, device="cuda") - (lk - lq)
        kv_src = torch.cat([torch.where(src >= 0, src, -(torch.arange(lk, device="cuda") + 1)),
                            torch.tensor([-1], device="cuda")])
        cache_k, cache_v = k[: lk - lq], v[: lk - lq]  # the context's keys come from the cache
        new_k, new_v = k[lk - lq :], v[lk - lq :]
        cu = (torch.tensor([0, lq], dtype=torch.int32, device="cuda"),
              torch.tensor([0, lk], dtype=torch.int32, device="cuda"))

        def pack():
            return pack_attention_rows_fp8(q, new_k, new_v, cache_k, cache_v, rows, kv_src, *cu)

        q8, k8, v8, scales = pack()
        r["pack_ms"] = per_call_ms(pack)
        out = torch.empty_like(q8)
        t0 = time.perf_counter()
        fp8(q8, k8[:lk], v8[:lk], scales[0], out)
        torch.cuda.synchronize()
        r["fp8_first_call_s"] = time.perf_counter() - t0
        r["fp8_ms"] = per_call_ms(lambda: fp8(q8, k8[:lk], v8[:lk], scales[0], out))
        r["fp8_rel_l2"] = rel(out.float() * scales[0, descale_o, 0], ref)
        for kind in ("bf16", "fp8"):
            r[f"{kind}_tflops"] = flops / r[f"{kind}_ms"] / 1e9
        r["fp8_speedup"] = r["bf16_ms"] / r["fp8_ms"]
        res[name] = r
        print(f"{name:18s} bf16 {r['bf16_ms']:.3f} ms ({r['bf16_tflops']:.0f} TFLOP/s, rel {r['bf16_rel_l2']:.1e})"
              f"  fp8 {r['fp8_ms']:.3f} ms ({r['fp8_tflops']:.0f} TFLOP/s, rel {r['fp8_rel_l2']:.3f}, first call "
              f"{r['fp8_first_call_s']:.2f} s)  pack {r['pack_ms']:.3f} ms", flush=True)
        del ref
        torch.cuda.empty_cache()
    report(res, a.out)


if __name__ == "__main__":
    main()
