"""The VAE's float32 convolution kernel (`layers.kernels.conv`) against cuDNN, and whole decodes through it.

    python benchmarks/bench_vae_conv.py --out $OUT/vae_conv.json [--sweep]

Part 1, the decoder's convolution shapes at a 1024x1024 image: cuDNN float32 (TF32 off, what the reference's
numbers are), cuDNN TF32, and the kernel in "tf32x3" (float32's accuracy, the default) and in "tf32"; each
with its time and its largest error against a float64 convolution, relative to the largest output. With
`--sweep`, the kernel's tile choices too. Part 2, whole decodes (512² and 1024²) and a 1024² encode of a
random-weight VAE: cuDNN float32, the kernel (the default) and cuDNN TF32 (`vae_precision: tf32`), time, peak memory above the weights, and the distance of
each from a float64 decode (largest error relative to the largest output; pixels that differ as uint8).
`--warm-up-only`: just the time a stage spends readying its VAE at start (`diffusion.warm_up_vae`: the
kernels compiled, or read from Triton's cache: run it with a fresh and then the same TRITON_CACHE_DIR).
"""

from __future__ import annotations

import os
import time

import torch
from common import header, median_cuda_s, parser, report

from bagel_serve.config.model_config import AutoEncoderParams
from bagel_serve.engine.diffusion import VaeMode, warm_up_vae
from bagel_serve.layers.kernels import DISABLE_ENV
from bagel_serve.layers.kernels import conv as kconv
from bagel_serve.model.autoencoder import AutoEncoder, decoded_to_uint8
from bagel_serve.model.loader import process_weights_after_loading

SHAPES = {  # name: (in channels, out channels, kernel, input side, upsample)
    "mid 512ch 128²": (512, 512, 3, 128, 1),
    "up 512ch 128²->256²": (512, 512, 3, 128, 2),
    "res 512ch 256²": (512, 512, 3, 256, 1),
    "up 512ch 256²->512²": (512, 512, 3, 256, 2),
    "res 512->256ch 512²": (512, 256, 3, 512, 1),
    "res 256ch 512²": (256, 256, 3, 512, 1),
    "up 256ch 512²->1024²": (256, 256, 3, 512, 2),
    "res 256->128ch 1024²": (256, 128, 3, 1024, 1),
    "res 128ch 1024²": (128, 128, 3, 1024, 1),
    "shortcut 256->128ch 1024²": (256, 128, 1, 1024, 1),
}
SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for m, n, k, w, s in (
    (128, 128, 32, 8, 3), (128, 128, 32, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 256, 32, 8, 3),
    (256, 128, 32, 8, 3), (128, 128, 16, 8, 4), (128, 128, 64, 8, 2), (256, 64, 32, 8, 3))]


def conv_flops(cin: int, cout: int, k: int, side: int, up: int) -> float:
    return 2.0 * cin * cout * k * k * (side * up) ** 2


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def part_shapes(res: dict, sweep: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (cin, cout, k, side, up) in SHAPES.items():
        x = torch.randn(1, cin, side, side, device="cuda", generator=g)
        w = torch.randn(cout, cin, k, k, device="cuda", generator=g) / (cin * k * k) ** 0.5
        b = torch.randn(cout, device="cuda", generator=g)
        wp = kconv.pack_weight(w)
        pad = k // 2
        ref = kconv.conv2d_native(x.double(), w.double(), b.double(), 1, pad, up)
        flops = conv_flops(cin, cout, k, side, up)
        row = {}
        for label, tf32 in (("cudnn_fp32", False), ("cudnn_tf32", True)):
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
                fn = lambda: kconv.conv2d_native(x, w, b, 1, pad, up)  # noqa: E731
                row[label] = (median_cuda_s(fn, 5), rel_err(fn(), ref))
        default = kconv.BLOCKS[3 if k > 1 else 1]
        configs = SWEEP if sweep else [default]
        for prec in ("tf32x3", "tf32"):
            best = None
            for cfg in configs if prec == "tf32x3" else [default]:
                fn = lambda: kconv.conv2d_triton(x, wp, b, 1, pad, up, precision=prec, blocks=cfg)  # noqa: E731
                try:
                    s = median_cuda_s(fn, 5)
                except Exception as e:  # a tile that does not fit the card's shared memory
                    print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
                    continue
                if sweep and prec == "tf32x3":
                    res[f"sweep {name} {tuple(cfg.values())}"] = s
                    print(f"  sweep {name:<28} {tuple(cfg.values())} {s * 1e3:7.2f} ms {flops / s / 1e12:5.1f} TF/s",
                          flush=True)
                if best is None or s < best[0]:
                    best = (s, rel_err(fn(), ref), cfg)
            row[f"triton_{prec}"] = best[:2]
            if prec == "tf32x3":
                res[f"{name} best tiles"] = str(best[2])
        nhwc = x.contiguous(memory_format=torch.channels_last)
        fn = lambda: kconv.conv2d_triton(nhwc, wp, b, 1, pad, up, precision="tf32x3")  # noqa: E731
        row["triton_tf32x3_nhwc"] = (median_cuda_s(fn, 5), rel_err(fn(), ref))
        for label, (s, err) in row.items():
            res[f"{name} {label} ms"] = s * 1e3
            res[f"{name} {label} TFLOP/s"] = flops / s / 1e12
            res[f"{name} {label} rel err"] = err
        print(f"{name:<28} " + "  ".join(f"{lbl} {s * 1e3:7.2f} ms {flops / s / 1e12:5.1f} TF/s err {e:.1e}"
                                          for lbl, (s, e) in row.items()), flush=True)
        del x, w, wp, ref


def part_decode(res: dict) -> None:
    torch.manual_seed(0)
    ae = AutoEncoder(AutoEncoderParams()).cuda().eval().requires_grad_(False)
    process_weights_after_loading(ae, torch.device("cuda"))
    ae64 = AutoEncoder(AutoEncoderParams()).eval().requires_grad_(False)
    ae64.load_state_dict({k: v.contiguous() for k, v in ae.state_dict().items()})
    ae64 = ae64.cuda().double()
    g = torch.Generator(device="cuda").manual_seed(1)
    cases = {
        "decode_512": torch.randn(1, 16, 64, 64, device="cuda", generator=g),
        "decode_1024": torch.randn(1, 16, 128, 128, device="cuda", generator=g),
        "encode_1024": torch.rand(1, 3, 1024, 1024, device="cuda", generator=g) * 2 - 1,
    }
    with torch.inference_mode():
        for cname, x in cases.items():
            run = (lambda m, t: m.decode(t)) if cname.startswith("decode") else (lambda m, t: m.encode_moments(t)[0])
            ref = run(ae64, x.double())
            for label, disable, tf32 in (("cudnn_fp32", "1", False), ("kernel", "0", False), ("cudnn_tf32", "0", True)):
                os.environ[DISABLE_ENV] = disable
                with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
                    print(measure_decode(res, f"{cname} {label}", lambda: run(ae, x), ref, cname.startswith("decode")),
                          flush=True)
    os.environ[DISABLE_ENV] = "0"


def measure_decode(res: dict, key: str, fn, ref: torch.Tensor, pixels: bool) -> str:
    """Time fn (first call and median), its peak above what is allocated, and its distance from ref."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    s = median_cuda_s(fn, 3)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    err = rel_err(out, ref)
    res.update({f"{key} s": s, f"{key} first call s": first, f"{key} peak GiB": peak, f"{key} rel err vs float64": err})
    line = f"{key:<24} {s * 1e3:7.1f} ms (first {first:5.2f} s) peak +{peak:.2f} GiB rel err {err:.2e}"
    if pixels:
        d = (decoded_to_uint8(out).int() - decoded_to_uint8(ref.float()).int()).abs()
        res[f"{key} pixels off vs float64"] = int((d > 0).sum())
        res[f"{key} max pixel diff vs float64"] = int(d.max())
        line += f" pixels off {int((d > 0).sum())} of {d.numel()} (max {int(d.max())})"
    return line


def main() -> None:
    p = parser("vae_conv.json")
    p.add_argument("--sweep", action="store_true", help="time the kernel's tile choices too")
    p.add_argument("--warm-up-only", action="store_true", help="time readying a VAE for a stage, nothing else")
    a = p.parse_args()
    res = header()
    if a.warm_up_only:
        ae = AutoEncoder(AutoEncoderParams()).cuda().eval().requires_grad_(False)
        res["vae_warm_up_s"] = warm_up_vae(ae, VaeMode(), encodes=True, decodes=True)
        print(f"VAE warm-up (encode and decode) {res['vae_warm_up_s']:.2f} s", flush=True)
        report(res, a.out)
        return
    part_shapes(res, a.sweep)
    part_decode(res)
    report(res, a.out)


if __name__ == "__main__":
    main()
