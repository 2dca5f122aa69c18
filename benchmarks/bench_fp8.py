"""FP8 (W8A8 e4m3, row-wise scales) against bf16 at the DiT's GEMM shapes, on one GPU (sm_89+).

    python benchmarks/bench_fp8.py --out bench_fp8.json

For each projection of a 1024x1024 denoising forward (M = 8196 rows: QKV 3584->4608, O 3584->3584, gate-up
3584->37888, down 18944->3584) it measures, as effective TFLOP/s of the GEMM's 2*M*N*K:
  bf16        `x @ w.T` (cuBLAS)
  fp8 gemm    `torch._scaled_mm` on inputs already in e4m3 (the GEMM alone, with fast accumulation as the
              engine runs it; `--sweep` compares it with promotion)
  +quant      the standalone per-row quantiser kernel, then the GEMM (what o_proj runs)
  +eager      the same quantisation as a plain torch amax/div/clamp/cast chain, then the GEMM
  producer    the op that makes the GEMM's input, then the GEMM: bf16 RMSNorm (QKV, gate-up) or
              SiLU-and-mul (down) then `mm`, against the fused FP8 variant then `_scaled_mm`
and, first, checks on this GPU that each Triton kernel writes the same e4m3 bytes and scales as its twin
(the tests check that under the interpreter) and that the FP8 GEMM matches its float32 emulation. Every
measurement is in its own try/except: a failure is recorded and the run goes on. Under a minute on an H200.

`--sweep` adds: each FP8 producer kernel alone at the forward's shapes under several launch shapes (the
modules' `LAUNCH` tables), as GB/s of the bytes it must move against the card's copy bandwidth, each
checked byte for byte against its twin; the MLP GEMMs at row counts around the chunk sizes a forward cuts
(tile quantisation); and fast accumulation's rate and error against the float32 emulation per projection.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, machine_ceilings, median_cuda_s, parser, report  # noqa: E402

from bagel_serve.layers.fp8 import fp8_linear  # noqa: E402
from bagel_serve.layers.kernels import activation, quant, rms_norm  # noqa: E402
from bagel_serve.layers.kernels.activation import silu_and_mul_quant_triton, silu_and_mul_triton  # noqa: E402
from bagel_serve.layers.kernels.quant import Fp8Rows, quantize_rows_native, quantize_rows_triton  # noqa: E402
from bagel_serve.layers.kernels.rms_norm import rms_norm_quant_triton, rms_norm_triton  # noqa: E402

M, H, INTER = 8196, 3584, 18944
N_UND = 100  # understanding rows of the mixed forwards the checks run
SHAPES = {"qkv": (H, 4608), "o": (H, H), "gate_up": (H, 2 * INTER), "down": (INTER, H)}
BF = torch.bfloat16
REPS = 20


def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(BF)


def same_fp8(a: Fp8Rows, b: Fp8Rows) -> int:
    """Elements or scales that differ (0 = bit-exact)."""
    return int((a.data.view(torch.uint8) != b.data.view(torch.uint8)).sum()) + int((a.scale != b.scale).sum())


def checks(res: dict) -> None:
    x = randn(M, H) * torch.logspace(-3, 2, M, device="cuda")[:, None].to(BF)
    res["check.quantize_rows.mismatches"] = same_fp8(quantize_rows_triton(x), quantize_rows_native(x))
    wu, wg, r = randn(H), randn(H), randn(M, H)
    for n_und in (0, N_UND):
        plain, _ = rms_norm_triton(x, wu, wg, n_und, 1e-6, r.clone())
        head, tail, _ = rms_norm_quant_triton(x, wu, wg, n_und, 1e-6, r.clone(), False, True)
        bad = same_fp8(tail, quantize_rows_native(plain[n_und:])) + int((head != plain[:n_und]).sum())
        res[f"check.rms_norm_quant.n_und={n_und}.mismatches"] = bad
    gu = randn(M, 2 * INTER, scale=2.0)
    plain = silu_and_mul_triton(gu)
    head, tail = silu_and_mul_quant_triton(gu, N_UND, False, True)
    res["check.silu_and_mul_quant.mismatches"] = (same_fp8(tail, quantize_rows_native(plain[N_UND:]))
                                                   + int((head != plain[:N_UND]).sum()))
    # The GEMM against its float32 emulation (the CPU path): accumulation order only.
    k, n = SHAPES["qkv"]
    m = min(512, M)
    w = quantize_rows_native(randn(n, k, scale=0.05))
    xq = quantize_rows_native(x[:m])
    bias = randn(n)
    got = fp8_linear(xq, w.data, w.scale.view(1, -1), bias, BF).float()
    want = xq.dequantize() @ w.dequantize().T + bias.float()
    res["check.fp8_gemm.max_rel_err"] = float(((got - want).abs().max() / want.abs().max()))
    out = torch.empty(m + 100, n, device="cuda", dtype=BF)  # rows 50.. of a larger buffer, as the MoT pair writes
    fp8_linear(xq, w.data, w.scale.view(1, -1), bias, BF, out=out[50 : 50 + m])
    res["check.fp8_gemm_out_rows.max_abs_diff"] = float((out[50 : 50 + m].float() - got).abs().max())


def measure(res: dict, name: str, flops: float, fn) -> None:
    try:
        res[name] = flops / median_cuda_s(fn, REPS) / 1e12
    except Exception as e:  # recorded, the run goes on
        res[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    print(f"{name:<40}{res[name]:>12.1f}" if isinstance(res[name], float) else f"{name:<40} {res[name]}", flush=True)


def gemms(res: dict) -> None:
    for case, (k, n) in SHAPES.items():
        flops = 2.0 * M * n * k
        x, w = randn(M, k), randn(n, k, scale=0.05)
        xq, wq = quantize_rows_native(x), quantize_rows_native(w)
        sw = wq.scale.view(1, -1)
        bias = randn(n) if case == "qkv" else None
        out = torch.empty(M, n, device="cuda", dtype=BF)
        measure(res, f"{case}.bf16", flops, lambda: torch.mm(x, w.t(), out=out))
        measure(res, f"{case}.fp8_gemm", flops, lambda: fp8_linear(xq, wq.data, sw, bias, BF, out=out))
        measure(res, f"{case}.fp8+quant_kernel", flops,
                lambda: fp8_linear(quantize_rows_triton(x), wq.data, sw, bias, BF, out=out))
        measure(res, f"{case}.fp8+eager_quant", flops,
                lambda: fp8_linear(quantize_rows_native(x), wq.data, sw, bias, BF, out=out))
        if case in ("qkv", "gate_up"):
            wu, wg, r = randn(k), randn(k), randn(M, k)
            measure(res, f"{case}.bf16_with_rms_norm", flops,
                    lambda: torch.mm(rms_norm_triton(x, wu, wg, 0, 1e-6, r)[0], w.t(), out=out))
            measure(res, f"{case}.fp8_with_fused_rms_norm", flops,
                    lambda: fp8_linear(rms_norm_quant_triton(x, wu, wg, 0, 1e-6, r, False, True)[1],
                                       wq.data, sw, bias, BF, out=out))
        if case == "down":
            gu = randn(M, 2 * k, scale=2.0)
            measure(res, f"{case}.bf16_with_silu_and_mul", flops,
                    lambda: torch.mm(silu_and_mul_triton(gu), w.t(), out=out))
            measure(res, f"{case}.fp8_with_fused_silu_and_mul", flops,
                    lambda: fp8_linear(silu_and_mul_quant_triton(gu, 0, False, True)[1], wq.data, sw, None, BF,
                                       out=out))
        del x, w, xq, wq, out
        torch.cuda.empty_cache()


def _gb_s(res: dict, name: str, nbytes: float, fn, check=None) -> None:
    """GB/s of `nbytes` moved by fn(), and with `check` the count of values that differ from the twin."""
    def ten() -> None:  # back to back, so a short kernel's launch overlaps the one before it
        for _ in range(10):
            fn()

    try:
        res[f"{name}.gb_s"] = 10 * nbytes / median_cuda_s(ten, REPS) / 1e9
        if check is not None:
            res[f"{name}.mismatches"] = check()
        line = f"{name:<48}{res[f'{name}.gb_s']:>10.0f} GB/s"
        if check is not None:
            line += f"  mismatches {res[f'{name}.mismatches']}"
    except Exception as e:  # recorded, the run goes on
        res[f"{name}.gb_s"] = line = f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    print(line, flush=True)


def sweep_producers(res: dict) -> None:
    """Each producer alone (its input already made), under the launch shapes of its module's table."""
    x, wu, wg, r0 = randn(M, H), randn(H), randn(H), randn(M, H)
    r = r0.clone()  # the timed calls add into it; the checks start from r0
    gu = randn(M, 2 * INTER, scale=2.0)
    _gb_s(res, "rms_norm.bf16_residual", M * H * 8, lambda: rms_norm_triton(x, wu, wg, 0, 1e-6, r))
    _gb_s(res, "silu_and_mul.bf16", M * INTER * 6, lambda: silu_and_mul_triton(gu))
    want_q = quantize_rows_native(x)
    plain_norm, _ = rms_norm_triton(x, wu, wg, 0, 1e-6, r0.clone())
    want_norm = quantize_rows_native(plain_norm)
    want_silu = quantize_rows_native(silu_and_mul_triton(gu))
    saved = (dict(quant.LAUNCH), dict(rms_norm.QUANT_LAUNCH), dict(activation.QUANT_LAUNCH))
    try:
        for ept in (4, 8, 16, 32):
            quant.LAUNCH.update(max_block=4096, elements_per_thread=ept)
            _gb_s(res, f"quantize_rows.ept{ept}", M * H * 3, lambda: quantize_rows_triton(x),
                  lambda: same_fp8(quantize_rows_triton(x), want_q))
            rms_norm.QUANT_LAUNCH.update(elements_per_thread=ept)
            _gb_s(res, f"rms_norm_quant.residual.ept{ept}", M * H * 7,
                  lambda: rms_norm_quant_triton(x, wu, wg, 0, 1e-6, r, False, True),
                  lambda: same_fp8(rms_norm_quant_triton(x, wu, wg, 0, 1e-6, r0.clone(), False, True)[1], want_norm))
        shapes = [dict(max_row=0, max_block=b, elements_per_thread=e) for b, e in ((2048, 16), (4096, 8), (8192, 8))]
        shapes += [dict(saved[2], row_elements_per_thread=e) for e in (32, 64, 128, 256)]
        for shape in shapes:
            activation.QUANT_LAUNCH.update(shape)
            name = (f"registers.ept{shape['row_elements_per_thread']}" if shape["max_row"]
                    else f"two_pass.block{shape['max_block']}.ept{shape['elements_per_thread']}")
            _gb_s(res, f"silu_and_mul_quant.{name}", M * INTER * 5,
                  lambda: silu_and_mul_quant_triton(gu, 0, False, True),
                  lambda: same_fp8(silu_and_mul_quant_triton(gu, 0, False, True)[1], want_silu))
            activation.QUANT_LAUNCH.update(saved[2])
    finally:
        quant.LAUNCH.update(saved[0])
        rms_norm.QUANT_LAUNCH.update(saved[1])
        activation.QUANT_LAUNCH.update(saved[2])
    del x, r, r0, gu
    torch.cuda.empty_cache()


def sweep_gemms(res: dict) -> None:
    """The MLP GEMMs at row counts a forward's chunks may have (a tile is 128 or 256 rows), bf16 and FP8 with
    and without fast accumulation; then fast accumulation's error per projection."""
    for case in ("gate_up", "down"):
        k, n = SHAPES[case]
        w = randn(n, k, scale=0.05)
        wq = quantize_rows_native(w)
        for m in (4094, 4096, 4098, 4100, 8192, 8196):
            x = randn(m, k)
            xq = quantize_rows_native(x)
            out = torch.empty(m, n, device="cuda", dtype=BF)
            flops = 2.0 * m * n * k
            measure(res, f"{case}.m{m}.bf16", flops, lambda: torch.mm(x, w.t(), out=out))
            for fast in (False, True):
                measure(res, f"{case}.m{m}.fp8{'_fast' if fast else ''}", flops,
                        lambda: fp8_linear(xq, wq.data, wq.scale.view(1, -1), None, BF, out=out, fast_accum=fast))
        del w, wq, x, xq, out
        torch.cuda.empty_cache()
    for case, (k, n) in SHAPES.items():
        m = 1024
        xq, wq = quantize_rows_native(randn(m, k)), quantize_rows_native(randn(n, k, scale=0.05))
        want = xq.dequantize() @ wq.dequantize().T
        for fast in (False, True):
            got = fp8_linear(xq, wq.data, wq.scale.view(1, -1), None, BF, fast_accum=fast).float()
            res[f"{case}.fp8{'_fast' if fast else ''}.rel_l2_vs_fp32"] = float((got - want).norm() / want.norm())
        print(f"{case:<10} rel. L2 vs float32 emulation: exact accumulation "
              f"{res[f'{case}.fp8.rel_l2_vs_fp32']:.2e}, fast {res[f'{case}.fp8_fast.rel_l2_vs_fp32']:.2e}",
              flush=True)


def main() -> None:
    ap = parser("bench_fp8.json")
    ap.add_argument("--sweep", action="store_true", help="producers' launch shapes, GEMM row counts, fast accumulation")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        sys.exit("bench_fp8 needs a CUDA GPU of compute capability 8.9 or newer")
    torch.manual_seed(0)
    res: dict = {**header(), **machine_ceilings(), "rows": M}
    try:
        checks(res)
    except Exception as e:
        res["check.failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    print("effective TFLOP/s (GEMM flops / time, including the producer where named)")
    gemms(res)
    if args.sweep:
        sweep_producers(res)
        sweep_gemms(res)
    report(res, args.out)


if __name__ == "__main__":
    main()
