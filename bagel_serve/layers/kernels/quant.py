"""Dynamic per-row FP8 (e4m3) quantisation of activations and weights.

The format every FP8 path here shares (W8A8, `torch.float8_e4m3fn`):
    scale[r] = max(amax(|x[r, :]|) / 448, 2**-126)          (float32, one per row)
    q[r, c]  = e4m3(clamp(x[r, c] / scale[r], -448, 448))   (round to nearest even)
so `q.float() * scale` approximates `x` within half an e4m3 ulp of each element (relative 2**-4 for normal
values). The floor 2**-126 (the smallest normal float32) makes a zero row quantise to zeros with a finite
scale, and keeps the division away from float32 subnormals, which GPUs may flush to zero; every row whose
amax is at least 448 * 2**-126 (all rows a model produces) gets exactly amax / 448. Divisions are IEEE
round-to-nearest in every path (`tl.div_rn` in the kernels), so the native twin and the kernel agree on
every byte and every scale.

This module has the standalone quantiser (the attention output feeding o_proj, and the weights at load),
`Fp8Rows` (the value an FP8 linear consumes) and the Triton helpers the fused producers (RMSNorm,
SiLU-and-mul) share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagel_serve.layers.kernels import INTERPRET, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the native path needs neither
    triton = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""The largest finite e4m3fn value."""
SCALE_FLOOR = 2.0**-126
"""The smallest scale a row gets (the smallest normal float32): a zero row's scale."""


@dataclass(frozen=True)
class Fp8Rows:
    """Rows quantised to e4m3 with one float32 scale per row: `data` [M, K], `scale` [M, 1].

    Row slicing gives views (`rows[a:b]`), so the MoT pair can hand each expert its range without copies."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, rows: slice) -> "Fp8Rows":
        if not isinstance(rows, slice):
            raise TypeError("Fp8Rows are sliced by row ranges only")
        return Fp8Rows(self.data[rows], self.scale[rows])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`data * scale` in float32, then `dtype` (for references and the CPU emulation)."""
        return (self.data.float() * self.scale).to(dtype)


Rows = torch.Tensor | Fp8Rows
"""A block of a producer's output rows: in the input dtype, or e4m3 with a scale per row."""


def empty_fp8_rows(rows: int, cols: int, device: torch.device) -> Fp8Rows:
    return Fp8Rows(torch.empty((rows, cols), dtype=FP8_DTYPE, device=device),
                   torch.empty((rows, 1), dtype=torch.float32, device=device))


def empty_rows(n: int, cols: int, like: torch.Tensor, quant: bool) -> torch.Tensor | Fp8Rows:
    """An output block of a fused producer: [n, cols] in `like`'s dtype, or e4m3 rows with scales."""
    if quant:
        return empty_fp8_rows(n, cols, like.device)
    return torch.empty((n, cols), dtype=like.dtype, device=like.device)


BlockArgs = tuple[torch.Tensor, torch.Tensor, bool]


def block_args(head: torch.Tensor | Fp8Rows, tail: torch.Tensor | Fp8Rows, quant_head: bool, quant_tail: bool,
               any_tensor: torch.Tensor) -> tuple[BlockArgs, BlockArgs]:
    """(data, scale, quantised) kernel arguments of a fused producer's two row blocks (head rows [0, n),
    tail rows [n, N)). An empty block is never written, so it takes the other block's arguments (an empty
    CUDA tensor has no address Triton accepts, and equal flags keep the never-run stores well typed); an
    unquantised block's scale pointer is any valid one (`any_tensor`), never dereferenced."""

    def parts(rows: torch.Tensor | Fp8Rows, quant: bool) -> BlockArgs:
        return (rows.data, rows.scale, True) if quant else (rows, any_tensor, False)

    h, t = parts(head, quant_head), parts(tail, quant_tail)
    if head.shape[0] == 0:
        h = t
    if tail.shape[0] == 0:
        t = h
    return h, t


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"quantize_rows wants [M, K] rows, got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"quantize_rows wants a float tensor of the model dtype, got {x.dtype}")


def quantize_rows_native(x: torch.Tensor) -> Fp8Rows:
    """The definition (see the module docstring), in float32 torch ops."""
    _check(x)
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True) if x.shape[1] else xf.new_zeros((x.shape[0], 1))
    # A tensor divisor, not a Python number: on CUDA torch turns division by a number into a multiply by its
    # reciprocal, which is off by an ulp for some amax (and then a whole row's bytes differ).
    scale = torch.clamp_min(amax / amax.new_tensor(FP8_MAX), SCALE_FLOOR)
    return Fp8Rows((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale)


def quantize_tensor_native(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole of `x` as e4m3 with one float32 scale (shape [1]): the row definition above with the tensor
    as its row (FP8 attention's operands, which cuDNN takes with one scale each)."""
    xf = x.float()
    amax = xf.abs().amax().reshape(1) if x.numel() else xf.new_zeros(1)
    scale = torch.clamp_min(amax / amax.new_tensor(FP8_MAX), SCALE_FLOOR)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


if triton is not None:
    _INTERPRET = tl.constexpr(INTERPRET)

    @triton.jit
    def cast_e4m3(x):
        """float32 values in [-448, 448] -> e4m3fn, round to nearest even.

        Compiled kernels convert with `cvt.rn.satfinite.e4m3x2.f32` (what `.to` emits on sm_89+). Triton
        3.6's interpreter rounds half away from zero and mishandles subnormals, so there the bits are made
        here: normal values round their 23-bit mantissa to 3 bits (add 0x7FFFF plus the lowest kept bit,
        shift, rebias the exponent 127 -> 7); values under 2**-6 are multiples of 2**-9, rounded to an
        integer count of them by the float add of 2**23 (IEEE round to nearest even)."""
        if _INTERPRET:
            bits = x.to(tl.uint32, bitcast=True)
            sign = (bits >> 31).to(tl.uint8) << 7
            a = tl.abs(x)
            abits = a.to(tl.uint32, bitcast=True)
            normal = ((abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20) - (120 << 3)
            sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
            code = tl.where(a < 0.015625, sub, normal).to(tl.uint8)
            return (code | sign).to(tl.float8e4nv, bitcast=True)
        else:
            return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")

    @triton.jit
    def row_scale(amax):
        """The row's scale from its float32 amax (see the module docstring)."""
        return tl.maximum(tl.div_rn(amax, 448.0), 1.1754943508222875e-38)

    @triton.jit
    def quantize_values(v, scale):
        """float32 values of one row -> e4m3 with the row's scale."""
        return cast_e4m3(tl.minimum(tl.maximum(tl.div_rn(v, scale), -448.0), 448.0))

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, stride_s, K: tl.constexpr,
                              BLOCK: tl.constexpr):
        """One program per row. A row that fits one block is read once and kept in registers; a wider one
        takes two passes over its columns (amax, then quantise), the second reading from L2. The row width is
        a compile-time constant (a model has a few), which also lets the interpreter run the column loops."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        if K <= BLOCK:
            mask = cols < K
            v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            scale = row_scale(tl.max(tl.abs(v), axis=0))
            tl.store(s_ptr + row * stride_s, scale)
            tl.store(q_ptr + row * stride_q + cols, quantize_values(v, scale), mask=mask)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, K, BLOCK):
                mask = start + cols < K
                v = tl.load(x_ptr + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            scale = row_scale(tl.max(amax, axis=0))
            tl.store(s_ptr + row * stride_s, scale)
            for start in range(0, K, BLOCK):
                mask = start + cols < K
                v = tl.load(x_ptr + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(q_ptr + row * stride_q + start + cols, quantize_values(v, scale), mask=mask)


LAUNCH = {"max_block": 4096, "elements_per_thread": 16}
"""Launch shape of the standalone quantiser: the widest column block, and elements per thread (which sets
the warps). Module-level so `benchmarks/bench_fp8.py --sweep` can try others."""


def quantize_rows_triton(x: torch.Tensor, out: Fp8Rows | None = None) -> Fp8Rows:
    """`quantize_rows_native` as one kernel launch; `out` may be given (preallocated [M, K] / [M, 1])."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(x)
    if x.stride(1) != 1:
        raise ValueError("quantize_rows_triton needs unit stride along K")
    m, k = x.shape
    if out is None:
        out = empty_fp8_rows(m, k, x.device)
    if m == 0:
        return out
    block = min(LAUNCH["max_block"], max(16, triton.next_power_of_2(k)))
    warps = min(32, max(1, block // (32 * LAUNCH["elements_per_thread"])))
    _quantize_rows_kernel[(m,)](x, out.data, out.scale, x.stride(0), out.data.stride(0), out.scale.stride(0),
                                K=k, BLOCK=block, num_warps=warps)
    return out


def quantize_rows(x: torch.Tensor) -> Fp8Rows:
    """[M, K] float rows -> e4m3 rows with a float32 scale per row."""
    if use_triton(x):
        return quantize_rows_triton(x)
    return quantize_rows_native(x)
