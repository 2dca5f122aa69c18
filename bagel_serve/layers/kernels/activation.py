"""SiLU-and-multiply over the merged gate-up projection output.

The merged GEMM writes [gate | up] side by side; this reads both halves once and writes the product,
instead of slicing into two views and running silu and mul as separate kernels (three passes over an
[N, 18944] activation, plus a temporary).

Numerics match torch's `F.silu(g) * u` in the input dtype: silu is computed in float32 and rounded to
the input dtype, then multiplied by `u` in float32 and rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel_serve.layers.kernels import next_power_of_2, power_of_2_parts, use_triton
from bagel_serve.layers.kernels.quant import Rows, block_args, empty_rows, quantize_rows_native

try:
    import triton
    import triton.language as tl

    from bagel_serve.layers.kernels import cast_rne
    from bagel_serve.layers.kernels.quant import quantize_values, row_scale
except ImportError:
    triton = None


def _check(x: torch.Tensor) -> int:
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_and_mul wants [N, 2I], got {tuple(x.shape)}")
    return x.shape[1] // 2


def silu_and_mul_native(x: torch.Tensor) -> torch.Tensor:
    """The definition."""
    i = _check(x)
    return F.silu(x[:, :i]) * x[:, i:]


if triton is not None:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = cast_rne(gf / (1.0 + tl.exp(-gf)), g.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, cast_rne(act * u.to(tl.float32), g.dtype), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A 2-D grid (row, column block) so both one decode row and an 8192-row prefill fill the GPU."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    i = _check(x)
    if x.stride(1) != 1:
        raise ValueError("silu_and_mul_triton needs unit stride along columns")
    if out is None:
        out = torch.empty((x.shape[0], i), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or i == 0:
        return out
    block = 1024
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(i, block))](
        x, out, i, x.stride(0), out.stride(0), BLOCK=block, num_warps=4,
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[N, 2I] -> [N, I]: silu(gate) * up."""
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_native(x)


# ---------------------------------------------------------------------------------------------------------
# FP8 output for the rows that feed an FP8 down projection (`kernels.quant`).


def silu_and_mul_quant_native(x: torch.Tensor, n_und: int, quant_und: bool = False,
                              quant_gen: bool = True) -> tuple[Rows, Rows]:
    """The definition: `silu_and_mul_native`, then rows [0, n_und) (the head) and the rest (the tail) each
    quantised per row if asked."""
    out = silu_and_mul_native(x)
    n = _rows_split(x, n_und)
    head, tail = out[:n], out[n:]
    return (quantize_rows_native(head) if quant_und else head,
            quantize_rows_native(tail) if quant_gen else tail)


def _rows_split(x: torch.Tensor, n_und: int) -> int:
    if not 0 <= n_und <= x.shape[0]:
        raise ValueError(f"n_und={n_und} outside [0, {x.shape[0]}]")
    return n_und


if triton is not None:

    @triton.jit
    def _silu_mul_block(x_row, start, cols, I: tl.constexpr):
        """silu(gate) * up of one column block, exactly as `_silu_and_mul_kernel` rounds it."""
        mask = start + cols < I
        g = tl.load(x_row + start + cols, mask=mask, other=0.0)
        u = tl.load(x_row + I + start + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = cast_rne(gf / (1.0 + tl.exp(-gf)), g.dtype).to(tl.float32)
        return cast_rne(act * u.to(tl.float32), g.dtype), mask

    @triton.jit
    def _silu_mul_row(x_row, out_row, s_ptr, I: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
                      P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr):
        if QUANT and P0 > 0:
            # The row in registers as up to four power-of-two parts (`power_of_2_parts`): one read. The maxima
            # are taken in the input dtype (exact), so only its values stay live until the stores.
            c0 = tl.arange(0, P0)
            y0, m0 = _silu_mul_block(x_row, 0, c0, I)
            amax = tl.max(tl.abs(y0), axis=0).to(tl.float32)
            if P1 > 0:
                c1 = tl.arange(0, P1)
                y1, m1 = _silu_mul_block(x_row, P0, c1, I)
                amax = tl.maximum(amax, tl.max(tl.abs(y1), axis=0).to(tl.float32))
            if P2 > 0:
                c2 = tl.arange(0, P2)
                y2, m2 = _silu_mul_block(x_row, P0 + P1, c2, I)
                amax = tl.maximum(amax, tl.max(tl.abs(y2), axis=0).to(tl.float32))
            if P3 > 0:
                c3 = tl.arange(0, P3)
                y3, m3 = _silu_mul_block(x_row, P0 + P1 + P2, c3, I)
                amax = tl.maximum(amax, tl.max(tl.abs(y3), axis=0).to(tl.float32))
            scale = row_scale(amax)
            tl.store(s_ptr, scale)
            tl.store(out_row + c0, quantize_values(y0.to(tl.float32), scale), mask=m0)
            if P1 > 0:
                tl.store(out_row + P0 + c1, quantize_values(y1.to(tl.float32), scale), mask=m1)
            if P2 > 0:
                tl.store(out_row + P0 + P1 + c2, quantize_values(y2.to(tl.float32), scale), mask=m2)
            if P3 > 0:
                tl.store(out_row + P0 + P1 + P2 + c3, quantize_values(y3.to(tl.float32), scale), mask=m3)
        elif QUANT:
            # Two passes: the row's amax, then the quantised values (the second reads the row again).
            cols = tl.arange(0, BLOCK)
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, I, BLOCK):
                y, mask = _silu_mul_block(x_row, start, cols, I)
                amax = tl.maximum(amax, tl.abs(y.to(tl.float32)))
            scale = row_scale(tl.max(amax, axis=0))
            tl.store(s_ptr, scale)
            for start in range(0, I, BLOCK):
                y, mask = _silu_mul_block(x_row, start, cols, I)
                tl.store(out_row + start + cols, quantize_values(y.to(tl.float32), scale), mask=mask)
        else:
            cols = tl.arange(0, BLOCK)
            for start in range(0, I, BLOCK):
                y, mask = _silu_mul_block(x_row, start, cols, I)
                tl.store(out_row + start + cols, y, mask=mask)

    @triton.jit
    def _silu_and_mul_quant_kernel(x_ptr, head_ptr, head_s_ptr, tail_ptr, tail_s_ptr, n_und,
                                   stride_x, stride_h, stride_t, I: tl.constexpr, BLOCK: tl.constexpr,
                                   Q_HEAD: tl.constexpr, Q_TAIL: tl.constexpr, P0: tl.constexpr,
                                   P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr):
        """One program per row (its amax must be known before any value is cast); rows [0, n_und) go to
        the head buffer, the rest to the tail buffer, each in the input dtype or as e4m3 + scale. A
        quantised row is held in registers as parts P0..P3 when P0 > 0, else read twice in BLOCK columns."""
        row = tl.program_id(0).to(tl.int64)
        if row < n_und:
            _silu_mul_row(x_ptr + row * stride_x, head_ptr + row * stride_h, head_s_ptr + row, I, BLOCK, Q_HEAD,
                          P0, P1, P2, P3)
        else:
            r = row - n_und
            _silu_mul_row(x_ptr + row * stride_x, tail_ptr + r * stride_t, tail_s_ptr + r, I, BLOCK, Q_TAIL,
                          P0, P1, P2, P3)


QUANT_LAUNCH = {"max_row": 32768, "row_elements_per_thread": 64, "max_block": 4096, "elements_per_thread": 8}
"""Launch shape of the fused SiLU-and-mul quantiser. A quantised row of up to `max_row` columns is held in
registers as power-of-two parts and read once, with `row_elements_per_thread` of it per thread (which sets
the warps); a wider row (or `max_row` 0) is read twice in blocks of `max_block` columns with
`elements_per_thread` per thread. At the MLP's 18,944 columns and 8,196 rows on an H200
(`benchmarks/bench_fp8.py --sweep`, 2026-12-02): in registers 2.66-2.72 TB/s of the bytes it must move with
64 per thread (16 warps; 32 per thread spills: 1.86), against 2.15-2.22 for the best two-pass shape
(4096 x 8), whose second pass goes mostly to HBM again. Module-level so that sweep can try others."""


def _launch(i: int, quantised: bool) -> tuple[int, tuple[int, ...], int]:
    """(column block of the looping forms, register parts of a quantised row (all 0: two passes), warps) for
    rows of `i` columns; the warps follow the register form when a quantised block takes it."""
    launch = QUANT_LAUNCH
    block = min(launch["max_block"], next_power_of_2(i))
    if quantised and i <= launch["max_row"]:
        parts = power_of_2_parts(i)
        warps = next_power_of_2(-(-sum(parts) // (32 * launch["row_elements_per_thread"])))
    else:
        parts, warps = (0, 0, 0, 0), max(1, block // (32 * launch["elements_per_thread"]))
    return block, parts, min(32, warps)


def silu_and_mul_quant_triton(x: torch.Tensor, n_und: int, quant_und: bool = False,
                              quant_gen: bool = True) -> tuple[Rows, Rows]:
    """`silu_and_mul_quant_native` in one launch; head and tail are separate allocations."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    i = _check(x)
    if x.stride(1) != 1:
        raise ValueError("silu_and_mul_quant_triton needs unit stride along columns")
    n_rows = x.shape[0]
    n = _rows_split(x, n_und)
    head, tail = empty_rows(n, i, x, quant_und), empty_rows(n_rows - n, i, x, quant_gen)
    if n_rows == 0 or i == 0:
        return head, tail
    (hd, hs, qh), (td, ts, qt) = block_args(head, tail, quant_und, quant_gen, x)
    block, parts, warps = _launch(i, qh or qt)
    _silu_and_mul_quant_kernel[(n_rows,)](
        x, hd, hs, td, ts, n, x.stride(0), hd.stride(0), td.stride(0), I=i, BLOCK=block,
        Q_HEAD=qh, Q_TAIL=qt, P0=parts[0], P1=parts[1], P2=parts[2], P3=parts[3], num_warps=warps,
    )
    return head, tail


def silu_and_mul_quant(x: torch.Tensor, n_und: int, quant_und: bool = False,
                       quant_gen: bool = True) -> tuple[Rows, Rows]:
    """[N, 2I] -> (head rows [0, n_und), tail rows) of silu(gate) * up, each e4m3 + scales where asked."""
    if use_triton(x):
        return silu_and_mul_quant_triton(x, n_und, quant_und, quant_gen)
    return silu_and_mul_quant_native(x, n_und, quant_und, quant_gen)
