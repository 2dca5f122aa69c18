"""The VAE at both ends of an image request, and cuDNN attention's one-time costs, on the GPU.

    python benchmarks/bench_vae.py --out $OUT/vae.json

The VAE is built with random weights (speed does not depend on them). Variants of the decode at 1024² and
512² and of the encode at 1024²: the reference's float32 with TF32 off and cuDNN's heuristic algorithms (what
the engine runs), the same with cuDNN's benchmark-chosen algorithms, with channels-last memory, with TF32,
and in bf16; each with its time and its largest pixel difference from the first. Then the first cuDNN
attention call of the process and a new sequence length's plan.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from common import header, median_cuda_s, parser, report
from torch.nn.attention import SDPBackend, sdpa_kernel

from bagel_serve.config.model_config import AutoEncoderParams
from bagel_serve.model.autoencoder import AutoEncoder, decoded_to_uint8

VARIANTS = {  # name: (cudnn.benchmark, allow_tf32, channels_last, dtype)
    "fp32": (False, False, False, torch.float32),
    "fp32_benchmark": (True, False, False, torch.float32),
    "fp32_benchmark_nhwc": (True, False, True, torch.float32),
    "tf32_benchmark": (True, True, False, torch.float32),
    "bf16_benchmark": (True, False, False, torch.bfloat16),
    "bf16_benchmark_nhwc": (True, False, True, torch.bfloat16),
}


def main() -> None:
    a = parser("vae.json").parse_args()
    res = header()
    # cuDNN attention first: the first call of the process pays cuDNN's set-up.
    q = torch.randn(1, 28, 4098, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 4160, 128, device="cuda", dtype=torch.bfloat16)
    for name, lk in (("cudnn_attention_first_call_s", 4160), ("cudnn_attention_new_length_s", 4170),
                     ("cudnn_attention_same_length_s", 4170)):
        kk = k[:, :, :lk] if lk <= k.shape[2] else torch.randn(1, 4, lk, 128, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION], set_priority=True):
            F.scaled_dot_product_attention(q, kk, kk, enable_gqa=True)
        torch.cuda.synchronize()
        res[name] = time.perf_counter() - t0
    print({k: v for k, v in res.items() if "cudnn" in k}, flush=True)

    # Group norm at the decoder's largest level: torch's kernel (one block per group) vs a split reduction.
    x = torch.randn(1, 128, 1024, 1024, device="cuda")
    w, bias = torch.randn(128, device="cuda"), torch.randn(128, device="cuda")

    def split_gn() -> torch.Tensor:
        var, mean = torch.var_mean(x.view(1, 32, -1), dim=-1, correction=0, keepdim=True)
        scale = (torch.rsqrt(var + 1e-6) * w.view(1, 32, 4)).view(1, 128, 1, 1)
        shift = bias.view(1, 128, 1, 1) - mean.repeat_interleave(4, dim=1).view(1, 128, 1, 1) * scale
        return torch.addcmul(shift, x, scale)

    with torch.inference_mode():
        res["group_norm_1024_torch_s"] = median_cuda_s(lambda: F.group_norm(x, 32, w, bias, 1e-6), 5)
        res["group_norm_1024_split_s"] = median_cuda_s(split_gn, 5)
        res["group_norm_split_maxdiff"] = (split_gn() - F.group_norm(x, 32, w, bias, 1e-6)).abs().max().item()
    print({k: v for k, v in res.items() if "group_norm" in k}, flush=True)
    del x

    ae = AutoEncoder(AutoEncoderParams()).cuda().eval().requires_grad_(False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = {
        "decode_1024": torch.randn(1, 16, 128, 128, device="cuda", generator=gen),
        "decode_512": torch.randn(1, 16, 64, 64, device="cuda", generator=gen),
        "encode_1024": torch.rand(1, 3, 1024, 1024, device="cuda", generator=gen) * 2 - 1,
    }
    base: dict[str, torch.Tensor] = {}
    b = torch.backends.cudnn
    with torch.inference_mode():
        for vname, (bench, tf32, nhwc, dtype) in VARIANTS.items():
            model = ae.to(dtype=dtype, memory_format=torch.channels_last if nhwc else torch.contiguous_format)
            for cname, x in cases.items():
                x = x.to(dtype=dtype, memory_format=torch.channels_last if nhwc else torch.contiguous_format)
                fn = (lambda: model.decode(x)) if cname.startswith("decode") else (lambda: model.encode_moments(x)[0])
                with b.flags(enabled=True, benchmark=bench, deterministic=False, allow_tf32=tf32):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    t0 = time.perf_counter()
                    out = fn()
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    s = median_cuda_s(fn, 3)
                    out = fn()
                    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
                if cname.startswith("decode"):
                    out = decoded_to_uint8(out.float()).int()
                else:
                    out = out.float()
                if vname == "fp32":
                    base[cname] = out
                diff = (out - base[cname]).abs().max().item()
                res[f"{cname}_{vname}_s"] = s
                res[f"{cname}_{vname}_first_s"] = first
                res[f"{cname}_{vname}_maxdiff"] = diff
                res[f"{cname}_{vname}_peak_gib"] = peak
                print(f"{cname:<12} {vname:<22} {s * 1e3:8.1f} ms (first {first * 1e3:8.1f} ms)  max diff {diff:.3g}"
                      f"  peak +{peak:.2f} GiB",
                      flush=True)
            ae = model.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    report(res, a.out)


if __name__ == "__main__":
    main()
