"""RMSNorm over expert row ranges with an optional fused residual add (Qwen2 convention).

The decode step runs `residual += x; out = norm(residual)` twice per layer; fused, that is one read of
x and residual and one write of each, instead of four kernels. Rows [0, n_und) use the understanding
weight and the rest the generation weight, so a mixed batch needs no split and no concatenation.

Numerics (identical in every path): statistics in float32; the normalised value is rounded to the input
dtype *before* the weight multiply (HF Qwen2 `weight * h.to(dtype)`); the residual sum is rounded to the
input dtype before it is normalised, because that rounded sum is what the next layer adds to.
"""

from __future__ import annotations

import torch

from bagel_serve.layers.kernels import next_power_of_2, use_triton
from bagel_serve.layers.kernels.quant import Rows, block_args, empty_rows, quantize_rows_native

try:
    import triton
    import triton.language as tl

    from bagel_serve.layers.kernels import cast_rne
    from bagel_serve.layers.kernels.quant import quantize_values, row_scale
except ImportError:  # the native path needs neither
    triton = None


def _check(x: torch.Tensor, w_und: torch.Tensor, w_gen: torch.Tensor | None, residual: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"rms_norm wants [N, H] rows, got shape {tuple(x.shape)}")
    for name, w in (("w_und", w_und), ("w_gen", w_gen)):
        if w is not None and (w.shape != (x.shape[1],) or w.dtype != x.dtype):
            raise ValueError(f"{name} must be [{x.shape[1]}] {x.dtype}, got {tuple(w.shape)} {w.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must match x in shape and dtype")


def _split(n: int, w_gen: torch.Tensor | None, n_und: int | None) -> int:
    """How many leading rows use the und weight (all of them when there is no gen weight)."""
    if w_gen is None or n_und is None:
        return n
    if not 0 <= n_und <= n:
        raise ValueError(f"n_und={n_und} outside [0, {n}]")
    return n_und


def rms_norm_native(
    x: torch.Tensor,
    w_und: torch.Tensor,
    w_gen: torch.Tensor | None = None,
    n_und: int | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition. With `residual`, the rounded sum is written into `residual` in place and returned."""
    _check(x, w_und, w_gen, residual)
    n = _split(x.shape[0], w_gen, n_und)
    if residual is not None:
        residual.copy_((x.float() + residual.float()).to(x.dtype))
        s = residual
    else:
        s = x
    h = s.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    if n == s.shape[0]:
        out = w_und * h
    elif n == 0:
        out = w_gen * h
    else:
        out = torch.cat([w_und * h[:n], w_gen * h[n:]])
    return out, residual


if triton is not None:

    @triton.jit
    def _normed_row(x_ptr, res_ptr, row, cols, mask, H, stride_x, stride_r, eps, HAS_RES: tl.constexpr):
        """One row's (residual-added) normalised value, rounded to the input dtype, as float32; with
        HAS_RES the rounded sum is stored back into the residual row."""
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = cast_rne(x.to(tl.float32) + r.to(tl.float32), x.dtype)
            tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
        s = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)
        return cast_rne(s * rstd, x.dtype).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, out_ptr, wu_ptr, wg_ptr,
        n_und, H, stride_x, stride_r, stride_o, eps,
        HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        h = _normed_row(x_ptr, res_ptr, row, cols, mask, H, stride_x, stride_r, eps, HAS_RES)
        if row < n_und:
            w = tl.load(wu_ptr + cols, mask=mask, other=0.0)
        else:
            w = tl.load(wg_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + cols, cast_rne(h * w.to(tl.float32), x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _emit_row(ptr, s_ptr, r, stride, cols, mask, y, QUANT: tl.constexpr):
        """Store one output row `y` (input dtype) as is, or as e4m3 with its scale."""
        if QUANT:
            yf = y.to(tl.float32)
            scale = row_scale(tl.max(tl.abs(yf), axis=0))  # masked lanes hold 0
            tl.store(s_ptr + r, scale)
            tl.store(ptr + r * stride + cols, quantize_values(yf, scale), mask=mask)
        else:
            tl.store(ptr + r * stride + cols, y, mask=mask)

    @triton.jit
    def _rms_norm_quant_kernel(
        x_ptr, res_ptr, wu_ptr, wg_ptr, head_ptr, head_s_ptr, tail_ptr, tail_s_ptr,
        n_und, H, stride_x, stride_r, stride_h, stride_t, eps,
        HAS_RES: tl.constexpr, Q_HEAD: tl.constexpr, Q_TAIL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """`_rms_norm_kernel` writing rows [0, n_und) into the head buffer and the rest into the tail buffer,
        each either in the input dtype or as e4m3 rows with their scales (the row is in registers, so its
        amax is known before the cast)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        h = _normed_row(x_ptr, res_ptr, row, cols, mask, H, stride_x, stride_r, eps, HAS_RES)
        dtype = x_ptr.dtype.element_ty
        if row < n_und:
            w = tl.load(wu_ptr + cols, mask=mask, other=0.0)
            _emit_row(head_ptr, head_s_ptr, row, stride_h, cols, mask, cast_rne(h * w.to(tl.float32), dtype), Q_HEAD)
        else:
            w = tl.load(wg_ptr + cols, mask=mask, other=0.0)
            _emit_row(tail_ptr, tail_s_ptr, row - n_und, stride_t, cols, mask, cast_rne(h * w.to(tl.float32), dtype),
                      Q_TAIL)


def rms_norm_triton(
    x: torch.Tensor,
    w_und: torch.Tensor,
    w_gen: torch.Tensor | None = None,
    n_und: int | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One program per row (a 3584-wide row is 7 KB in bf16: one program keeps it in registers).

    With `residual`, the rounded sum `x + residual` is written into `residual` in place and returned as
    the second value; `out` may be given (a preallocated [N, H] buffer, e.g. for a CUDA graph).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(x, w_und, w_gen, residual)
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm_triton needs unit stride along H")
    n_rows, hidden = x.shape
    n = _split(n_rows, w_gen, n_und)
    if out is None:
        out = torch.empty_like(x)
    if n_rows == 0:
        return out, residual
    block = next_power_of_2(hidden)
    _rms_norm_kernel[(n_rows,)](
        x, residual if residual is not None else x, out, w_und, w_gen if w_gen is not None else w_und,
        n, hidden, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), eps,
        HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
    )
    return out, residual


def rms_norm(
    x: torch.Tensor,
    w_und: torch.Tensor,
    w_gen: torch.Tensor | None = None,
    n_und: int | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normed, residual_out). With `residual`, `residual` is updated in place to the rounded `x + residual`."""
    if use_triton(x, residual):
        return rms_norm_triton(x, w_und, w_gen, n_und, eps, residual)
    return rms_norm_native(x, w_und, w_gen, n_und, eps, residual)


# ---------------------------------------------------------------------------------------------------------
# FP8 output: the rows that feed an FP8 linear leave the norm quantised (`kernels.quant`).


def rms_norm_quant_native(
    x: torch.Tensor,
    w_und: torch.Tensor,
    w_gen: torch.Tensor,
    n_und: int,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    quant_und: bool = False,
    quant_gen: bool = True,
) -> tuple[Rows, Rows, torch.Tensor | None]:
    """The definition: `rms_norm_native`, then rows [0, n_und) (the head) and the rest (the tail) each
    quantised per row if asked. Returns (head, tail, residual)."""
    out, residual = rms_norm_native(x, w_und, w_gen, n_und, eps, residual)
    n = _split(x.shape[0], w_gen, n_und)
    head, tail = out[:n], out[n:]
    return (quantize_rows_native(head) if quant_und else head,
            quantize_rows_native(tail) if quant_gen else tail, residual)


QUANT_LAUNCH = {"elements_per_thread": 16}
"""Elements of the row per thread (which sets the warps) of the quantising norm; module-level so
`benchmarks/bench_fp8.py --sweep` can try others."""


def rms_norm_quant_triton(
    x: torch.Tensor,
    w_und: torch.Tensor,
    w_gen: torch.Tensor,
    n_und: int,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    quant_und: bool = False,
    quant_gen: bool = True,
) -> tuple[Rows, Rows, torch.Tensor | None]:
    """One launch over all rows, like `rms_norm_triton`; head and tail are separate allocations (so an FP8
    GEMM gets aligned data and scale pointers for each expert)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(x, w_und, w_gen, residual)
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm_quant_triton needs unit stride along H")
    n_rows, hidden = x.shape
    n = _split(n_rows, w_gen, n_und)
    head, tail = empty_rows(n, hidden, x, quant_und), empty_rows(n_rows - n, hidden, x, quant_gen)
    if n_rows == 0:
        return head, tail, residual
    (hd, hs, qh), (td, ts, qt) = block_args(head, tail, quant_und, quant_gen, x)
    block = next_power_of_2(hidden)
    _rms_norm_quant_kernel[(n_rows,)](
        x, residual if residual is not None else x, w_und, w_gen, hd, hs, td, ts,
        n, hidden, x.stride(0), residual.stride(0) if residual is not None else 0, hd.stride(0), td.stride(0), eps,
        HAS_RES=residual is not None, Q_HEAD=qh, Q_TAIL=qt, BLOCK=block,
        num_warps=min(32, max(1, block // (32 * QUANT_LAUNCH["elements_per_thread"]))),
    )
    return head, tail, residual


def rms_norm_quant(
    x: torch.Tensor,
    w_und: torch.Tensor,
    w_gen: torch.Tensor,
    n_und: int,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    quant_und: bool = False,
    quant_gen: bool = True,
) -> tuple[Rows, Rows, torch.Tensor | None]:
    """(head rows [0, n_und), tail rows, residual_out), each block e4m3 + scales where asked."""
    if use_triton(x, residual):
        return rms_norm_quant_triton(x, w_und, w_gen, n_und, eps, residual, quant_und, quant_gen)
    return rms_norm_quant_native(x, w_und, w_gen, n_und, eps, residual, quant_und, quant_gen)
