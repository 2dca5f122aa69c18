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

For FP8 attention (`layers.fp8_attention`) the packing quantises instead: each sequence's queries, keys and
values become e4m3 with one scale per tensor and sequence (`kernels.quant.quantize_tensor_native` over the
sequence's rows), and a row of scales per sequence (`ATTENTION_SCALES`) is written beside them. That takes
two launches: the sequences' maxima first (atomics), then the quantised rows. The outputs then arrive in
e4m3 with one scale per sequence, which the scatter hands on to an FP8 projection as they are (each row's
scale the sequence's) or dequantises for a bf16 one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bagel_serve.layers.kernels import next_power_of_2, use_triton
from bagel_serve.layers.kernels.quant import (FP8_DTYPE, FP8_MAX, Fp8Rows, Rows, block_args, quantize_rows_native,
                                              quantize_tensor_native)

try:
    import triton
    import triton.language as tl

    from bagel_serve.layers.kernels import cast_rne
    from bagel_serve.layers.kernels.quant import quantize_values, row_scale
except ImportError:  # the native path needs neither
    triton = None

ATTENTION_SCALES = ("descale_q", "descale_k", "descale_v", "scale_o", "descale_o", "scale_s", "descale_s")
"""A sequence's scales (`pack_attention_rows_fp8`), each one value cuDNN's FP8 attention takes (a descale
multiplies e4m3 values back into real ones, a scale multiplies real values on their way into e4m3). Q, K and
V: their amax / 448 over the sequence. The output: twice V's descale, since an output row is a convex
combination of value rows (|O| is at most amax(V)) and the factor leaves room for the probabilities'
rounding. The probabilities, in [0, 1]: scaled by 448, the top of e4m3's range."""
SCALE_SLOTS, SCALE_SLOT = 8, 4
"""A sequence's scales are `scales[sequence, j, 0]` of a [sequences, SCALE_SLOTS, SCALE_SLOT] float32 tensor:
each in a 16-byte slot of its own, the alignment cuDNN wants of a tensor's address."""
O_HEADROOM = 2.0
P_SCALE = FP8_MAX
COPY, ROW_QUANT, SCALED_QUANT, DEQUANT, RESCALE = range(5)


class PackedQKV(NamedTuple):
    """A packed forward's queries, keys and values in the packed order, for the QK-norm/RoPE kernel to write
    each row's heads into as it computes them (`kernels.qk_norm_rope`): forward row r's query goes to
    `q[q_dst[r]]`, its key and value to `k[kv_dst[r]]` and `v[kv_dst[r]]`. The cached keys and values are
    `pack_cached_rows`' to add. That is the packing's pass over the queries and the forward's keys saved: the
    kernel holds the rows in registers anyway."""

    q: torch.Tensor  # [queries, Hq, D]
    k: torch.Tensor  # [key rows, Hkv, D]
    v: torch.Tensor  # [key rows, Hkv, D]
    q_dst: torch.Tensor  # int64 [rows]
    kv_dst: torch.Tensor  # int64 [rows]
"""How `_move_row` moves a row (its docstring)."""


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


def pack_cached_rows_native(k_cache: torch.Tensor, v_cache: torch.Tensor, ctx_src: torch.Tensor,
                            ctx_dst: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor) -> None:
    """The definition: cache slot `ctx_src[j]`'s key and value into rows `ctx_dst[j]` of `kp` and `vp`."""
    kp.index_copy_(0, ctx_dst, k_cache.index_select(0, ctx_src))
    vp.index_copy_(0, ctx_dst, v_cache.index_select(0, ctx_src))


def sequence_scales(descale_q: torch.Tensor, descale_k: torch.Tensor, descale_v: torch.Tensor) -> torch.Tensor:
    """One sequence's [SCALE_SLOTS, SCALE_SLOT] scales (`ATTENTION_SCALES`) from its operands' descales
    (shape [1] each): the output's and the probabilities' follow from them."""
    descale_o = descale_v * O_HEADROOM
    one = torch.ones_like(descale_v)
    p_scale = one * P_SCALE
    scales = torch.zeros((SCALE_SLOTS, SCALE_SLOT), dtype=torch.float32, device=descale_v.device)
    scales[: len(ATTENTION_SCALES), 0] = torch.cat([descale_q, descale_k, descale_v, one / descale_o, descale_o,
                                                    p_scale, one / p_scale])
    return scales


def pack_attention_rows_fp8_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                                   v_cache: torch.Tensor, q_rows: torch.Tensor, kv_src: torch.Tensor,
                                   cu_q: torch.Tensor, cu_k: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition: `pack_attention_rows_native`'s rows, each sequence's (`cu_q`, `cu_k`) queries, keys and
    values quantised as one tensor each, and its scales (`ATTENTION_SCALES`, laid out as `SCALE_SLOTS` says).
    Key rows past the last sequence (padding, which no sequence reads) are undefined (zeros here)."""
    qp, kp, vp = pack_attention_rows_native(q, k, v, k_cache, v_cache, q_rows, kv_src)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    scales = torch.zeros((len(bq) - 1, SCALE_SLOTS, SCALE_SLOT), dtype=torch.float32, device=q.device)
    parts: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
    for i, (a, b, c, d) in enumerate(zip(bq, bq[1:], bk, bk[1:])):
        (q8, sq), (k8, sk), (v8, sv) = (quantize_tensor_native(x) for x in (qp[a:b], kp[c:d], vp[c:d]))
        for part, x8 in zip(parts, (q8, k8, v8)):
            part.append(x8)
        scales[i] = sequence_scales(sq, sk, sv)
    pad = kp.shape[0] - bk[-1]
    parts[1].append(torch.zeros((pad, *kp.shape[1:]), dtype=FP8_DTYPE, device=q.device))
    parts[2].append(torch.zeros((pad, *kp.shape[1:]), dtype=FP8_DTYPE, device=q.device))
    return torch.cat(parts[0]), torch.cat(parts[1]), torch.cat(parts[2]), scales


def scatter_split_rows_native(src: torch.Tensor, rows: torch.Tensor, head: Rows, tail: Rows,
                              src_scale: torch.Tensor | None = None) -> None:
    """The definition: output row `rows[j]` (of [head rows | tail rows]) becomes src[j] flattened, as e4m3 with
    its row's scale where that block is `Fp8Rows` (`kernels.quant`). An e4m3 `src` comes with its one scale
    (`src_scale`, shape [1]): an `Fp8Rows` block takes its bytes as they are with that scale for every row, a
    model-dtype block their dequantised values."""
    n_head = head.shape[0]
    flat = src.reshape(src.shape[0], -1)
    if (src.dtype == FP8_DTYPE) != (src_scale is not None):
        raise ValueError("scatter_split_rows takes src_scale exactly when src is e4m3")
    for block, sel, dst in ((head, rows < n_head, rows), (tail, rows >= n_head, rows - n_head)):
        if not bool(sel.any()):
            continue
        values, at = flat[sel], dst[sel]
        if isinstance(block, Fp8Rows):
            if src_scale is None:
                q = quantize_rows_native(values)
            else:
                q = Fp8Rows(values, src_scale.reshape(1, 1).expand(values.shape[0], 1))
            block.data.view(torch.uint8).index_copy_(0, at, q.data.view(torch.uint8))  # no e4m3 index_copy on CPU
            block.scale.index_copy_(0, at, q.scale.contiguous())
        elif src_scale is not None:
            block.index_copy_(0, at, (values.float() * src_scale).to(block.dtype))
        else:
            block.index_copy_(0, at, values)


if triton is not None:

    _COPY, _ROW_QUANT, _SCALED_QUANT = tl.constexpr(COPY), tl.constexpr(ROW_QUANT), tl.constexpr(SCALED_QUANT)
    _DEQUANT, _RESCALE = tl.constexpr(DEQUANT), tl.constexpr(RESCALE)

    @triton.jit
    def _move_row(src, s_head, dst, s_ptr, scale, MODE: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                  BH: tl.constexpr, BD: tl.constexpr):
        """One row of H heads x D, read with head stride `s_head`, written contiguous (the row is in
        registers), by MODE: COPY as is; ROW_QUANT as e4m3 with its own scale, stored at `s_ptr`;
        SCALED_QUANT as e4m3 with the given `scale`; DEQUANT e4m3 times `scale` into dst's dtype; RESCALE the
        e4m3 bytes as they are, `scale` stored at `s_ptr`."""
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, BD)[None, :]
        mask = (h < H) & (d < D)
        x = tl.load(src + h * s_head + d, mask=mask, other=0.0)
        if MODE == _ROW_QUANT:
            xf = x.to(tl.float32)
            rs = row_scale(tl.max(tl.max(tl.abs(xf), axis=1), axis=0))
            tl.store(s_ptr, rs)
            tl.store(dst + h * D + d, quantize_values(xf, rs), mask=mask)
        elif MODE == _SCALED_QUANT:
            tl.store(dst + h * D + d, quantize_values(x.to(tl.float32), scale), mask=mask)
        elif MODE == _DEQUANT:
            tl.store(dst + h * D + d, cast_rne(x.to(tl.float32) * scale, dst.dtype.element_ty), mask=mask)
        else:
            if MODE == _RESCALE:
                tl.store(s_ptr, scale)
            tl.store(dst + h * D + d, x, mask=mask)

    @triton.jit
    def _row_amax(src, s_head, H: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, BD)[None, :]
        x = tl.load(src + h * s_head + d, mask=(h < H) & (d < D), other=0.0).to(tl.float32)
        return tl.max(tl.max(tl.abs(x), axis=1), axis=0)

    @triton.jit
    def _sequence_of(row, cu_ptr, n_seq):
        """The sequence whose range of `cu` holds `row` (a forward has a few sequences: a linear scan)."""
        s = 0
        for i in range(1, n_seq):
            s += (row >= tl.load(cu_ptr + i)).to(tl.int32)
        return s

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
            _move_row(q_ptr + r * sq, sqh, qp_ptr + pid * (HQ * D), q_rows_ptr, 0.0, _COPY, HQ, D, BHQ, BD)
        else:
            j = pid - n_q
            r = tl.load(kv_src_ptr + j)
            if r >= 0:
                _move_row(k_ptr + r * sk, skh, kp_ptr + j * (HKV * D), q_rows_ptr, 0.0, _COPY, HKV, D, BHKV, BD)
                _move_row(v_ptr + r * sv, svh, vp_ptr + j * (HKV * D), q_rows_ptr, 0.0, _COPY, HKV, D, BHKV, BD)
            else:
                _move_row(kc_ptr + (-r - 1) * skc, skch, kp_ptr + j * (HKV * D), q_rows_ptr, 0.0, _COPY, HKV, D, BHKV,
                          BD)
                _move_row(vc_ptr + (-r - 1) * svc, svch, vp_ptr + j * (HKV * D), q_rows_ptr, 0.0, _COPY, HKV, D, BHKV,
                          BD)

    @triton.jit
    def _pack_cached_kernel(kc_ptr, vc_ptr, src_ptr, dst_ptr, kp_ptr, vp_ptr, skc, skch, svc, svch,
                            HKV: tl.constexpr, D: tl.constexpr, BHKV: tl.constexpr, BD: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        s = tl.load(src_ptr + j)
        t = tl.load(dst_ptr + j)
        _move_row(kc_ptr + s * skc, skch, kp_ptr + t * (HKV * D), src_ptr, 0.0, _COPY, HKV, D, BHKV, BD)
        _move_row(vc_ptr + s * svc, svch, vp_ptr + t * (HKV * D), src_ptr, 0.0, _COPY, HKV, D, BHKV, BD)

    @triton.jit
    def _pack_amax_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, q_rows_ptr, kv_src_ptr, cu_q_ptr, cu_k_ptr, amax_ptr,
                          n_q, n_seq, sq, sqh, sk, skh, sv, svh, skc, skch, svc, svch,
                          HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BHQ: tl.constexpr,
                          BHKV: tl.constexpr, BD: tl.constexpr):
        """Each sequence's |Q|, |K|, |V| maxima into amax[sequence, 0:3] (zeros before): one row a program."""
        pid = tl.program_id(0).to(tl.int64)
        if pid < n_q:
            s = _sequence_of(pid, cu_q_ptr, n_seq)
            r = tl.load(q_rows_ptr + pid)
            tl.atomic_max(amax_ptr + s * 4, _row_amax(q_ptr + r * sq, sqh, HQ, D, BHQ, BD))
        else:
            j = pid - n_q
            if j < tl.load(cu_k_ptr + n_seq):
                s = _sequence_of(j, cu_k_ptr, n_seq)
                r = tl.load(kv_src_ptr + j)
                if r >= 0:
                    k_amax = _row_amax(k_ptr + r * sk, skh, HKV, D, BHKV, BD)
                    v_amax = _row_amax(v_ptr + r * sv, svh, HKV, D, BHKV, BD)
                else:
                    k_amax = _row_amax(kc_ptr + (-r - 1) * skc, skch, HKV, D, BHKV, BD)
                    v_amax = _row_amax(vc_ptr + (-r - 1) * svc, svch, HKV, D, BHKV, BD)
                tl.atomic_max(amax_ptr + s * 4 + 1, k_amax)
                tl.atomic_max(amax_ptr + s * 4 + 2, v_amax)

    @triton.jit
    def _pack_quant_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, q_rows_ptr, kv_src_ptr, cu_q_ptr, cu_k_ptr, amax_ptr,
                           qp_ptr, kp_ptr, vp_ptr, scales_ptr, n_q, n_seq, sq, sqh, sk, skh, sv, svh, skc, skch,
                           svc, svch, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BHQ: tl.constexpr,
                           BHKV: tl.constexpr, BD: tl.constexpr, SLOTS: tl.constexpr,
                           SLOT: tl.constexpr):
        """The packed rows in e4m3 with their sequence's scales; each sequence's first query and first key
        program write its scales (`ATTENTION_SCALES`)."""
        pid = tl.program_id(0).to(tl.int64)
        if pid < n_q:
            s = _sequence_of(pid, cu_q_ptr, n_seq)
            scale = row_scale(tl.load(amax_ptr + s * 4))
            r = tl.load(q_rows_ptr + pid)
            _move_row(q_ptr + r * sq, sqh, qp_ptr + pid * (HQ * D), q_rows_ptr, scale, _SCALED_QUANT, HQ, D, BHQ, BD)
            if pid == tl.load(cu_q_ptr + s):
                tl.store(scales_ptr + s * (SLOTS * SLOT), scale)
        else:
            j = pid - n_q
            if j < tl.load(cu_k_ptr + n_seq):
                s = _sequence_of(j, cu_k_ptr, n_seq)
                k_scale = row_scale(tl.load(amax_ptr + s * 4 + 1))
                v_scale = row_scale(tl.load(amax_ptr + s * 4 + 2))
                r = tl.load(kv_src_ptr + j)
                kd, vd = kp_ptr + j * (HKV * D), vp_ptr + j * (HKV * D)
                if r >= 0:
                    _move_row(k_ptr + r * sk, skh, kd, q_rows_ptr, k_scale, _SCALED_QUANT, HKV, D, BHKV, BD)
                    _move_row(v_ptr + r * sv, svh, vd, q_rows_ptr, v_scale, _SCALED_QUANT, HKV, D, BHKV, BD)
                else:
                    _move_row(kc_ptr + (-r - 1) * skc, skch, kd, q_rows_ptr, k_scale, _SCALED_QUANT, HKV, D, BHKV, BD)
                    _move_row(vc_ptr + (-r - 1) * svc, svch, vd, q_rows_ptr, v_scale, _SCALED_QUANT, HKV, D, BHKV, BD)
                if j == tl.load(cu_k_ptr + s):
                    descale_o = v_scale * 2.0
                    row = scales_ptr + s * (SLOTS * SLOT)
                    tl.store(row + SLOT, k_scale)
                    tl.store(row + 2 * SLOT, v_scale)
                    tl.store(row + 3 * SLOT, tl.div_rn(1.0, descale_o))
                    tl.store(row + 4 * SLOT, descale_o)
                    tl.store(row + 5 * SLOT, 448.0)
                    tl.store(row + 6 * SLOT, tl.div_rn(1.0, 448.0))

    @triton.jit
    def _scatter_split_kernel(src_ptr, src_scale_ptr, rows_ptr, head_ptr, head_s_ptr, tail_ptr, tail_s_ptr, n_head,
                              ss, ssh, M_HEAD: tl.constexpr, M_TAIL: tl.constexpr, SRC_SCALED: tl.constexpr,
                              H: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        r = tl.load(rows_ptr + j)
        scale = 0.0
        if SRC_SCALED:
            scale = tl.load(src_scale_ptr)
        if r < n_head:
            _move_row(src_ptr + j * ss, ssh, head_ptr + r * (H * D), head_s_ptr + r, scale, M_HEAD, H, D, BH, BD)
        else:
            t = r - n_head
            _move_row(src_ptr + j * ss, ssh, tail_ptr + t * (H * D), tail_s_ptr + t, scale, M_TAIL, H, D, BH, BD)


def _cached_check(k_cache: torch.Tensor, v_cache: torch.Tensor, ctx_src: torch.Tensor, ctx_dst: torch.Tensor,
                  kp: torch.Tensor, vp: torch.Tensor) -> None:
    if v_cache.shape != k_cache.shape or kp.shape[1:] != k_cache.shape[1:] or vp.shape != kp.shape \
            or ctx_src.shape != ctx_dst.shape or not (kp.is_contiguous() and vp.is_contiguous()):
        raise ValueError(f"pack_cached_rows wants caches [S, Hkv, D], contiguous kp/vp [K, Hkv, D] and equal index "
                         f"lists, got {tuple(k_cache.shape)}, {tuple(kp.shape)}, {tuple(ctx_src.shape)}, "
                         f"{tuple(ctx_dst.shape)}")


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


def pack_cached_rows_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, ctx_src: torch.Tensor,
                            ctx_dst: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor) -> None:
    """`pack_cached_rows_native` in one launch (`kp`, `vp` contiguous [rows, Hkv, D])."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _cached_check(k_cache, v_cache, ctx_src, ctx_dst, kp, vp)
    for x, what in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _unit_dim(x, what)
    if ctx_src.numel():
        hkv, d = k_cache.shape[1], k_cache.shape[2]
        _pack_cached_kernel[(ctx_src.numel(),)](k_cache, v_cache, ctx_src, ctx_dst, kp, vp, *k_cache.stride()[:2],
                                                *v_cache.stride()[:2], HKV=hkv, D=d, BHKV=next_power_of_2(hkv),
                                                BD=next_power_of_2(d), num_warps=4)


def pack_attention_rows_fp8_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                                   v_cache: torch.Tensor, q_rows: torch.Tensor, kv_src: torch.Tensor,
                                   cu_q: torch.Tensor, cu_k: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack_attention_rows_fp8_native` in two launches (the maxima, then the rows), reading `cu_q`/`cu_k`
    (int32) on the device."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(q, k, v, k_cache, v_cache)
    for x, what in ((q, "q"), (k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        _unit_dim(x, what)
    n_q, n_k, n_seq = q_rows.numel(), kv_src.numel(), cu_q.numel() - 1
    qp = torch.empty((n_q, *q.shape[1:]), dtype=FP8_DTYPE, device=q.device)
    kp = torch.empty((n_k, *k.shape[1:]), dtype=FP8_DTYPE, device=k.device)
    vp = torch.empty_like(kp)
    scales = torch.zeros((n_seq, SCALE_SLOTS, SCALE_SLOT), dtype=torch.float32, device=q.device)
    if n_q + n_k and n_seq:
        amax = torch.zeros((n_seq, 4), dtype=torch.float32, device=q.device)
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *k_cache.stride()[:2], *v_cache.stride()[:2])
        shape = dict(HQ=hq, HKV=hkv, D=d, BHQ=next_power_of_2(hq), BHKV=next_power_of_2(hkv), BD=next_power_of_2(d))
        _pack_amax_kernel[(n_q + n_k,)](q, k, v, k_cache, v_cache, q_rows, kv_src, cu_q, cu_k, amax, n_q, n_seq,
                                        *strides, **shape, num_warps=4)
        _pack_quant_kernel[(n_q + n_k,)](q, k, v, k_cache, v_cache, q_rows, kv_src, cu_q, cu_k, amax, qp, kp, vp,
                                         scales, n_q, n_seq, *strides, **shape, SLOTS=SCALE_SLOTS,
                                         SLOT=SCALE_SLOT, num_warps=4)
    return qp, kp, vp, scales


def scatter_split_rows_triton(src: torch.Tensor, rows: torch.Tensor, head: Rows, tail: Rows,
                              src_scale: torch.Tensor | None = None) -> None:
    """`scatter_split_rows_native` in one launch; the blocks are [n, H * D] rows as `empty_rows` makes them."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    width = src.shape[1] * src.shape[2]
    for block in (head, tail):
        data = block.data if isinstance(block, Fp8Rows) else block
        if data.dim() != 2 or data.shape[1] != width or not data.is_contiguous():
            raise ValueError(f"scatter_split_rows wants contiguous [n, {width}] blocks, got {tuple(data.shape)}")
    if (src.dtype == FP8_DTYPE) != (src_scale is not None):
        raise ValueError("scatter_split_rows takes src_scale exactly when src is e4m3")
    _unit_dim(src, "src")
    if rows.numel():
        scaled = src_scale is not None
        (hd, hs, qh), (td, ts, qt) = block_args(head, tail, isinstance(head, Fp8Rows), isinstance(tail, Fp8Rows),
                                                src)
        # Each block's row move (`_move_row` modes): quantise, copy; or, from e4m3, rescale, dequantise.
        mode_head, mode_tail = ((RESCALE if quant else DEQUANT) if scaled else (ROW_QUANT if quant else COPY)
                                for quant in (qh, qt))
        h, d = src.shape[1], src.shape[2]
        _scatter_split_kernel[(rows.numel(),)](src, src_scale if scaled else rows, rows, hd, hs, td, ts,
                                               head.shape[0], *src.stride()[:2], M_HEAD=mode_head, M_TAIL=mode_tail,
                                               SRC_SCALED=scaled, H=h, D=d, BH=next_power_of_2(h),
                                               BD=next_power_of_2(d), num_warps=4)


def pack_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, q_rows: torch.Tensor, kv_src: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed queries, keys, values): q's rows `q_rows`, and the key/value rows `kv_src` names."""
    if use_triton(q, k_cache):
        return pack_attention_rows_triton(q, k, v, k_cache, v_cache, q_rows, kv_src)
    return pack_attention_rows_native(q, k, v, k_cache, v_cache, q_rows, kv_src)


def pack_cached_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, ctx_src: torch.Tensor, ctx_dst: torch.Tensor,
                     kp: torch.Tensor, vp: torch.Tensor) -> None:
    """The cached keys and values of packed sequences into their rows of `kp`, `vp` (`PackedQKV`: the forward's
    own rows are already there)."""
    if use_triton(kp, k_cache):
        pack_cached_rows_triton(k_cache, v_cache, ctx_src, ctx_dst, kp, vp)
    else:
        _cached_check(k_cache, v_cache, ctx_src, ctx_dst, kp, vp)
        pack_cached_rows_native(k_cache, v_cache, ctx_src, ctx_dst, kp, vp)


def pack_attention_rows_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, q_rows: torch.Tensor, kv_src: torch.Tensor, cu_q: torch.Tensor,
                            cu_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed e4m3 queries, keys, values, scales) of the sequences `cu_q`/`cu_k` bound (see
    `pack_attention_rows_fp8_native`)."""
    if use_triton(q, k_cache):
        return pack_attention_rows_fp8_triton(q, k, v, k_cache, v_cache, q_rows, kv_src, cu_q, cu_k)
    return pack_attention_rows_fp8_native(q, k, v, k_cache, v_cache, q_rows, kv_src, cu_q, cu_k)


def scatter_split_rows(src: torch.Tensor, rows: torch.Tensor, head: Rows, tail: Rows,
                       src_scale: torch.Tensor | None = None) -> None:
    """Output row `rows[j]` of [head | tail] becomes src[j], quantised where its block is `Fp8Rows` (one
    block of every row: `tail` empty); an e4m3 `src` comes with its scale (`scatter_split_rows_native`)."""
    if use_triton(src):
        scatter_split_rows_triton(src, rows, head, tail, src_scale)
    else:
        scatter_split_rows_native(src, rows, head, tail, src_scale)
