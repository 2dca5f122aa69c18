"""The fused Triton kernels against their native twins, and the twins against float64 formulas.

On a machine without a GPU the `*_triton` functions run under Triton's interpreter (conftest sets
`TRITON_INTERPRET=1`); on a GPU machine the same tests run the compiled kernels on CUDA tensors.

Tolerances (u = 2^-24, the float32 unit roundoff; "ulp" = the spacing of the output dtype at the native
value). Triton and native differ only in how rsqrt/exp/cos/sin are implemented and in reduction order,
so every bound is a float32 rounding-error bound computed from the actual data:
- rms_norm: relative 2(ceil(log2 H) + 8)u per element (sum of squares in any order, rsqrt, two products,
  on each side). The residual sum is one IEEE add on both sides: equal bit for bit.
- qk_norm_rope_: 2(ceil(log2 D) + 8)u + 8u (cos/sin within 2 ulp, each side), relative to
  |y_j| + |y_(j +- D/2)|, the magnitudes the rotation mixes (an absolute bound: the sum may cancel).
- paged_decode_attention: per (sequence, head), with s the scaled scores and m their max,
  ds = 2(D + 2)u scale max_r sum_i |q_i k_ri| + 2u max_r |s_r - m|  (worst-case dot-product error, exp2 argument),
  dp = 2 ds + 4u (relative error of each probability), bound = (2 dp + 2(ceil(log2 L) + 2)u [+ 2^-16 for
  bf16 V, whose probabilities are split into two bf16 parts]) * sum_r p_r |v_r|.
- silu_and_mul: relative (16 + 4|g|)u (exp's argument is rounded, so its error grows with |g|).
- conv2d (float32 only): (K + 2)u + 2^-19 relative to sum |x||w| + |bias| + |residual| (K = C kh kw terms in
  any order; tf32x3 drops each product's tail-times-tail term and rounds the tails, < 2^-19 of the product).
  A second case is exact: integer inputs whose sums stay below 2^24 and whose weights fit TF32's 11 bits, so
  only a kernel that keeps the inputs' low bits (not plain TF32) returns the integers.
- bf16/fp16 outputs: a single final rounding (qk_norm_rope_, attention) gives <= 1 ulp plus the float32
  bound; an intermediate rounding followed by a product (rms_norm's normalised value times the weight,
  silu(g) times u) can flip one ulp before the product, worth <= 2 ulp of the output, plus the two final
  roundings: <= 3.5 ulp. Flips need the float32 values to straddle a rounding boundary, so at most 1% of
  the elements may differ at all (a wrong rounding point or a dropped term fails this).
Outputs are poisoned with NaN (caches with random values) before each run, and every element is checked.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from bagel_serve.layers.kernels import DISABLE_ENV, power_of_2_parts, triton_available, use_triton
from bagel_serve.layers.kernels.conv import conv2d, conv2d_native, conv2d_triton, uses_kernel
from bagel_serve.layers.kernels.activation import silu_and_mul, silu_and_mul_native, silu_and_mul_triton
from bagel_serve.layers.kernels.gather import (
    PackedQKV,
    pack_attention_rows_fp8_native,
    pack_attention_rows_fp8_triton,
    pack_attention_rows_native,
    pack_attention_rows_triton,
    pack_cached_rows_native,
    pack_cached_rows_triton,
    scatter_split_rows_native,
    scatter_split_rows_triton,
)
from bagel_serve.layers.kernels.decode_attention import (
    paged_decode_attention,
    paged_decode_attention_native,
    paged_decode_attention_triton,
    plan_splits,
)
from bagel_serve.layers.kernels.qk_norm_rope import qk_norm_rope_, qk_norm_rope_native, qk_norm_rope_triton
from bagel_serve.layers.kernels.rms_norm import rms_norm, rms_norm_native, rms_norm_triton

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

U = 2.0**-24
DTYPES = [torch.float32, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_MIN_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


def seeded(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters (crc32: stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (float64), the subnormal spacing near zero."""
    _, e = torch.frexp(x.double().abs())
    e = torch.clamp(e - 1, min=_MIN_EXP[dtype])
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - _MANT[dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tol: torch.Tensor | float,
                 k_ulp: float, what: str) -> None:
    """|actual - expected| <= tol (float32 error bound) + k_ulp ulps (low precision only), every element."""
    assert actual.shape == expected.shape, what
    a, e = actual.double().cpu(), expected.double().cpu()
    assert not torch.isnan(a).any(), f"{what}: {int(torch.isnan(a).sum())} elements left unwritten (NaN poison)"
    tol = torch.as_tensor(tol, dtype=torch.float64).cpu()
    bound = tol + (k_ulp * ulp(e, dtype) if dtype != torch.float32 else 0.0)
    err = (a - e).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements out of bound; worst "
                             f"{a.flatten()[i].item()} vs {e.flatten()[i].item()} "
                             f"(bound {bound.flatten()[i].item():.3g})")
    if dtype != torch.float32:
        frac = (a != e).double().mean().item()
        assert frac <= 0.01, f"{what}: {frac:.2%} of the elements differ (expected rare one-ulp flips)"


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


# ----------------------------------------------------------------------------------------------------------
# dispatch


def test_dispatch_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(2)
    assert not use_triton(cpu), "CPU tensors always take the native path"
    assert not use_triton(cpu, None)
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        assert use_triton(gpu, None)
        assert not use_triton(gpu, cpu)
        monkeypatch.setenv(DISABLE_ENV, "1")
        assert not use_triton(gpu)
        monkeypatch.setenv(DISABLE_ENV, "0")
        assert use_triton(gpu)


@pytest.mark.parametrize("n", [1, 3, 96, 2100, 2101, 3584, 18944, 29568, 32768])
def test_power_of_2_parts_cover_a_row(n: int) -> None:
    parts = power_of_2_parts(n)
    used = [p for p in parts if p]
    assert len(parts) == 4 and all(p & (p - 1) == 0 for p in used) and used == sorted(used, reverse=True)
    assert parts[len(used):] == (0,) * (4 - len(used))
    assert n <= sum(used) < n + used[-1], "the padding is less than the last part"
    if bin(n).count("1") <= 4:
        assert sum(used) == n, "a row of at most four set bits is covered exactly"
    assert power_of_2_parts(18944) == (16384, 2048, 512, 0)
    with pytest.raises(ValueError, match="n >= 1"):
        power_of_2_parts(0)


def test_dispatchers_on_cpu_are_the_native_twins() -> None:
    if DEVICE != "cpu":
        pytest.skip("CPU dispatch only")
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    x, w, r = randn(g, 3, 64, dtype=bf), randn(g, 64, dtype=bf), randn(g, 3, 64, dtype=bf)
    r1, r2 = r.clone(), r.clone()
    assert torch.equal(rms_norm(x, w, residual=r1)[0], rms_norm_native(x, w, residual=r2)[0])
    assert torch.equal(r1, r2)
    gu = randn(g, 3, 80, dtype=bf)
    assert torch.equal(silu_and_mul(gu), silu_and_mul_native(gu))
    qkv = randn(g, 2, 8 * 16, dtype=bf)
    ws = [randn(g, 16, dtype=bf) for _ in range(4)]
    pos, inv = torch.tensor([3, 9]), torch.rand(8, generator=g)
    a, b = qkv.clone(), qkv.clone()
    qk_norm_rope_(a, 4, 2, 16, *ws, 1, pos, inv, 1e-6)
    qk_norm_rope_native(b, 4, 2, 16, *ws, 1, pos, inv, 1e-6)
    assert torch.equal(a, b)
    q, kc, vc, tables, ctx = paged_case(g, bf, 4, 2, 16, 16, [20, 0])
    assert torch.equal(paged_decode_attention(q, kc, vc, tables, ctx, 16, 0.25),
                       paged_decode_attention_native(q, kc, vc, tables, ctx, 16, 0.25))


# ----------------------------------------------------------------------------------------------------------
# rms_norm


def rms_norm_f64(x, w_und, w_gen, n_und, eps, residual):
    dt = x.dtype
    s = (x.double() + residual.double()).to(dt) if residual is not None else x
    sd = s.double()
    h = (sd / torch.sqrt((sd * sd).mean(-1, keepdim=True) + eps)).to(dt).double()
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    w = w_und.double() if w_gen is None else torch.where(rows < n_und, w_und.double(), w_gen.double())
    return (h * w).to(dt), s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100, 3584])
@pytest.mark.parametrize("n_und", ["mixed", 0, "all", "no_gen"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, hidden, n_und, with_residual) -> None:
    g = seeded(str(dtype), hidden, str(n_und), with_residual)
    n = 7
    x = randn(g, n, hidden, dtype=dtype, scale=3.0)
    x[1] *= 1e-3  # a row whose mean square is comparable to eps, so eps matters
    w_und, w_gen = randn(g, hidden, dtype=dtype), randn(g, hidden, dtype=dtype)
    if n_und == "no_gen":
        w_gen, nu = None, None
    else:
        nu = {"mixed": 3, 0: 0, "all": n}[n_und]
    res = randn(g, n, hidden, dtype=dtype) if with_residual else None
    if res is not None:
        res[1] *= 1e-3
    rtol = 2 * (math.ceil(math.log2(hidden)) + 8) * U

    r_nat = res.clone() if with_residual else None
    out_nat, ro_nat = rms_norm_native(x, w_und, w_gen, nu, 1e-6, r_nat)
    r_tri = res.clone() if with_residual else None
    out_tri, ro_tri = rms_norm_triton(x, w_und, w_gen, nu, 1e-6, r_tri, out=nan_like(x))
    ref, s_ref = rms_norm_f64(x, w_und, w_gen, nu if nu is not None else n, 1e-6, res)

    assert_close(out_tri, out_nat, dtype, rtol * out_nat.double().abs(), 3.5, "triton vs native")
    assert_close(out_nat, ref, dtype, rtol * ref.double().abs(), 3.5, "native vs float64")
    if with_residual:
        assert ro_tri is r_tri and ro_nat is r_nat, "the residual is updated in place"
        assert torch.equal(r_tri, r_nat) and torch.equal(r_nat, s_ref), "rounded residual sum"
    else:
        assert ro_tri is None and ro_nat is None


# ----------------------------------------------------------------------------------------------------------
# qk_norm_rope_


def qk_norm_rope_f64(qkv, hq, hkv, d, ws, n_und, positions, inv_freq, eps):
    """(new q and k heads in qkv's dtype, float64 magnitudes |y_j| + |y_(j+-D/2)| the rotation mixes)."""
    n = qkv.shape[0]
    x = qkv.view(n, hq + 2 * hkv, d)[:, : hq + hkv].double()
    q_u, k_u, q_g, k_g = (w.double() for w in ws)
    und = (torch.arange(n, device=qkv.device) < n_und)[:, None, None]
    w = torch.cat([torch.where(und, q_u, q_g).expand(n, hq, d), torch.where(und, k_u, k_g).expand(n, hkv, d)], 1)
    y = w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))
    angle = (positions.double()[:, None] * inv_freq.double()[None]).float().double()  # f32 product, exact rounding
    angle = torch.cat([angle, angle], -1)[:, None]
    rot = torch.cat([-y[..., d // 2:], y[..., : d // 2]], -1)
    return (y * angle.cos() + rot * angle.sin()).to(qkv.dtype), y.abs() + rot.abs()


GEOMETRIES = [(4, 2, 16), (7, 1, 16), (4, 2, 128), (7, 1, 128), (28, 4, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("n_und", ["mixed", 0, "all"])
@pytest.mark.parametrize("store", [False, True])
def test_qk_norm_rope(dtype, geometry, n_und, store) -> None:
    hq, hkv, d = geometry
    g = seeded(str(dtype), geometry, str(n_und), store)
    n, slots_total = 6, 13
    nu = {"mixed": 2, 0: 0, "all": n}[n_und]
    qkv = randn(g, n, (hq + 2 * hkv) * d, dtype=dtype, scale=2.0)
    qkv[2] *= 1e-3  # head vectors whose mean square is comparable to eps, so eps matters
    ws = [randn(g, d, dtype=dtype) for _ in range(4)]
    positions = torch.tensor([0, 1, 37, 4097, 31000, 40000], dtype=torch.int64, device=DEVICE)
    inv_freq = (1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))).to(DEVICE)
    caches = [randn(g, slots_total, hkv, d, dtype=dtype) for _ in range(2)]
    slots = torch.tensor([5, -1, 0, 12, -1, 7], dtype=torch.int64, device=DEVICE) if store else None

    nat, tri = qkv.clone(), qkv.clone()
    kc_n, vc_n = (c.clone() for c in caches) if store else (None, None)
    kc_t, vc_t = (c.clone() for c in caches) if store else (None, None)
    qk_norm_rope_native(nat, hq, hkv, d, *ws, nu, positions, inv_freq, 1e-6, kc_n, vc_n, slots)
    qk_norm_rope_triton(tri, hq, hkv, d, *ws, nu, positions, inv_freq, 1e-6, kc_t, vc_t, slots)
    ref, mag = qk_norm_rope_f64(qkv, hq, hkv, d, ws, nu, positions, inv_freq, 1e-6)

    tol = (2 * (math.ceil(math.log2(d)) + 8) * U + 8 * U) * mag
    heads = lambda t: t.view(n, hq + 2 * hkv, d)  # noqa: E731
    assert_close(heads(tri)[:, : hq + hkv], heads(nat)[:, : hq + hkv], dtype, tol, 1, "triton vs native")
    assert_close(heads(nat)[:, : hq + hkv], ref, dtype, tol, 1, "native vs float64")
    assert torch.equal(heads(tri)[:, hq + hkv:], heads(qkv)[:, hq + hkv:]), "v heads are left unchanged"
    assert torch.equal(heads(nat)[:, hq + hkv:], heads(qkv)[:, hq + hkv:])
    if store:
        keep = (slots >= 0).cpu()
        written = torch.zeros(slots_total, dtype=torch.bool)
        written[slots.cpu()[keep]] = True
        for kc, vc, new in ((kc_n, vc_n, nat), (kc_t, vc_t, tri)):
            assert torch.equal(kc.cpu()[~written], caches[0].cpu()[~written]), "slot -1 rows must not be stored"
            assert torch.equal(vc.cpu()[~written], caches[1].cpu()[~written])
            # The cache holds exactly the final (rotated, rounded) k and the unchanged v of each stored row.
            assert torch.equal(kc.cpu()[slots.cpu()[keep]], heads(new).cpu()[keep, hq: hq + hkv])
            assert torch.equal(vc.cpu()[slots.cpu()[keep]], heads(qkv).cpu()[keep, hq + hkv:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [(4, 2, 16), (28, 4, 128)])
@pytest.mark.parametrize("store", [False, True])
def test_qk_norm_rope_into_packed_rows(dtype, geometry, store) -> None:
    """Written into the packed order, each row's q, k and v heads are the bytes the in-place form leaves in
    `qkv` and the packing then moves (each form against itself: the two kernels' cos/sin differ in the last
    ulp), the rows the cached keys will fill are left alone, `qkv` is not touched, and the cache store is
    the same."""
    from bagel_serve.layers.attention_backends import PackedAttention, pack_sequences

    hq, hkv, d = geometry
    g = seeded("packed", str(dtype), geometry, store)
    n = 8
    qkv = randn(g, n, (hq + 2 * hkv) * d, dtype=dtype, scale=2.0)
    ws = [randn(g, d, dtype=dtype) for _ in range(4)]
    positions = torch.tensor([0, 1, 5, 5, 5, 9, 9, 9], dtype=torch.int64, device=DEVICE)
    inv_freq = (1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))).to(DEVICE)
    caches = [randn(g, 9, hkv, d, dtype=dtype) for _ in range(2)]
    slots = torch.tensor([3, -1, 0, 8, -1, 7, 1, -1], dtype=torch.int64, device=DEVICE) if store else None
    # Two sequences, two boundary rows each among the first four rows; the first has three cached keys.
    f = pack_sequences([torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])], [torch.tensor([4, 2, 6]), None])
    p = PackedAttention(**{a: b.to(DEVICE) if isinstance(b, torch.Tensor) else b for a, b in f.items()})
    for fn in (qk_norm_rope_native, qk_norm_rope_triton):
        in_place, into = qkv.clone(), qkv.clone()
        cache_a, cache_b = [c.clone() for c in caches], [c.clone() for c in caches]
        fn(in_place, hq, hkv, d, *ws, 4, positions, inv_freq, 1e-6, *(cache_a if store else (None, None)), slots)
        view = lambda t, a, b: t[:, a * d : b * d].view(n, b - a, d)  # noqa: E731
        want = pack_attention_rows_native(view(in_place, 0, hq), view(in_place, hq, hq + hkv),
                                          view(in_place, hq + hkv, hq + 2 * hkv), caches[0], caches[1], p.q_rows,
                                          p.kv_src)
        rows = PackedQKV(nan_like(want[0]), nan_like(want[1]), nan_like(want[2]), p.inv_rows, p.kv_rows)
        fn(into, hq, hkv, d, *ws, 4, positions, inv_freq, 1e-6, *(cache_b if store else (None, None)), slots, rows)
        assert torch.equal(into, qkv), f"{fn.__name__}: qkv must be left as it was"
        assert torch.equal(rows.q, want[0]), fn.__name__
        new = p.new_dst
        for got, ref in ((rows.k, want[1]), (rows.v, want[2])):
            assert torch.equal(got[new], ref[new]), fn.__name__
            others = torch.ones(got.shape[0], dtype=torch.bool, device=DEVICE)
            others[new] = False
            assert torch.isnan(got[others]).all(), "rows for the cached keys are pack_cached_rows' to fill"
        for a, b in zip(cache_a, cache_b, strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="packed rows must be contiguous"):
        qk_norm_rope_native(qkv.clone(), hq, hkv, d, *ws, 4, positions, inv_freq, 1e-6, None, None, None,
                            rows._replace(q=rows.q.transpose(0, 1)))


def test_pack_cached_rows() -> None:
    """The cached keys and values land in the rows the tables name, padding included (slot 0 into the unread
    last row), and no other row is touched."""
    g = seeded("cached")
    hkv, d = 2, 16
    caches = [randn(g, 12, hkv, d, dtype=torch.bfloat16) for _ in range(2)]
    src = torch.tensor([5, 11, 0, 0, 0], dtype=torch.int64, device=DEVICE)
    dst = torch.tensor([0, 1, 6, 9, 9], dtype=torch.int64, device=DEVICE)
    outs = []
    for fn in (pack_cached_rows_native, pack_cached_rows_triton):
        kp, vp = nan_like(caches[0][:10]), nan_like(caches[1][:10])
        fn(caches[0], caches[1], src, dst, kp, vp)
        outs.append((kp, vp))
    (kn, vn), (kt, vt) = outs
    assert torch.equal(kn.nan_to_num(7.0), kt.nan_to_num(7.0)) and torch.equal(vn.nan_to_num(7.0), vt.nan_to_num(7.0))
    assert torch.equal(kn[dst], caches[0][src]) and torch.equal(vn[dst], caches[1][src])
    assert torch.isnan(kn[[2, 3, 4, 5, 7, 8]]).all()
    with pytest.raises(ValueError, match="pack_cached_rows wants"):
        pack_cached_rows_triton(caches[0], caches[1], src, dst[:2], kp, vp)


# ----------------------------------------------------------------------------------------------------------
# paged_decode_attention


def attention_f64(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, bf16_split):
    """(output in q's dtype, float64 per-element error bound of a float32 implementation)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    tol = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        length = int(context_lens[i])
        if length == 0:
            continue
        slots = [int(block_tables[i, r // block_size]) * block_size + r % block_size for r in range(length)]
        for h in range(hq):
            qh = q[i, h].double().cpu()
            k = k_cache[slots, h // (hq // hkv)].double().cpu()
            v = v_cache[slots, h // (hq // hkv)].double().cpu()
            s = (k @ qh) * scale
            p = torch.exp(s - s.max())
            out[i, h] = (p[:, None] * v).sum(0) / p.sum()
            ds = 2 * (d + 2) * U * scale * (k.abs() @ qh.abs()).max() + 2 * U * (s.max() - s).max()
            dp = 2 * ds + 4 * U
            rel = 2 * dp + 2 * (math.ceil(math.log2(length)) + 2) * U + (2.0**-16 if bf16_split else 0.0)
            tol[i, h] = rel * (p[:, None] * v.abs()).sum(0) / p.sum()
    return out.to(q.dtype), tol


def paged_case(g, dtype, hq, hkv, d, block_size, lens, extra_blocks=3):
    """Caches with blocks handed out out of order, a block shared by two sequences, and a strided q."""
    b = len(lens)
    max_blocks = max(1, max(-(-n // block_size) for n in lens))
    num_blocks = b * max_blocks + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[: b * max_blocks].view(b, max_blocks).clone()
    if b > 2:
        tables[2, 0] = tables[0, 0]  # a shared prefix block
    k_cache = randn(g, num_blocks * block_size, hkv, d, dtype=dtype)
    v_cache = randn(g, num_blocks * block_size, hkv, d, dtype=dtype)
    qkv = randn(g, b, (hq + 2 * hkv) * d, dtype=dtype, scale=2.0)
    q = qkv[:, : hq * d].view(b, hq, d)  # strided rows, as a view into the QKV buffer
    return (q, k_cache, v_cache, tables.to(torch.int32).to(DEVICE),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE))


ATTN_CASES = [
    # (hq, hkv, d, block_size, context lengths, num_splits)
    (4, 2, 16, 16, [37, 0, 16, 5], None),
    (4, 2, 16, 16, [37, 0, 16, 5], 1),
    (4, 2, 16, 32, [100, 1, 64, 33], 3),
    (7, 1, 16, 16, [75, 200, 0], 7),
    (4, 2, 128, 16, [300, 17, 48], 2),
    (7, 1, 128, 128, [129, 0, 250, 1], 4),
    (28, 4, 128, 64, [90, 250], 5),
    (4, 2, 16, 16, [0, 0], 3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"h{c[0]}-{c[1]}_d{c[2]}_bs{c[3]}_s{c[5]}")
def test_paged_decode_attention(dtype, case) -> None:
    hq, hkv, d, block_size, lens, splits = case
    g = seeded(str(dtype), str(case))
    q, kc, vc, tables, ctx = paged_case(g, dtype, hq, hkv, d, block_size, lens)
    scale = 1.0 / math.sqrt(d)
    nat = paged_decode_attention_native(q, kc, vc, tables, ctx, block_size, scale)
    out = torch.full((len(lens), hq, d), float("nan"), dtype=dtype, device=DEVICE)
    tri = paged_decode_attention_triton(q, kc, vc, tables, ctx, block_size, scale, out=out, num_splits=splits)
    assert tri is out
    ref, tol = attention_f64(q, kc, vc, tables, ctx, block_size, scale, dtype == torch.bfloat16)
    assert_close(tri, nat, dtype, tol, 1, "triton vs native")
    assert_close(nat, ref, dtype, tol, 1, "native vs float64")
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(tri[i].cpu(), torch.zeros(hq, d, dtype=dtype)), "an empty context gives zeros"


def test_plan_splits_fill_the_gpu() -> None:
    # batch 1: many splits; a big batch already has enough programs; never more splits than 128-key chunks.
    assert plan_splits(1, 4, 304) == 3
    assert plan_splits(1, 4, 4096) == 32
    assert plan_splits(64, 4, 768) == 2
    assert plan_splits(256, 4, 1024) == 1
    assert plan_splits(1, 4, 32768) == 64
    for b in (1, 2, 8, 64, 256):
        for keys in (16, 300, 4096, 32768):
            s = plan_splits(b, 4, keys)
            assert 1 <= s <= max(1, -(-keys // 128)) and s <= 64


# ----------------------------------------------------------------------------------------------------------
# silu_and_mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [40, 1500])
def test_silu_and_mul(dtype, inter) -> None:
    g = seeded(str(dtype), inter)
    x = randn(g, 5, 2 * inter, dtype=dtype, scale=4.0)
    nat = silu_and_mul_native(x)
    tri = silu_and_mul_triton(x, out=torch.full((5, inter), float("nan"), dtype=dtype, device=DEVICE))
    gd, ud = x[:, :inter].double(), x[:, inter:].double()
    ref = ((gd / (1 + torch.exp(-gd))).to(dtype).double() * ud).to(dtype)
    tol = (16 + 4 * gd.abs()) * U * ref.double().abs()
    assert_close(tri, nat, dtype, tol, 3.5, "triton vs native")
    assert_close(nat, ref, dtype, tol, 3.5, "native vs float64")


# ----------------------------------------------------------------------------------------------------------
# gather: attention rows packed and scattered


def test_pack_attention_rows_and_scatter_them_back() -> None:
    """The packing kernel moves exactly the rows its tables name: queries from row-strided views of a merged
    QKV output, keys and values from the forward's rows or the cache; the scatter puts each output row back,
    from outputs of either head layout, and touches no other row."""
    from bagel_serve.layers.attention_backends import pack_sequences, packed_keys, PackedAttention

    g = seeded("gather")
    hq, hkv, d, n = 6, 2, 16, 20
    qkv = randn(g, n, (hq + 2 * hkv) * d, dtype=torch.bfloat16)
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
    k_cache, v_cache = randn(g, 30, hkv, d, dtype=torch.bfloat16), randn(g, 30, hkv, d, dtype=torch.bfloat16)
    q_rows = [torch.tensor([0, 1, *range(4, 12)]), torch.tensor([2, 3, *range(12, 20)])]
    f = pack_sequences(q_rows, [torch.tensor([7, 3, 29]), None])
    p = PackedAttention(**{a: b.to(DEVICE) if isinstance(b, torch.Tensor) else b for a, b in f.items()})
    assert p.host_cu_q == (0, 10, 20) and p.host_cu_k == (0, 13, 23)
    assert p.kv_src.tolist()[:4] == [-8, -4, -30, 0] and p.kv_src[-1] == -1
    nat = pack_attention_rows_native(q, k, v, k_cache, v_cache, p.q_rows, p.kv_src)
    tri = pack_attention_rows_triton(q, k, v, k_cache, v_cache, p.q_rows, p.kv_src)
    kp, vp = packed_keys(k, v, p, k_cache, v_cache)
    for a, b in zip(nat, tri, strict=True):
        assert torch.equal(a, b) and a.is_contiguous() and b.is_contiguous()
    assert torch.equal(nat[0], q[p.q_rows]) and torch.equal(nat[1][:-1], kp[:-1]) and torch.equal(nat[2][:-1], vp[:-1])
    o = randn(g, 10, hq, d, dtype=torch.bfloat16)
    for src in (o, o.transpose(0, 1).contiguous().transpose(0, 1)):  # rows of heads, or heads of rows
        want, got = nan_like(q.contiguous()).view(n, -1), nan_like(q.contiguous()).view(n, -1)
        scatter_split_rows_native(src, p.q_rows[10:], want, want[n:])  # one block of every row
        scatter_split_rows_triton(src, p.q_rows[10:], got, got[n:])
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
        assert torch.isnan(got[[0, 1, *range(4, 12)]]).all() and torch.equal(got[p.q_rows[10:]], src.reshape(10, -1))
    with pytest.raises(ValueError, match="unit stride along the head dimension"):
        pack_attention_rows_triton(q.transpose(1, 2), k, v, k_cache, v_cache, p.q_rows, p.kv_src)
    with pytest.raises(ValueError, match=r"contiguous \[n, 96\] blocks"):
        scatter_split_rows_triton(o, p.q_rows[10:], torch.zeros(n, 2 * hq * d, dtype=torch.bfloat16,
                                                                device=DEVICE)[:, : hq * d], got[n:])


def test_pack_attention_rows_fp8_and_scatter_its_outputs() -> None:
    """FP8 attention's packing: each sequence's queries, keys and values (cache rows among them) as e4m3 with
    one scale per tensor and sequence, its scale row beside them; the kernel writes its twin's bytes and
    scales, and leaves the rows no sequence reads alone. The scatter of e4m3 outputs hands an FP8 block the
    bytes with the sequence's scale and a bf16 block their dequantised values."""
    from bagel_serve.layers.attention_backends import pack_sequences, PackedAttention
    from bagel_serve.layers.kernels.gather import ATTENTION_SCALES
    from bagel_serve.layers.kernels.quant import FP8_DTYPE, empty_fp8_rows, quantize_tensor_native

    g = seeded("gather fp8")
    hq, hkv, d, n = 6, 2, 16, 20
    qkv = randn(g, n, (hq + 2 * hkv) * d, dtype=torch.bfloat16, scale=3.0)
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
    k_cache, v_cache = randn(g, 30, hkv, d, dtype=torch.bfloat16), randn(g, 30, hkv, d, dtype=torch.bfloat16)
    k_cache[3] *= 40.0  # a cached key row sets the first sequence's key scale
    q_rows = [torch.tensor([0, 1, *range(4, 12)]), torch.tensor([2, 3, *range(12, 20)])]
    f = pack_sequences(q_rows, [torch.tensor([7, 3, 29]), None])
    p = PackedAttention(**{a: b.to(DEVICE) if isinstance(b, torch.Tensor) else b for a, b in f.items()})
    nat = pack_attention_rows_fp8_native(q, k, v, k_cache, v_cache, p.q_rows, p.kv_src, p.cu_q, p.cu_k)
    tri = pack_attention_rows_fp8_triton(q, k, v, k_cache, v_cache, p.q_rows, p.kv_src, p.cu_q, p.cu_k)
    used = p.host_cu_k[-1]
    for a, b, rows in zip(nat, tri, (n, used, used, 2), strict=True):  # the padding key row is read by none
        assert torch.equal(a[:rows].view(torch.uint8) if a.dtype == FP8_DTYPE else a,
                           b[:rows].view(torch.uint8) if b.dtype == FP8_DTYPE else b)
    qp, kp, vp = pack_attention_rows_native(q, k, v, k_cache, v_cache, p.q_rows, p.kv_src)
    scales = nat[3].cpu()
    for i, (a, b, c, e) in enumerate(zip(p.host_cu_q, p.host_cu_q[1:], p.host_cu_k, p.host_cu_k[1:])):
        row = dict(zip(ATTENTION_SCALES, scales[i, :, 0].tolist()))
        for packed, plain, scale in ((nat[0][a:b], qp[a:b], "descale_q"), (nat[1][c:e], kp[c:e], "descale_k"),
                                     (nat[2][c:e], vp[c:e], "descale_v")):
            x8, s = quantize_tensor_native(plain)
            assert torch.equal(packed.view(torch.uint8), x8.view(torch.uint8)) and row[scale] == s.item()
        assert row["descale_o"] == 2 * row["descale_v"] and row["scale_s"] == 448.0
        assert row["scale_o"] == pytest.approx(1 / row["descale_o"]) and row["descale_s"] == pytest.approx(1 / 448)
    assert not scales[:, len(ATTENTION_SCALES):].any() and not scales[:, :, 1:].any()
    assert scales[0, 1, 0] > 4 * scales[1, 1, 0]  # the cache row's magnitude is the first sequence's alone

    o8 = torch.randn(10, hq, d, generator=g).mul(100).clamp(-440, 440).to(FP8_DTYPE).to(DEVICE)
    scale = torch.tensor([0.03125 * 3], device=DEVICE)
    for fp8_head in (False, True):
        blocks = []
        for _ in range(2):
            head = empty_fp8_rows(4, hq * d, DEVICE) if fp8_head else nan_like(q.contiguous()[:4]).view(4, -1)
            tail = empty_fp8_rows(n - 4, hq * d, DEVICE)
            for b in (head, tail):
                if not isinstance(b, torch.Tensor):
                    b.data.view(torch.uint8).fill_(0x7F), b.scale.fill_(float("nan"))
            blocks.append((head, tail))
        rows = p.q_rows[10:]  # rows 2, 3 (head) and 12..19 (tail)
        scatter_split_rows_native(o8, rows, *blocks[0], src_scale=scale)
        scatter_split_rows_triton(o8, rows, *blocks[1], src_scale=scale)
        (hn, tn), (ht, tt) = blocks
        assert torch.equal(tn.data.view(torch.uint8), tt.data.view(torch.uint8))
        assert torch.equal(tn.scale.nan_to_num(5.0), tt.scale.nan_to_num(5.0))
        assert torch.equal(tt.data[8:16].view(torch.uint8), o8[2:].reshape(8, -1).view(torch.uint8))
        assert torch.equal(tt.scale[8:16], scale.expand(8, 1)) and torch.isnan(tt.scale[:8]).all()
        if fp8_head:
            assert torch.equal(hn.data.view(torch.uint8), ht.data.view(torch.uint8))
            assert torch.equal(ht.scale[2:4], scale.expand(2, 1)) and torch.isnan(ht.scale[:2]).all()
        else:
            want = (o8[:2].float() * scale).to(torch.bfloat16).reshape(2, -1)
            assert torch.equal(ht[2:4], want) and torch.equal(hn[2:4], want) and torch.isnan(ht[:2]).all()
    with pytest.raises(ValueError, match="src_scale exactly when src is e4m3"):
        scatter_split_rows_triton(o8, rows, *blocks[1])


# ----------------------------------------------------------------------------------------------------------
# conv2d

CONV_CASES = {  # name: (in channels, out channels, kernel, stride, padding, upsample, residual, channels-last)
    "3x3": (32, 48, 3, 1, 1, 1, False, False),
    "3x3 + residual": (48, 32, 3, 1, 1, 1, True, False),
    "3x3 of the upsampled input": (32, 16, 3, 1, 1, 2, False, False),
    "3x3 stride 2, far-edge padding": (16, 32, 3, 2, 0, 1, False, False),
    "1x1 + residual": (64, 64, 1, 1, 0, 1, True, False),
    "3x3 channels-last": (16, 24, 3, 1, 1, 1, True, True),
}


def conv_case(g: torch.Generator, case: tuple, values: str) -> tuple:
    cin, cout, k, stride, pad, up, res, nhwc = case
    if values == "integers":  # x needs more than TF32's 11 bits, w fits them; |sums| < 2^24
        x = torch.randint(-4096, 4097, (2, cin, 9, 7), generator=g).double()
        w = torch.randint(-7, 8, (cout, cin, k, k), generator=g).double()
        b = torch.randint(-100, 101, (cout,), generator=g).double()
    else:
        x, w, b = (torch.randn(2, cin, 9, 7, generator=g, dtype=torch.float64),
                   torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64),
                   torch.randn(cout, generator=g, dtype=torch.float64))
    ref = conv2d_native(x, w, b, stride, pad, up)
    r = None
    if res:
        r = (torch.randint(-1000, 1001, ref.shape, generator=g).double() if values == "integers"
             else torch.randn(ref.shape, generator=g, dtype=torch.float64))
        ref = ref + r
    s = conv2d_native(x.abs(), w.abs(), b.abs(), stride, pad, up) + (r.abs() if res else 0)
    tol = ((cin * k * k + 2) * U + 2.0**-19) * s

    def dev(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.float().to(DEVICE)
        return t.contiguous(memory_format=torch.channels_last) if nhwc and t.dim() == 4 else t

    return (dev(x), dev(w), dev(b), stride, pad, up, dev(r)), ref, tol


@pytest.mark.parametrize("values", ["normal", "integers"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d(name, values) -> None:
    case = CONV_CASES[name]
    args, ref, tol = conv_case(seeded(name, values), case, values)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        tri = conv2d_triton(*args)
        nat = conv2d_native(*args)
    assert tri.is_contiguous(memory_format=torch.channels_last if case[-1] else torch.contiguous_format)
    if values == "integers":
        assert torch.equal(tri.double().cpu(), ref), f"{name}: not the exact integer sums"
        assert torch.equal(nat.double().cpu(), ref)
    else:
        assert_close(tri, ref, torch.float32, tol, 0, f"{name}: triton vs float64")
        assert_close(nat, ref, torch.float32, tol, 0, f"{name}: native vs float64")


def test_conv2d_dispatch_and_refusals() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 16, 5, 5, generator=g).to(DEVICE), torch.randn(16, 16, 3, 3, generator=g).to(DEVICE)
    rgb = torch.randn(3, 16, 3, 3, generator=g).to(DEVICE)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert uses_kernel(x, w) == (DEVICE == "cuda")
        assert not uses_kernel(x, rgb), "3 output channels stay with torch's convolution"
        assert not uses_kernel(x.double(), w.double())
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert not uses_kernel(x, w), "TF32 convolutions are cuDNN's"
    assert torch.equal(conv2d(x, rgb), conv2d_native(x, rgb))
    with pytest.raises(ValueError, match="residual must be"):
        conv2d_native(x, w, residual=torch.zeros(1, 16, 4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="not supported"):
        conv2d_native(x, w, stride=3)
    with pytest.raises(ValueError, match="float32"):
        conv2d_triton(x, rgb)
