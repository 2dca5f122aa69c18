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

try:
    import triton
    import triton.language as tl

    from bagel_serve.layers.kernels import cast_rne
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
