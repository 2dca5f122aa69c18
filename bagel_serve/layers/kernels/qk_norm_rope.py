"""QK-norm + RoPE on the merged QKV projection output, in place, with the K/V cache store fused.

After the QKV GEMM every q and k head vector is RMS-normalised with its expert's norm weight and rotated;
k and v then go to the paged cache. Unfused that is ~15 kernels per layer (norms, cos/sin tables, rotate
half, casts, two index stores); here it is one pass over the row.

Numerics: the whole chain is float32 from the loaded value to the final rounding (the reference's
generation-mode precision, used for every row): `y = w * (x * rsqrt(mean(x^2) + eps))` with the
normalised value *not* rounded before the weight multiply, then rotate-half RoPE with float32 angles
`position * inv_freq` and float32 cos/sin, then one rounding to the buffer's dtype.

For a packed attention (`kernels.gather.PackedQKV`) the rows leave in the packed order instead: q, k and v
heads go straight into the packed buffers and `qkv` is left as it was, which saves the packing's read and write
of every query and key (about 1 ms of a guided 1024x1024 step on an H200).
"""

from __future__ import annotations

import torch

from bagel_serve.layers.kernels import next_power_of_2, use_triton
from bagel_serve.layers.kernels.gather import PackedQKV
from bagel_serve.layers.rotary import apply_rope, rope_tables

try:
    import triton
    import triton.language as tl

    from bagel_serve.layers.kernels import cast_rne
except ImportError:
    triton = None


def _check(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, positions: torch.Tensor,
           k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, slot_mapping: torch.Tensor | None,
           packed: PackedQKV | None) -> None:
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"qkv must be [N, {width}], got {tuple(qkv.shape)}")
    if num_heads % num_kv_heads or head_dim % 2:
        raise ValueError("num_heads must be a multiple of num_kv_heads and head_dim even")
    if positions.shape != (qkv.shape[0],):
        raise ValueError("positions must be [N]")
    if slot_mapping is not None:
        if k_cache is None or v_cache is None or slot_mapping.shape != (qkv.shape[0],):
            raise ValueError("slot_mapping [N] needs k_cache and v_cache")
        for c in (k_cache, v_cache):
            if c.dim() != 3 or c.shape[1:] != (num_kv_heads, head_dim) or c.dtype != qkv.dtype:
                raise ValueError(f"caches must be [S, {num_kv_heads}, {head_dim}] {qkv.dtype}")
    if packed is not None:
        n = qkv.shape[0]
        q_shape, kv_shape = (num_heads, head_dim), (num_kv_heads, head_dim)
        if packed.q.shape[1:] != q_shape or packed.k.shape[1:] != kv_shape or packed.v.shape != packed.k.shape \
                or packed.q_dst.shape != (n,) or packed.kv_dst.shape != (n,) \
                or any(t.dtype != qkv.dtype or not t.is_contiguous() for t in packed[:3]):
            raise ValueError(f"packed rows must be contiguous {qkv.dtype} [Q, {num_heads}, {head_dim}] and "
                             f"[K, {num_kv_heads}, {head_dim}] buffers with [{n}] destinations")


def qk_norm_rope_native(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    q_w_und: torch.Tensor, k_w_und: torch.Tensor, q_w_gen: torch.Tensor, k_w_gen: torch.Tensor, n_und: int,
    positions: torch.Tensor, inv_freq: torch.Tensor, eps: float,
    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None, packed: PackedQKV | None = None,
) -> None:
    """The definition, in place or into `packed` (row selection of the slot store uses a boolean mask: not
    graph-capturable)."""
    _check(qkv, num_heads, num_kv_heads, head_dim, positions, k_cache, v_cache, slot_mapping, packed)
    n, hq, hkv, d = qkv.shape[0], num_heads, num_kv_heads, head_dim
    heads = qkv.view(n, hq + 2 * hkv, d)
    x = heads[:, : hq + hkv].float()
    is_und = (torch.arange(n, device=qkv.device) < n_und)[:, None, None]
    w_q = torch.where(is_und, q_w_und.float(), q_w_gen.float())  # [N, 1, D]
    w_k = torch.where(is_und, k_w_und.float(), k_w_gen.float())
    w = torch.cat([w_q.expand(n, hq, d), w_k.expand(n, hkv, d)], dim=1)
    y = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    cos, sin = rope_tables(positions, inv_freq.float())
    new = apply_rope(y, cos, sin).to(qkv.dtype)
    v = heads[:, hq + hkv:]
    if slot_mapping is not None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        k_cache[slots] = new[keep, hq:]
        v_cache[slots] = v[keep]
    if packed is None:
        heads[:, : hq + hkv] = new
        return
    packed.q.index_copy_(0, packed.q_dst, new[:, :hq])
    packed.k.index_copy_(0, packed.kv_dst, new[:, hq:])
    packed.v.index_copy_(0, packed.kv_dst, v)


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(
        qkv_ptr, pos_ptr, inv_ptr, qwu_ptr, kwu_ptr, qwg_ptr, kwg_ptr,
        slot_ptr, kc_ptr, vc_ptr, qp_ptr, kp_ptr, vp_ptr, qdst_ptr, kvdst_ptr,
        n_und, stride_row, stride_kc_s, stride_kc_h, stride_vc_s, stride_vc_h, eps,
        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
        BLOCK_HEADS: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr, STORE: tl.constexpr,
        PACKED: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = qkv_ptr + row * stride_row
        heads = tl.arange(0, BLOCK_HEADS)  # q heads then k heads: [0, HQ + HKV)
        cols = tl.arange(0, BLOCK_HALF)
        hmask = heads < HQ + HKV
        cmask = cols < HALF
        mask = hmask[:, None] & cmask[None, :]
        lo = base + heads[:, None] * (2 * HALF) + cols[None, :]
        x1 = tl.load(lo, mask=mask, other=0.0)
        x2 = tl.load(lo + HALF, mask=mask, other=0.0)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF) + eps)[:, None]
        # Each row's expert picks its weights; q heads take the q weight, k heads the k weight.
        if row < n_und:
            qw1 = tl.load(qwu_ptr + cols, mask=cmask, other=0.0)
            qw2 = tl.load(qwu_ptr + HALF + cols, mask=cmask, other=0.0)
            kw1 = tl.load(kwu_ptr + cols, mask=cmask, other=0.0)
            kw2 = tl.load(kwu_ptr + HALF + cols, mask=cmask, other=0.0)
        else:
            qw1 = tl.load(qwg_ptr + cols, mask=cmask, other=0.0)
            qw2 = tl.load(qwg_ptr + HALF + cols, mask=cmask, other=0.0)
            kw1 = tl.load(kwg_ptr + cols, mask=cmask, other=0.0)
            kw2 = tl.load(kwg_ptr + HALF + cols, mask=cmask, other=0.0)
        is_q = (heads < HQ)[:, None]
        w1 = tl.where(is_q, qw1.to(tl.float32)[None, :], kw1.to(tl.float32)[None, :])
        w2 = tl.where(is_q, qw2.to(tl.float32)[None, :], kw2.to(tl.float32)[None, :])
        y1 = w1 * (f1 * rstd)
        y2 = w2 * (f2 * rstd)
        angle = tl.load(pos_ptr + row).to(tl.float32) * tl.load(inv_ptr + cols, mask=cmask, other=0.0)
        c = tl.cos(angle)[None, :]
        s = tl.sin(angle)[None, :]
        o1 = cast_rne(y1 * c - y2 * s, x1.dtype)
        o2 = cast_rne(y2 * c + y1 * s, x1.dtype)
        vh = tl.arange(0, BLOCK_KV)
        vmask = (vh < HKV)[:, None] & cmask[None, :]
        vsrc = base + (HQ + HKV + vh[:, None]) * (2 * HALF) + cols[None, :]
        if PACKED:
            # q heads to the query's packed row, k heads (tile rows HQ on) and the v heads to its key row.
            qmask = mask & is_q
            kvrow = tl.load(kvdst_ptr + row)
            qdst = qp_ptr + tl.load(qdst_ptr + row) * (HQ * 2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
            kdst = kp_ptr + kvrow * (HKV * 2 * HALF) + (heads - HQ)[:, None] * (2 * HALF) + cols[None, :]
            tl.store(qdst, o1, mask=qmask)
            tl.store(qdst + HALF, o2, mask=qmask)
            kmask = mask & (heads >= HQ)[:, None]
            tl.store(kdst, o1, mask=kmask)
            tl.store(kdst + HALF, o2, mask=kmask)
            vdst = vp_ptr + kvrow * (HKV * 2 * HALF) + vh[:, None] * (2 * HALF) + cols[None, :]
            tl.store(vdst, tl.load(vsrc, mask=vmask), mask=vmask)
            tl.store(vdst + HALF, tl.load(vsrc + HALF, mask=vmask), mask=vmask)
        else:
            tl.store(lo, o1, mask=mask)
            tl.store(lo + HALF, o2, mask=mask)
        if STORE:
            slot = tl.load(slot_ptr + row)
            if slot >= 0:
                # k heads are rows [HQ, HQ + HKV) of the tile just computed; v heads are copied unchanged.
                kh = heads - HQ
                kmask = mask & (heads >= HQ)[:, None]
                kdst = kc_ptr + slot * stride_kc_s + kh[:, None] * stride_kc_h + cols[None, :]
                tl.store(kdst, o1, mask=kmask)
                tl.store(kdst + HALF, o2, mask=kmask)
                vdst = vc_ptr + slot * stride_vc_s + vh[:, None] * stride_vc_h + cols[None, :]
                tl.store(vdst, tl.load(vsrc, mask=vmask), mask=vmask)
                tl.store(vdst + HALF, tl.load(vsrc + HALF, mask=vmask), mask=vmask)


def qk_norm_rope_triton(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    q_w_und: torch.Tensor, k_w_und: torch.Tensor, q_w_gen: torch.Tensor, k_w_gen: torch.Tensor, n_und: int,
    positions: torch.Tensor, inv_freq: torch.Tensor, eps: float,
    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None, packed: PackedQKV | None = None,
) -> None:
    """One program per row holds all q and k heads (28+4 heads x 128 = 4096 values), split in rotate halves.

    Slot -1 rows are skipped inside the kernel, so the call is CUDA-graph capturable.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(qkv, num_heads, num_kv_heads, head_dim, positions, k_cache, v_cache, slot_mapping, packed)
    if qkv.stride(1) != 1:
        raise ValueError("qkv must have unit stride along its columns")
    n = qkv.shape[0]
    if n == 0:
        return
    if not 0 <= n_und <= n:
        raise ValueError(f"n_und={n_und} outside [0, {n}]")
    store = slot_mapping is not None
    if store:
        for c in (k_cache, v_cache):
            if c.stride(2) != 1:
                raise ValueError("caches need unit stride along head_dim")
    half = head_dim // 2
    kc = k_cache if store else qkv
    vc = v_cache if store else qkv
    # Unused pointers take any tensor of the right kind: the kernel never reads them.
    dst = packed if packed is not None else (qkv, qkv, qkv, positions, positions)
    _qk_norm_rope_kernel[(n,)](
        qkv, positions, inv_freq, q_w_und, k_w_und, q_w_gen, k_w_gen,
        slot_mapping if store else positions, kc, vc, *dst,
        n_und, qkv.stride(0),
        kc.stride(0) if store else 0, kc.stride(1) if store else 0,
        vc.stride(0) if store else 0, vc.stride(1) if store else 0, eps,
        HQ=num_heads, HKV=num_kv_heads, HALF=half,
        BLOCK_HEADS=next_power_of_2(num_heads + num_kv_heads), BLOCK_KV=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(half), STORE=store, PACKED=packed is not None, num_warps=4,
    )


def qk_norm_rope_(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    q_w_und: torch.Tensor, k_w_und: torch.Tensor, q_w_gen: torch.Tensor, k_w_gen: torch.Tensor, n_und: int,
    positions: torch.Tensor, inv_freq: torch.Tensor, eps: float,
    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None, packed: PackedQKV | None = None,
) -> None:
    """In place on `qkv`, or into `packed` (q, k and v heads in the packed order, `qkv` unchanged); with
    `slot_mapping`, also stores k and v rows into the caches (slot -1: skipped)."""
    fn = qk_norm_rope_triton if use_triton(qkv, k_cache) else qk_norm_rope_native
    fn(qkv, num_heads, num_kv_heads, head_dim, q_w_und, k_w_und, q_w_gen, k_w_gen, n_und,
       positions, inv_freq, eps, k_cache, v_cache, slot_mapping, packed)
