"""Linear layers of a few rows — decode steps — at the card's memory bandwidth: `x [M, K] @ w[N, K].T (+ bias)`.

With M <= 64 rows a projection is a stream of its weight: the rows are nothing beside it. cuBLAS runs the
decode shapes well below the bandwidth on an H200 (measured at M = 1: merged QKV 3584x4608 45 %, O
3584x3584 37 %, down 18944x3584 65 %, gate-up 3584x37888 77 % of the copy rate) because so few output tiles
leave most of the card idle. Here each program streams a [BLOCK_N, K-slice] band of the weight once; when N
alone gives too few programs, K is split and a second kernel sums the float32 partials (and adds the bias).
Accumulation is float32 as in cuBLAS; the sum order differs, so results match to rounding, not bits. Only
half-precision weights take this path (float32 keeps cuBLAS, whose numbers the parity suite holds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel_serve.layers.kernels import INTERPRET, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl

    from bagel_serve.layers.kernels import cast_rne
except ImportError:
    triton = None

MAX_ROWS = 64
"""Rows above this are a GEMM proper: cuBLAS."""
MAX_OUTPUT_FEATURES = 65536
"""Wider outputs (the LM head) already give cuBLAS enough tiles."""
_TARGET_PROGRAMS = 4 * 132  # a few waves of an H200's 132 SMs


def small_linear_native(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """The definition (what cuBLAS computes), writing into `out` when given."""
    if out is None:
        return F.linear(x, w, bias)
    if bias is not None:
        return torch.addmm(bias, x, w.t(), out=out)
    return torch.mm(x, w.t(), out=out)


if triton is not None:

    @triton.jit
    def _band_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                     K_PER: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        k0 = pid_k * K_PER
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, K_PER, BLOCK_K):  # a constant trip count: pipelined, and the interpreter runs it
            k = k0 + kk + offs_k
            k_ok = k < K
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if INTERP:  # Triton 3.6's interpreter multiplies half-precision bits in tl.dot: upcast there
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        mask = m_ok[:, None] & n_ok[None, :]
        if DIRECT:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            dst = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            tl.store(dst, cast_rne(acc, out_ptr.dtype.element_ty), mask=mask)
        else:
            dst = part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
            tl.store(dst, acc, mask=mask)

    @triton.jit
    def _reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, stride_om, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
        m = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLITS):
            acc += tl.load(part_ptr + (s * M + m).to(tl.int64) * N + cols, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m.to(tl.int64) * stride_om + cols, cast_rne(acc, out_ptr.dtype.element_ty), mask=ok)


def plan(m: int, n: int, k: int, block_n: int = 64, block_k: int = 128) -> tuple[int, int]:
    """(splits of K, K elements per split): enough programs for a few waves, at least four K tiles each."""
    programs = -(-n // block_n)
    splits = max(1, min(-(-_TARGET_PROGRAMS // programs), k // (4 * block_k)))
    per = -(-k // splits)
    per = -(-per // block_k) * block_k
    return -(-k // per), per


def small_linear_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, *, block_n: int = 64, block_k: int = 128,
                        splits: int | None = None, num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed")
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_ROWS or w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"small_linear takes at most {MAX_ROWS} contiguous rows of [M, K] and a [N, K] weight, "
                         f"got x {tuple(x.shape)} w {tuple(w.shape)}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if splits is None:
        splits, per = plan(m, n, k, block_n, block_k)
    else:
        per = -(-(-(-k // splits)) // block_k) * block_k
        splits = -(-k // per)
    block_m = max(16, next_power_of_2(m))
    direct = splits == 1
    part = out if direct else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    b = bias if bias is not None else out
    _band_kernel[(triton.cdiv(n, block_n), splits)](
        x, w, b, out, part, m, n, k, x.stride(0), w.stride(0), out.stride(0), K_PER=per,
        HAS_BIAS=bias is not None, DIRECT=direct, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        INTERP=INTERPRET, num_warps=num_warps, num_stages=num_stages)
    if not direct:
        block = 1024
        _reduce_kernel[(m, triton.cdiv(n, block))](part, b, out, m, n, out.stride(0), SPLITS=splits,
                                                    HAS_BIAS=bias is not None, BLOCK=block)
    return out


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a projection takes the streaming kernel: few rows, a half-precision weight that is not too
    wide, on CUDA with Triton."""
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and w.shape[0] <= MAX_OUTPUT_FEATURES
            and w.dtype in (torch.bfloat16, torch.float16) and x.stride(1) == 1 and use_triton(x, w))


def small_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    if applies(x, w):
        return small_linear_triton(x, w, bias, out)
    return small_linear_native(x, w, bias, out)
