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

from bagel_serve.layers.kernels import use_triton
from bagel_serve.layers.kernels.quant import Fp8Rows, block_args, empty_rows, quantize_rows_native

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

Rows = torch.Tensor | Fp8Rows
"""A block of output rows: in the input dtype, or e4m3 with a scale per row."""


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
    def _silu_mul_row(x_row, out_row, s_ptr, I: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        if QUANT and I <= BLOCK:
            # The row in registers: one read.
            y, mask = _silu_mul_block(x_row, 0, cols, I)
            yf = y.to(tl.float32)
            scale = row_scale(tl.max(tl.abs(yf), axis=0))
            tl.store(s_ptr, scale)
            tl.store(out_row + cols, quantize_values(yf, scale), mask=mask)
        elif QUANT:
            # Two passes: the row's amax, then the quantised values (the second reads the row again).
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
            for start in range(0, I, BLOCK):
                y, mask = _silu_mul_block(x_row, start, cols, I)
                tl.store(out_row + start + cols, y, mask=mask)

    @triton.jit
    def _silu_and_mul_quant_kernel(x_ptr, head_ptr, head_s_ptr, tail_ptr, tail_s_ptr, n_und,
                                   stride_x, stride_h, stride_t, I: tl.constexpr, BLOCK: tl.constexpr,
                                   Q_HEAD: tl.constexpr, Q_TAIL: tl.constexpr):
        """One program per row (its amax must be known before any value is cast); rows [0, n_und) go to
        the head buffer, the rest to the tail buffer, each in the input dtype or as e4m3 + scale."""
        row = tl.program_id(0).to(tl.int64)
        if row < n_und:
            _silu_mul_row(x_ptr + row * stride_x, head_ptr + row * stride_h, head_s_ptr + row, I, BLOCK, Q_HEAD)
        else:
            r = row - n_und
            _silu_mul_row(x_ptr + row * stride_x, tail_ptr + r * stride_t, tail_s_ptr + r, I, BLOCK, Q_TAIL)


QUANT_LAUNCH = {"max_block": 4096, "elements_per_thread": 8}
"""Launch shape of the fused SiLU-and-mul quantiser: the widest column block (a row no wider is read once,
from registers; a wider one twice, the second time mostly from HBM again at the MLP's 18,944 columns) and
elements per thread (which sets the warps). 4096 x 8 (16 warps) was the best shape tried at 8,196 rows on
an H200 (`benchmarks/bench_fp8.py --sweep`, 2026-12-02): 2.02 TB/s of the bytes it must move, 4 % over
2048 x 16; a fixed grid looping over rows (to keep the second pass in L2) and a backwards second pass were
slower or no better. Module-level so that sweep can try others."""


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
    block = min(QUANT_LAUNCH["max_block"], triton.next_power_of_2(i))
    warps = min(32, max(1, block // (32 * QUANT_LAUNCH["elements_per_thread"])))
    _silu_and_mul_quant_kernel[(n_rows,)](
        x, hd, hs, td, ts, n, x.stride(0), hd.stride(0), td.stride(0), I=i, BLOCK=block,
        Q_HEAD=qh, Q_TAIL=qt, num_warps=warps,
    )
    return head, tail


def silu_and_mul_quant(x: torch.Tensor, n_und: int, quant_und: bool = False,
                       quant_gen: bool = True) -> tuple[Rows, Rows]:
    """[N, 2I] -> (head rows [0, n_und), tail rows) of silu(gate) * up, each e4m3 + scales where asked."""
    if use_triton(x):
        return silu_and_mul_quant_triton(x, n_und, quant_und, quant_gen)
    return silu_and_mul_quant_native(x, n_und, quant_und, quant_gen)
