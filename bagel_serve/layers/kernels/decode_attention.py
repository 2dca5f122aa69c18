"""Paged decode attention: one query token per sequence against its cached keys, split-K over the keys.

Decode attention is a bandwidth problem: every step reads each sequence's whole K/V once. At batch 1
there are only Hkv=4 (sequence, kv head) pairs, far too few programs for 132 SMs, so the keys of each
pair are split over `num_splits` programs (flash-decoding) whose partial softmax states are merged by a
second small kernel. Each program loads a K/V tile once for all the query heads of its kv head (GQA).

CUDA-graph capturable: the grid depends only on shapes and `num_splits`; each program reads its
sequence's length from `context_lens` on the device and takes an equal share of that sequence's keys,
so no host sync is needed and sequences of any length (<= block_tables.shape[1] * block_size) share
one graph. Length-0 sequences (padding rows of a graph) give zeros.

Numerics: scores, softmax and the weighted sum are float32 and only the output is rounded. Score dot
products use exact products with float32 accumulation (tensor cores for bf16/fp16 inputs, IEEE float32
FMAs for float32: no TF32). For bf16 V the float32 probabilities are split into bf16 high and low parts
(p = hi + lo + O(2^-18 p)) so the P@V product can use bf16 tensor cores at ~float32 accuracy; fp16 and
float32 V multiply float32 probabilities in IEEE float32.
"""

from __future__ import annotations

import functools

import torch

from bagel_serve.layers.kernels import INTERPRET, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl

    from bagel_serve.layers.kernels import cast_rne
except ImportError:
    triton = None

LOG2E = 1.4426950408889634
# Two workarounds for Triton 3.6's interpreter (the tests' CPU path), both behind one constexpr so the
# compiled kernel is untouched: it cannot take a `range` whose bounds were loaded from memory (it converts
# a one-element array to int, which NumPy >= 2.4 refuses), so the key loop becomes the equivalent
# `while` (compiled kernels keep the `for`, which Triton software-pipelines); and its `tl.dot` multiplies
# bf16 operands as their raw uint16 bits, so bf16 operands are upcast first (exact: a bf16 product is
# exact in float32, as in the tensor-core MMA, so only the accumulation order differs).


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           context_lens: torch.Tensor, block_size: int) -> None:
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError("q must be [B, Hq, D] and both caches [S, Hkv, D]")
    b, hq, d = q.shape
    if k_cache.shape[2] != d or hq % k_cache.shape[1]:
        raise ValueError(f"head geometry mismatch: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or context_lens.shape != (b,):
        raise ValueError("block_tables must be [B, max_blocks] and context_lens [B]")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")


def paged_decode_attention_native(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """The definition: per sequence, gather its slots and softmax in float32 (`num_splits` is ignored).

    Reads the lengths on the host, so it is neither fast nor graph-capturable; it is the judge, and the exact
    backend's decode. Its arithmetic is the exact backend's attention (KV heads repeated for their query
    heads, scores times `scale`), so that on the CPU a decode step rounds as a prefill of the same rows does.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens, block_size)
    group = q.shape[1] // k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    for i, length in enumerate(context_lens.tolist()):
        if length == 0:
            out[i] = 0
            continue
        r = torch.arange(length, device=q.device)
        slots = block_tables[i, r // block_size].long() * block_size + r % block_size
        k = k_cache[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        qf = q[i].float()[:, None]  # [Hq, 1, D]
        p = torch.softmax(torch.matmul(qf, k.transpose(1, 2)) * scale, dim=-1)  # [Hq, 1, L]
        out[i] = torch.matmul(p, v)[:, 0].to(q.dtype)
    return out


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _tile(q, k_head, v_head, bt_row, n0, end, m_i, l_i, acc, stride_ks, stride_vs, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, QK_IEEE: tl.constexpr,
              PV_MODE: tl.constexpr, INTERPRET: tl.constexpr):
        """One key tile [n0, n0 + BLOCK_N) of the online softmax; keys at or past `end` are masked."""
        d = tl.arange(0, D)
        offs = n0 + tl.arange(0, BLOCK_N)
        kmask = offs < end
        page = tl.load(bt_row + offs // PAGE, mask=kmask, other=0)
        slot = page.to(tl.int64) * PAGE + (offs % PAGE)
        k = tl.load(k_head + slot[:, None] * stride_ks + d[None, :], mask=kmask[:, None], other=0.0)
        s = _dot(q, tl.trans(k), QK_IEEE, INTERPRET)
        s = tl.where(kmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + slot[:, None] * stride_vs + d[None, :], mask=kmask[:, None], other=0.0)
        if PV_MODE == 0:  # float32 probabilities times float32 V, IEEE
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:  # bf16 V: p = hi + lo in bf16, two tensor-core products
            p_hi = cast_rne(p, v.dtype)
            p_lo = cast_rne(p - p_hi.to(tl.float32), v.dtype)
            pv = _dot(p_hi, v, False, INTERPRET) + _dot(p_lo, v, False, INTERPRET)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_bt, stride_ob, stride_oh,
        qk_scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, QK_IEEE: tl.constexpr, PV_MODE: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        b = tl.program_id(0)
        g = tl.program_id(1)
        sp = tl.program_id(2)
        length = tl.load(lens_ptr + b)
        tiles_per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), NUM_SPLITS)
        start = sp * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, length)

        hs = tl.arange(0, BLOCK_G)
        hmask = hs < GROUP
        heads = g * GROUP + hs
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=hmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        k_head = k_ptr + g * stride_kh
        v_head = v_ptr + g * stride_vh
        if INTERPRET:
            n0 = start
            while n0 < end:
                m_i, l_i, acc = _tile(q, k_head, v_head, bt_row, n0, end, m_i, l_i, acc, stride_ks, stride_vs,
                                      qk_scale, D, BLOCK_N, PAGE, QK_IEEE, PV_MODE, INTERPRET)
                n0 += BLOCK_N
        else:
            for n0 in range(start, end, BLOCK_N):
                m_i, l_i, acc = _tile(q, k_head, v_head, bt_row, n0, end, m_i, l_i, acc, stride_ks, stride_vs,
                                      qk_scale, D, BLOCK_N, PAGE, QK_IEEE, PV_MODE, INTERPRET)

        if NUM_SPLITS == 1:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     cast_rne(o, out_ptr.dtype.element_ty), mask=hmask[:, None])
        else:
            # Partials [B, Hq, NUM_SPLITS, (D)]: unnormalised sum, running max (log2 domain), denominator.
            row = (b.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + sp
            tl.store(po_ptr + row[:, None] * D + d[None, :], acc, mask=hmask[:, None])
            tl.store(pm_ptr + row, m_i, mask=hmask)
            tl.store(pl_ptr + row, l_i, mask=hmask)

    @triton.jit
    def _merge_kernel(
        po_ptr, pm_ptr, pl_ptr, out_ptr, HQ, stride_ob, stride_oh,
        D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)  # b * HQ + h
        b = bh // HQ
        h = bh % HQ
        sp = tl.arange(0, BLOCK_S)
        smask = sp < NUM_SPLITS
        d = tl.arange(0, D)
        m = tl.load(pm_ptr + bh * NUM_SPLITS + sp, mask=smask, other=float("-inf"))
        l_s = tl.load(pl_ptr + bh * NUM_SPLITS + sp, mask=smask, other=0.0)
        m_max = tl.max(m, axis=0)
        # Empty splits (and whole empty sequences) carry m = -inf: weight 0, never NaN.
        w = tl.where(m > float("-inf"), tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0)), 0.0)
        o = tl.load(po_ptr + (bh * NUM_SPLITS + sp)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        num = tl.sum(o * w[:, None], axis=0)
        den = tl.sum(l_s * w, axis=0)
        o = num / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, cast_rne(o, out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan_splits(batch: int, num_kv_heads: int, max_keys: int, sms: int = 132) -> int:
    """How many key splits: enough (batch x kv head x split) programs for ~2 per SM, each with >= 128 keys.

    A pure function of shapes, so a captured graph keeps one plan for every length it replays with.
    """
    want = -(-2 * sms // max(1, batch * num_kv_heads))
    return max(1, min(want, -(-max_keys // 128), 64))


def paged_decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q may be a strided view (e.g. into the QKV buffer) as long as its last dim is contiguous."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(q, k_cache, v_cache, block_tables, context_lens, block_size)
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    if d != next_power_of_2(d) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("q and the caches need unit stride along head_dim")
    if out is None:
        out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if out.stride(2) != 1:
        raise ValueError("out needs unit stride along head_dim")
    if b == 0:
        return out
    max_keys = block_tables.shape[1] * block_size
    if num_splits is None:
        sms = _sm_count(q.device.index or 0) if q.is_cuda else 132
        num_splits = plan_splits(b, hkv, max_keys, sms)
    num_splits = max(1, int(num_splits))
    fp32 = q.dtype == torch.float32
    block_n = 32 if fp32 else 64
    if num_splits == 1:
        po = pm = pl = out  # unused
    else:
        po = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
        pm = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
        pl = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    _split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, po, pm, pl,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1), scale * LOG2E,
        GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), D=d, BLOCK_N=block_n, PAGE=block_size,
        NUM_SPLITS=num_splits, QK_IEEE=fp32, PV_MODE=1 if k_cache.dtype == torch.bfloat16 else 0,
        INTERPRET=INTERPRET, num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _merge_kernel[(b * hq,)](
            po, pm, pl, out, hq, out.stride(0), out.stride(1),
            D=d, NUM_SPLITS=num_splits, BLOCK_S=next_power_of_2(num_splits), num_warps=4,
        )
    return out


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """[B, Hq, D] attention of each sequence's one query over its paged context (non-causal, GQA)."""
    if use_triton(q, k_cache):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, block_size,
                                             scale, out, num_splits)
    return paged_decode_attention_native(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                                         out, num_splits)

