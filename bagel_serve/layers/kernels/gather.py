"""Row moves around a large image's attention: every sequence's queries and keys packed in one launch, each
sequence's outputs back to their rows in one launch.

A denoising forward's sequence is its boundary rows (among the understanding rows) and its latents (among the
generation rows); its keys are its cached context, then those rows. Packed by per-segment copies and an
index select that is about ten small kernels per sequence and layer (5.8 ms of a guided 1024x1024 FP8 step
on an H200 at burst clocks, for about 2.3 ms of bytes); here it is one launch per layer for the packing and
one per sequence for the outputs (1.9 ms). Pure moves: every path gives the same bytes. The outputs may
leave quantised (`scatter_split_rows`) for an FP8 output projection: the row is in registers anyway, and the
standalone quantiser's pass over them goes away.

`kv_src` says where each packed key row comes from: a forward row `r >= 0` of `k`/`v`, or the cache slot
`-r - 1` of `k_cache`/`v_cache`.
"""

from __future__ import annotations

import torch

from bagel_serve.layers.kernels import next_power_of_2, use_triton
from bagel_serve.layers.kernels.quant import Fp8Rows, Rows, block_args, quantize_rows_native

try:
    import triton
    import triton.language as tl

    from bagel_serve.layers.kernels.quant import quantize_values, row_scale
except ImportError:  # the native path needs neither
    triton = None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k_cache.shape[1:] != k.shape[1:] \
            or v_cache.shape != k_cache.shape or q.shape[0] != k.shape[0]:
        raise ValueError(f"pack_attention_rows wants q [N, Hq, D], k/v [N, Hkv, D] and caches [S, Hkv, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(k_cache.shape)}")


def pack_attention_rows_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, q_rows: torch.Tensor, kv_src: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition: (q[q_rows], keys, values) with key row j from `kv_src[j]` (see the module docstring)."""
    _check(q, k, v, k_cache, v_cache)
    new = kv_src >= 0
    slots = torch.where(new, 0, -kv_src - 1)
    rows = torch.where(new, kv_src, 0)
    pick = new[:, None, None]
    return (q.index_select(0, q_rows), torch.where(pick, k.index_select(0, rows), k_cache.index_select(0, slots)),
            torch.where(pick, v.index_select(0, rows), v_cache.index_select(0, slots)))


def scatter_split_rows_native(src: torch.Tensor, rows: torch.Tensor, head: Rows, tail: Rows) -> None:
    """The definition: output row `rows[j]` (of [head rows | tail rows]) becomes src[j] flattened, as e4m3 with
    its row's scale where that block is `Fp8Rows` (`kernels.quant`)."""
    n_head = head.shape[0]
    flat = src.reshape(src.shape[0], -1)
    for block, sel, dst in ((head, rows < n_head, rows), (tail, rows >= n_head, rows - n_head)):
        if not bool(sel.any()):
            continue
        values, at = flat[sel], dst[sel]
        if isinstance(block, Fp8Rows):
            q = quantize_rows_native(values)
            block.data.view(torch.uint8).index_copy_(0, at, q.data.view(torch.uint8))  # no e4m3 index_copy on CPU
            block.scale.index_copy_(0, at, q.scale)
        else:
            block.index_copy_(0, at, values)


if triton is not None:

    @triton.jit
    def _move_row(src, s_head, dst, s_ptr, QUANT: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                  BH: tl.constexpr, BD: tl.constexpr):
        """One row of H heads x D, read with head stride `s_head`, written contiguous: as is, or as e4m3 with
        its scale at `s_ptr` (the row is in registers)."""
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, BD)[None, :]
        mask = (h < H) & (d < D)
        x = tl.load(src + h * s_head + d, mask=mask, other=0.0)
        if QUANT:
            xf = x.to(tl.float32)
            scale = row_scale(tl.max(tl.max(tl.abs(xf), axis=1), axis=0))
            tl.store(s_ptr, scale)
            tl.store(dst + h * D + d, quantize_values(xf, scale), mask=mask)
        else:
            tl.store(dst + h * D + d, x, mask=mask)

    @triton.jit
    def _pack_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, q_rows_ptr, kv_src_ptr, qp_ptr, kp_ptr, vp_ptr, n_q,
                     sq, sqh, sk, skh, sv, svh, skc, skch, svc, svch,
                     HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BHQ: tl.constexpr,
                     BHKV: tl.constexpr, BD: tl.constexpr):
        """Programs [0, n_q) copy one query row each, the rest one key row and its value row (plain moves: the
        scale pointer `_move_row` takes is never written, any pointer serves)."""
        pid = tl.program_id(0).to(tl.int64)
        if pid < n_q:
            r = tl.load(q_rows_ptr + pid)
            _move_row(q_ptr + r * sq, sqh, qp_ptr + pid * (HQ * D), q_rows_ptr, False, HQ, D, BHQ, BD)
        else:
            j = pid - n_q
            r = tl.load(kv_src_ptr + j)
            if r >= 0:
                _move_row(k_ptr + r * sk, skh, kp_ptr + j * (HKV * D), q_rows_ptr, False, HKV, D, BHKV, BD)
                _move_row(v_ptr + r * sv, svh, vp_ptr + j * (HKV * D), q_rows_ptr, False, HKV, D, BHKV, BD)
            else:
                _move_row(kc_ptr + (-r - 1) * skc, skch, kp_ptr + j * (HKV * D), q_rows_ptr, False, HKV, D, BHKV, BD)
                _move_row(vc_ptr + (-r - 1) * svc, svch, vp_ptr + j * (HKV * D), q_rows_ptr, False, HKV, D, BHKV, BD)

    @triton.jit
    def _scatter_split_kernel(src_ptr, rows_ptr, head_ptr, head_s_ptr, tail_ptr, tail_s_ptr, n_head, ss, ssh,
                              Q_HEAD: tl.constexpr, Q_TAIL: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                              BH: tl.constexpr, BD: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        r = tl.load(rows_ptr + j)
        if r < n_head:
            _move_row(src_ptr + j * ss, ssh, head_ptr + r * (H * D), head_s_ptr + r, Q_HEAD, H, D, BH, BD)
        else:
            t = r - n_head
            _move_row(src_ptr + j * ss, ssh, tail_ptr + t * (H * D), tail_s_ptr + t, Q_TAIL, H, D, BH, BD)


def _unit_dim(x: torch.Tensor, what: str) -> None:
    """The kernels read a head's D values as one run (any row and head strides)."""
    if x.stride(2) != 1:
        raise ValueError(f"{what} needs unit stride along the head dimension, got strides {x.stride()}")


def pack_attention_rows_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, q_rows: torch.Tensor, kv_src: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack_attention_rows_native` in one launch (q, k, v may be row-strided views of a merged QKV output)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(q, k, v, k_cache, v_cache)
    for x, what in ((q, "q"), (k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        _unit_dim(x, what)
    n_q, n_k = q_rows.numel(), kv_src.numel()
    qp = torch.empty((n_q, *q.shape[1:]), dtype=q.dtype, device=q.device)
    kp = torch.empty((n_k, *k.shape[1:]), dtype=k.dtype, device=k.device)
    vp = torch.empty_like(kp)
    if n_q + n_k:
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        _pack_kernel[(n_q + n_k,)](q, k, v, k_cache, v_cache, q_rows, kv_src, qp, kp, vp, n_q, *q.stride()[:2],
                                   *k.stride()[:2], *v.stride()[:2], *k_cache.stride()[:2], *v_cache.stride()[:2],
                                   HQ=hq, HKV=hkv, D=d, BHQ=next_power_of_2(hq), BHKV=next_power_of_2(hkv),
                                   BD=next_power_of_2(d), num_warps=4)
    return qp, kp, vp


def scatter_split_rows_triton(src: torch.Tensor, rows: torch.Tensor, head: Rows, tail: Rows) -> None:
    """`scatter_split_rows_native` in one launch; the blocks are [n, H * D] rows as `empty_rows` makes them."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    width = src.shape[1] * src.shape[2]
    for block in (head, tail):
        data = block.data if isinstance(block, Fp8Rows) else block
        if data.dim() != 2 or data.shape[1] != width or not data.is_contiguous():
            raise ValueError(f"scatter_split_rows wants contiguous [n, {width}] blocks, got {tuple(data.shape)}")
    _unit_dim(src, "src")
    if rows.numel():
        (hd, hs, qh), (td, ts, qt) = block_args(head, tail, isinstance(head, Fp8Rows), isinstance(tail, Fp8Rows),
                                                src)
        h, d = src.shape[1], src.shape[2]
        _scatter_split_kernel[(rows.numel(),)](src, rows, hd, hs, td, ts, head.shape[0], *src.stride()[:2],
                                               Q_HEAD=qh, Q_TAIL=qt, H=h, D=d, BH=next_power_of_2(h),
                                               BD=next_power_of_2(d), num_warps=4)


def pack_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, q_rows: torch.Tensor, kv_src: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed queries, keys, values): q's rows `q_rows`, and the key/value rows `kv_src` names."""
    if use_triton(q, k_cache):
        return pack_attention_rows_triton(q, k, v, k_cache, v_cache, q_rows, kv_src)
    return pack_attention_rows_native(q, k, v, k_cache, v_cache, q_rows, kv_src)


def scatter_split_rows(src: torch.Tensor, rows: torch.Tensor, head: Rows, tail: Rows) -> None:
    """Output row `rows[j]` of [head | tail] becomes src[j], quantised where its block is `Fp8Rows` (one
    block of every row: `tail` empty)."""
    if use_triton(src):
        scatter_split_rows_triton(src, rows, head, tail)
    else:
        scatter_split_rows_native(src, rows, head, tail)
