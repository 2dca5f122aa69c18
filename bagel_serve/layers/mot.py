"""The mixture-of-transformers expert pair: both experts' GEMMs on their contiguous row ranges.

A forward's rows [0, n_und) belong to the understanding expert and the rest to the generation expert
(`forward_context`). Each expert multiplies only its rows, writing into one output buffer — no gather,
no concatenation — and a row-parallel pair reduces that buffer once over the tensor-parallel ranks.

The rows may arrive as a tensor or as `SplitRows` (each expert's block in the form its linear wants, e.g.
e4m3 for an FP8 layer, `layers.fp8`); both slice by row range into views.
"""

from __future__ import annotations

import torch
from torch import nn

from bagel_serve.distributed.parallel_state import tp_all_reduce
from bagel_serve.layers.fp8 import SplitRows
from bagel_serve.layers.kernels.activation import silu_and_mul, silu_and_mul_quant
from bagel_serve.layers.kernels.quant import Fp8Rows
from bagel_serve.layers.linear import LinearBase

MLP_CHUNK_ROWS = 8192
"""Rows per MLP chunk, about: bounds the gate-up activation (rows x 2 x intermediate) of large forwards, where
GEMMs of this many rows already run at full rate. A forward is cut into about equal chunks: two CFG branches of
a 1024x1024 image are 8,196 rows, and 8,192 + 4 would read the generation expert's MLP weights once more for
four rows (about 2.8 ms a step on an H200)."""
CHUNK_ALIGN = 128
"""Chunk bounds fall on multiples of this many rows of their expert: GEMM tiles are 128 rows, and 4,098 rows
(half of 8,196) would run 33 tiles where 4,096 run 32 (the FP8 GEMMs measured 8-12 % slower on an H200)."""


def chunk_bounds(n: int, n_und: int, chunk: int, align: int) -> list[int]:
    """Row bounds [0, ..., n] of about equal chunks of at most about `chunk` rows; each inner bound is moved to
    the nearest multiple of `align` rows from the start of its expert's range (0 for the understanding rows,
    `n_und` for the generation rows), so the chunks' GEMMs run whole tiles."""
    chunks = -(-n // chunk)
    bounds = [0]
    for i in range(1, chunks):
        b = n * i // chunks
        base = 0 if b <= n_und else n_und
        b = base + (b - base + align // 2) // align * align
        if bounds[-1] < b < n:
            bounds.append(b)
    return bounds + [n]

Rows = torch.Tensor | Fp8Rows | SplitRows
"""A forward's rows (or a row range of them): a tensor, e4m3 rows, or both experts' blocks."""


def expert_linear(x: Rows, n_und: int, und: LinearBase, gen: LinearBase, reduce: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Both experts' rows of one projection; into `out` ([rows, features], e.g. a chunk's rows of a larger
    buffer) when given."""
    n = x.shape[0]
    if n_und >= n:
        out = und(x[:n], out=out)
    elif n_und <= 0:
        out = gen(x[:n], out=out)
    else:
        if out is None:
            out = torch.empty((n, und.output_size_per_partition), dtype=und.output_dtype, device=x.device)
        und(x[:n_und], out=out[:n_und])
        gen(x[n_und:], out=out[n_und:])
    return tp_all_reduce(out) if reduce else out


def expert_silu_and_mul(x: torch.Tensor, n_und: int, und: LinearBase, gen: LinearBase) -> Rows:
    """silu(gate) * up of the merged gate-up output, its rows in the form the down projections (`und`,
    `gen`) want: e4m3 straight out of the kernel for an FP8 one."""
    if not (und.wants_fp8_input or gen.wants_fp8_input):
        return silu_and_mul(x)
    n = min(max(n_und, 0), x.shape[0])
    return SplitRows(*silu_and_mul_quant(x, n, und.wants_fp8_input, gen.wants_fp8_input))


def expert_mlp(x: Rows, n_und: int, und: nn.Module, gen: nn.Module) -> torch.Tensor:
    """SwiGLU MLP of both experts (modules with `gate_up_proj` and `down_proj`), in row chunks."""
    n = x.shape[0]
    if n <= MLP_CHUNK_ROWS:
        h = expert_silu_and_mul(expert_linear(x, n_und, und.gate_up_proj, gen.gate_up_proj), n_und,
                                und.down_proj, gen.down_proj)
        return expert_linear(h, n_und, und.down_proj, gen.down_proj, reduce=True)
    out = torch.empty((n, und.down_proj.output_size_per_partition), dtype=und.down_proj.output_dtype,
                      device=x.device)
    bounds = chunk_bounds(n, n_und, MLP_CHUNK_ROWS, CHUNK_ALIGN)
    for a, b in zip(bounds, bounds[1:]):
        h = expert_silu_and_mul(expert_linear(x[a:b], n_und - a, und.gate_up_proj, gen.gate_up_proj), n_und - a,
                                und.down_proj, gen.down_proj)
        expert_linear(h, n_und - a, und.down_proj, gen.down_proj, out=out[a:b])
    return tp_all_reduce(out)
