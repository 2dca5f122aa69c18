"""The fused decode kernels on one GPU: each against its native twin and the machine's ceilings, cuBLAS at
decode shapes, prefill/denoise attention backends, and a synthetic 28-layer BAGEL decode step (random bf16
weights at the real shapes) replayed from a CUDA graph, with each kernel swapped for its twin in turn.

    python benchmarks/bench_kernels.py --out bench_kernels.json

Times are `triton.testing.do_bench` medians (it clears L2 before every call); inputs are fresh random data,
and inputs smaller than L2 are cycled over several copies. Every measurement is in its own try/except: a
failure is recorded in the JSON (and the table) and the run goes on; `--skip` drops whole sections. Each
measurement prints as it completes, the short table comes last. Budget: under 5 minutes on an H200
(~15 GB of random weights for the decode step; the first call of each kernel variant compiles it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagel_serve.layers.kernels.activation import silu_and_mul_native, silu_and_mul_triton  # noqa: E402
from bagel_serve.layers.kernels.decode_attention import (  # noqa: E402
    paged_decode_attention_native, paged_decode_attention_triton, plan_splits)
from bagel_serve.layers.kernels.qk_norm_rope import qk_norm_rope_native, qk_norm_rope_triton  # noqa: E402
from bagel_serve.layers.kernels.rms_norm import rms_norm_native, rms_norm_triton  # noqa: E402

H, HQ, HKV, D, INTER, VOCAB, LAYERS, PAGE = 3584, 28, 4, 128, 18944, 152064, 28, 16
BF = torch.bfloat16
DEV = "cuda"
RES: dict = {}


def bench_s(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=60, return_mode="median") / 1e3


def randn(*shape, dtype=BF, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(dtype)


def copies(make, nbytes: int) -> list:
    """Enough independent input sets that cycling through them streams past L2 (at most 16)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return [make() for _ in range(max(1, min(16, math.ceil(2 * l2 / max(1, nbytes)))))]


def cycling(sets, fn):
    state = {"i": 0}

    def call():
        fn(*sets[state["i"] % len(sets)])
        state["i"] += 1
    return call


def record(section: str, name: str, fn, nbytes: float | None = None, flops: float | None = None,
           tokens: int | None = None, **extra):
    """Time fn; store microseconds, GB/s (and % of measured HBM copy), TFLOP/s or tok/s, plus `extra`."""
    try:
        t = bench_s(fn)
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        fail(section, name, e)
        return None
    row, rate = {"us": t * 1e6, **extra}, ""
    if nbytes:
        row["GB_s"] = nbytes / t / 1e9
        rate = f"{row['GB_s']:.0f} GB/s"
        if "hbm_GB_s" in RES.get("machine", {}):
            row["hbm_pct"] = 100 * row["GB_s"] / RES["machine"]["hbm_GB_s"]
            rate += f" ({row['hbm_pct']:.0f}%)"
    if flops:
        row["TFLOP_s"] = flops / t / 1e12
        rate = f"{row['TFLOP_s']:.0f} TFLOP/s"
    if tokens:
        row["tok_s"] = tokens / t
        rate = f"{row['tok_s']:.0f} tok/s"
    check = ""
    if "max_abs_err" in extra:
        check = f"max abs err {extra['max_abs_err']:.3g}"
        if "max_err_ulp" in extra:
            check += f" ({extra['max_err_ulp']:.2g} ulp, {extra['differ_pct']:.2g}% differ)"
    RES.setdefault(section, {})[name] = row
    print(f"{section}/{name:<44}{t * 1e6:>12.1f} us  {rate:<22}{check}", flush=True)
    return t


def fail(section: str, name: str, e: Exception) -> None:
    RES.setdefault(section, {})[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
    print(f"{section}/{name}: {type(e).__name__}: {e}"[:200].replace("\n", " "), flush=True)
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - a sticky CUDA error: later sections will record it too
        pass


def errors(tri: torch.Tensor, nat: torch.Tensor, dtype: torch.dtype) -> dict:
    """Max abs error, and for low precision the max error in output ulps and the share of differing elements."""
    a, b = tri.double(), nat.double()
    out = {"max_abs_err": (a - b).abs().max().item()}
    if dtype != torch.float32:
        _, e = torch.frexp(b.abs())
        ulp = torch.ldexp(torch.ones_like(b), torch.clamp(e - 1, min=-126) - (7 if dtype == BF else 10))
        ulp = torch.where(b == 0, torch.full_like(b, 2.0**-133), ulp)
        out["max_err_ulp"] = ((a - b).abs() / ulp).max().item()
        out["differ_pct"] = 100 * (a != b).double().mean().item()
    return out


def _outputs(fn, args: tuple) -> torch.Tensor:
    """Everything fn produced: its returned tensors, or for an in-place op the (cloned) arguments it changed."""
    args = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in args)
    got = fn(*args)
    got = args if got is None else got if isinstance(got, tuple) else (got,)
    return torch.cat([t.flatten() for t in got if isinstance(t, torch.Tensor) and t.is_floating_point()])


def pair(section: str, name: str, make, set_bytes: int, tri, nat, nbytes: float, **extra) -> list | None:
    """Input sets from make(); check tri against its twin on the first, then time both cycling over them all."""
    try:
        sets = copies(make, set_bytes)
        err = errors(_outputs(tri, sets[0]), _outputs(nat, sets[0]), sets[0][0].dtype)
    except Exception as e:  # noqa: BLE001
        fail(section, f"{name}_triton", e)
        return None
    record(section, f"{name}_triton", cycling(sets, tri), nbytes, **extra, **err)
    record(section, f"{name}_native", cycling(sets, nat), nbytes)
    return sets


# ------------------------------------------------------------------------------------------------ sections

def machine() -> None:
    src, dst = randn(1 << 29), torch.empty(1 << 29, dtype=BF, device=DEV)  # 1 GiB each
    t = record("machine", "hbm_copy_1GiB", lambda: dst.copy_(src), nbytes=2 * src.numel() * 2)
    if t:
        RES["machine"]["hbm_GB_s"] = 2 * src.numel() * 2 / t / 1e9
    del src, dst
    a, b = randn(8192, 8192), randn(8192, 8192)
    record("machine", "gemm_bf16_8192", lambda: a @ b, flops=2 * 8192**3)


def inv_freq() -> torch.Tensor:
    return (1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))).to(DEV)


def kernels() -> None:
    inv, width = inv_freq(), (HQ + 2 * HKV) * D
    for n in (1, 64, 4098 * 3):
        for res in (False, True):
            nbytes = n * H * 2 * (2 + 2 * res)
            pair("rms_norm", f"rms_norm{'+res' * res}_N{n}",
                 lambda: (randn(n, H, scale=3), randn(H), None, None, 1e-6, randn(n, H) if res else None), nbytes,
                 rms_norm_triton, rms_norm_native, nbytes + H * 2)
    for n in (1, 64, 4098 * 3):
        nbytes = n * D * 2 * (2 * (HQ + HKV) + 3 * HKV)  # q, k read + written; k, v stored; v read

        def make():
            qw, kw = 1 + 0.1 * randn(D), 1 + 0.1 * randn(D)
            return (randn(n, width), HQ, HKV, D, qw, kw, qw, kw, n, torch.randint(0, 30000, (n,), device=DEV),
                    inv, 1e-6, randn(n, HKV, D), randn(n, HKV, D), torch.randperm(n, device=DEV))
        pair("qk_norm_rope", f"qk_norm_rope_N{n}", make, nbytes, qk_norm_rope_triton, qk_norm_rope_native, nbytes)
    for n in (1, 64, 8192):
        pair("silu_and_mul", f"silu_and_mul_N{n}", lambda: (randn(n, 2 * INTER, scale=3),), n * INTER * 6,
             silu_and_mul_triton, silu_and_mul_native, n * INTER * 6)


def paged_inputs(b: int, ctx: int, dtype=BF):
    """A cache with every sequence's blocks scattered at random, and a q that is a view into a QKV buffer."""
    hkv = HKV
    nblk = -(-ctx // PAGE)
    tables = torch.randperm(b * nblk, device=DEV).view(b, nblk).to(torch.int32)
    kc, vc = randn(b * nblk * PAGE, hkv, D, dtype=dtype), randn(b * nblk * PAGE, hkv, D, dtype=dtype)
    q = randn(b, (HQ + 2 * hkv) * D, dtype=dtype)[:, : HQ * D].view(b, HQ, D)
    return q, kc, vc, tables, torch.full((b,), ctx, dtype=torch.int32, device=DEV)


def decode_attention() -> None:
    scale = 1 / math.sqrt(D)
    try:  # float32 exactness on the GPU (no TF32 anywhere)
        q, kc, vc, bt, lens = paged_inputs(4, 777, torch.float32)
        lens[1] = 0
        RES.setdefault("decode_attention", {})["fp32_check"] = errors(
            paged_decode_attention_triton(q, kc, vc, bt, lens, PAGE, scale),
            paged_decode_attention_native(q, kc, vc, bt, lens, PAGE, scale), torch.float32)
    except Exception as e:  # noqa: BLE001
        fail("decode_attention", "fp32_check", e)
    varlen = _varlen()
    for b, ctx in ((1, 300), (1, 4096), (64, 768), (256, 1024)):
        name, nbytes = f"B{b}_ctx{ctx}", b * ctx * HKV * D * 2 * 2 + 2 * b * HQ * D * 2
        splits = plan_splits(b, HKV, -(-ctx // PAGE) * PAGE, torch.cuda.get_device_properties(0).multi_processor_count)
        sets = pair("decode_attention", name, lambda: (*paged_inputs(b, ctx), PAGE, scale), nbytes,
                    paged_decode_attention_triton, paged_decode_attention_native, nbytes, num_splits=splits)
        if sets is None or varlen is None or "block_table" not in inspect.signature(varlen).parameters:
            continue
        try:  # this torch's paged flash-attention, for comparison
            cu = torch.arange(b + 1, dtype=torch.int32, device=DEV)

            def flash(q, kc, vc, bt, lens, page, scale):
                return varlen(q.contiguous(), kc.view(-1, page, HKV, D), vc.view(-1, page, HKV, D), cu, None, 1,
                              bt.shape[1] * page, scale=scale, enable_gqa=True, seqused_k=lens, block_table=bt)
            err = errors(flash(*sets[0]), paged_decode_attention_native(*sets[0]), BF)
            record("decode_attention", f"{name}_varlen_attn_paged", cycling(sets, flash), nbytes, **err)
        except Exception as e:  # noqa: BLE001
            fail("decode_attention", f"{name}_varlen_attn_paged", e)


def cublas() -> None:
    """cuBLAS at the decode shapes: F.linear, and the same product as a matrix-vector one (W @ x^T)."""
    for k, n in ((H, 4608), (H, H), (H, 2 * INTER), (H, VOCAB), (INTER, H)):
        ws = copies(lambda: (randn(n, k, scale=0.02),), n * k * 2)
        for m in (1, 8, 64):
            x = randn(m, k)
            record("cublas_linear", f"M{m}_K{k}_N{n}", cycling(ws, lambda w: F.linear(x, w)), n * k * 2)
            record("cublas_linear", f"Wx_M{m}_K{k}_N{n}", cycling(ws, lambda w: torch.matmul(w, x.t())), n * k * 2)
        del ws
        torch.cuda.empty_cache()


def _varlen():
    try:  # torch >= 2.10
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # noqa: BLE001
        return None
    return varlen_attn


def first_call_cost() -> None:
    """What a new sequence length costs each SDPA backend the first time (cuDNN builds a plan per shape):
    a denoising step at 512² against contexts of lengths it has not seen."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = randn(1, HQ, 1026, D)
    for bname, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        for i, lk in enumerate((1290, 1333, 1401)):
            k, v = randn(1, HKV, lk, D), randn(1, HKV, lk, D)
            try:
                with sdpa_kernel(backend):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    torch.cuda.synchronize()
                    again = time.perf_counter() - t0
                RES.setdefault("first_call", {})[f"{bname}_k{lk}"] = {"first_ms": first * 1e3, "again_ms": again * 1e3}
            except Exception as e:  # noqa: BLE001
                fail("first_call", f"{bname}_k{lk}", e)


def prefill_attention() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    varlen = _varlen()
    cases = {  # name: (batch, q len, k len, causal)
        "a_64x512_causal": (64, 512, 512, True),
        "b_q4098_k4162": (1, 4098, 4098 + 64, False),
    }
    for cname, (b, lq, lk, causal) in cases.items():
        flops = 4 * b * HQ * lq * lk * D * (0.5 if causal else 1.0)  # causal: the useful half
        q, k, v = randn(b, HQ, lq, D), randn(b, HKV, lk, D), randn(b, HKV, lk, D)
        for kv in ("gqa", "expanded"):
            kk, vv = (k, v) if kv == "gqa" else (k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1))
            for bname, backend in backends.items():
                def run(kk=kk, vv=vv, backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=kv == "gqa")
                record("prefill_attention", f"{cname}_{kv}_sdpa_{bname}", run, flops=flops)
            if varlen is None:
                continue
            try:
                params = inspect.signature(varlen).parameters
                qp = q.transpose(1, 2).reshape(b * lq, HQ, D)
                kp, vp = (t.transpose(1, 2).reshape(b * lk, t.shape[1], D) for t in (kk, vv))
                cq = torch.arange(0, b * lq + 1, lq, dtype=torch.int32, device=DEV)
                ck = torch.arange(0, b * lk + 1, lk, dtype=torch.int32, device=DEV)
                kw = {}
                if causal:
                    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
                if kv == "gqa":
                    if "enable_gqa" not in params:
                        raise RuntimeError("this varlen_attn has no enable_gqa")
                    kw["enable_gqa"] = True
                record("prefill_attention", f"{cname}_{kv}_varlen_attn",
                       lambda: varlen(qp, kp, vp, cq, ck, lq, lk, **kw), flops=flops)
            except Exception as e:  # noqa: BLE001
                fail("prefill_attention", f"{cname}_{kv}_varlen_attn", e)
        del q, k, v
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------- synthetic decode step

def qk_native_capturable(qkv, hq, hkv, d, qw, kw, qwg, kwg, n_und, pos, inv, eps, kc, vc, slots):
    """The native twin's math with an `index_copy_` store (every bench row has a slot): no host sync."""
    qk_norm_rope_native(qkv, hq, hkv, d, qw, kw, qwg, kwg, n_und, pos, inv, eps)
    heads = qkv.view(qkv.shape[0], hq + 2 * hkv, d)
    kc.index_copy_(0, slots, heads[:, hq: hq + hkv])
    vc.index_copy_(0, slots, heads[:, hq + hkv:])


def attention_native_capturable(q, kc, vc, bt, lens, page, scale):
    """The native twin's float32 math over every slot of the block table, masked by length: no host sync."""
    b, hq, d = q.shape
    hkv = kc.shape[1]
    r = torch.arange(bt.shape[1] * page, device=q.device)
    slots = bt[:, r // page].long() * page + r % page  # [B, K]
    k, v = kc[slots].float(), vc[slots].float()  # [B, K, Hkv, D]
    s = torch.einsum("bhgd,bkhd->bhgk", q.float().view(b, hkv, hq // hkv, d), k) * scale
    s = s.masked_fill((r[None, :] >= lens[:, None])[:, None, None, :], float("-inf"))
    o = torch.einsum("bhgk,bkhd->bhgd", torch.softmax(s, dim=-1), v)
    return o.reshape(b, hq, d).to(q.dtype)


def decode_step() -> None:
    torch.manual_seed(0)
    inv = inv_freq()
    layers = [dict(w_in=1 + 0.1 * randn(H), w_post=1 + 0.1 * randn(H), qn=1 + 0.1 * randn(D), kn=1 + 0.1 * randn(D),
                   qkv=randn((HQ + 2 * HKV) * D, H, scale=0.02), bias=randn((HQ + 2 * HKV) * D, scale=0.02),
                   o=randn(H, H, scale=0.02), gu=randn(2 * INTER, H, scale=0.02), down=randn(H, INTER, scale=0.02))
              for _ in range(LAYERS)]
    w_final, head = 1 + 0.1 * randn(H), randn(VOCAB, H, scale=0.02)
    weight_bytes = sum(t.numel() * 2 for lw in layers for t in lw.values()) + (w_final.numel() + head.numel()) * 2
    RES.setdefault("decode_step", {})["weight_GB"] = weight_bytes / 1e9
    hbm = RES.get("machine", {}).get("hbm_GB_s", 4200.0) * 1e9
    triton_ops = (rms_norm_triton, qk_norm_rope_triton, paged_decode_attention_triton, silu_and_mul_triton)
    native_ops = (rms_norm_native, qk_native_capturable, attention_native_capturable, silu_and_mul_native)
    variants = {"triton": triton_ops + (F.linear,), "all_native": native_ops + (F.linear,)}
    for i, what in enumerate(("rms_norm", "qk_norm_rope", "attention", "silu_and_mul")):
        variants[f"native_{what}"] = tuple(native_ops[j] if j == i else triton_ops[j] for j in range(4)) + (F.linear,)
    for b, ctx in ((1, 300), (64, 768)):
        tag = f"B{b}_ctx{ctx}"
        try:
            caches = [paged_inputs(b, ctx)[1:] for _ in range(LAYERS)]  # (k, v, tables, lens) per layer
            bt, lens = caches[0][2], caches[0][3]
            pos = (lens - 1).long()  # the new token is the last of its context
            slots = (bt[torch.arange(b, device=DEV), pos // PAGE].long() * PAGE + pos % PAGE)
            x, residual = randn(b, H), torch.empty(b, H, dtype=BF, device=DEV)
            kv_bytes = b * ctx * HKV * D * 2 * 2 * LAYERS
            RES["decode_step"][f"{tag}_floor_ms"] = 1e3 * weight_bytes / hbm
            RES["decode_step"][f"{tag}_floor_with_kv_ms"] = 1e3 * (weight_bytes + kv_bytes) / hbm

            def step(ops):
                rms, qk, attn, silu, lin = ops
                # residual <- x; each later norm first adds its input into `residual` in place (fused).
                residual.copy_(x)
                h, _ = rms(residual, layers[0]["w_in"], None, None, 1e-6, None)
                for li, lw in enumerate(layers):
                    kc, vc = caches[li][0], caches[li][1]
                    if li:
                        h, _ = rms(h, lw["w_in"], None, None, 1e-6, residual)
                    qkv = lin(h, lw["qkv"], lw["bias"])
                    qk(qkv, HQ, HKV, D, lw["qn"], lw["kn"], lw["qn"], lw["kn"], b, pos, inv, 1e-6, kc, vc, slots)
                    a = attn(qkv[:, : HQ * D].view(b, HQ, D), kc, vc, bt, lens, PAGE, 1 / math.sqrt(D))
                    h, _ = rms(lin(a.view(b, H), lw["o"]), lw["w_post"], None, None, 1e-6, residual)
                    h = lin(silu(lin(h, lw["gu"])), lw["down"])
                h, _ = rms(h, w_final, None, None, 1e-6, residual)
                return F.linear(h, head)

            logits = {}
            for name, ops in variants.items():
                try:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(2):
                            step(ops)  # compile, pick cuBLAS algorithms, allocate outside the capture
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = step(ops)
                    graph.replay()
                    logits[name] = out.float().clone()
                    record("decode_step", f"{tag}_graph_{name}", graph.replay, tokens=b)
                    if name in ("triton", "all_native"):
                        record("decode_step", f"{tag}_eager_{name}", lambda ops=ops: step(ops), tokens=b)
                    del graph
                except Exception as e:  # noqa: BLE001
                    fail("decode_step", f"{tag}_{name}", e)
            if "triton" in logits and "all_native" in logits:
                ref = logits["all_native"]
                RES["decode_step"][f"{tag}_logits_rel_diff"] = ((logits["triton"] - ref).abs().max() / ref.abs().max()).item()
            del caches
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            fail("decode_step", tag, e)


def _fmt(row: dict | None, key: str, spec: str = ".0f", scale: float = 1.0) -> str:
    if not row or ("error" not in row and key not in row):
        return "-"
    return "err" if "error" in row else format(row[key] * scale, spec)


def summary() -> None:
    """The short table: one line per kernel shape, linear shape, attention option and decode-step variant."""
    m, step = RES.get("machine", {}), RES.get("decode_step", {})
    print(f"\n== {RES['header']['device']}: HBM copy {_fmt(m, 'hbm_GB_s')} GB/s, "
          f"bf16 GEMM 8192^3 {_fmt(m.get('gemm_bf16_8192'), 'TFLOP_s')} TFLOP/s")
    print(f"{'kernel (bf16)':<34}{'triton us':>10}{'native us':>10}{'speedup':>8}{'GB/s':>7}{'%HBM':>6}  triton vs native")
    for sec in ("rms_norm", "qk_norm_rope", "silu_and_mul", "decode_attention"):
        for key, row in RES.get(sec, {}).items():
            base = key[: -len("_triton")] if key.endswith("_triton") else key
            if key.endswith("_native") or key.endswith("_paged"):
                continue
            nat, fl = RES[sec].get(f"{base}_native"), RES[sec].get(f"{base}_varlen_attn_paged")
            speed = f"{nat['us'] / row['us']:.1f}x" if nat and "us" in nat and "us" in row else "-"
            check = row["error"][:60] if "error" in row else (
                f"max {row.get('max_abs_err', float('nan')):.2g} abs, {row.get('max_err_ulp', 0):.2g} ulp")
            print(f"{sec[:12] + ' ' + base:<34}{_fmt(row, 'us', '.1f'):>10}{_fmt(nat, 'us', '.1f'):>10}{speed:>8}"
                  f"{_fmt(row, 'GB_s'):>7}{_fmt(row, 'hbm_pct'):>6}  {check}"
                  + (f"; torch varlen_attn paged {_fmt(fl, 'us', '.1f')} us" if fl else ""))
    lin = RES.get("cublas_linear", {})
    for shape in sorted({k.split("_", 1)[1] for k in lin if not k.startswith("Wx")},
                        key=lambda k: list(lin).index(f"M1_{k}")):
        for kind in ("", "Wx_"):
            print(f"cuBLAS {'W @ x^T' if kind else 'F.linear'} {shape:<14} weight GB/s (%HBM):" + "".join(
                f"  M{mm} {_fmt(lin.get(f'{kind}M{mm}_{shape}'), 'GB_s')} ({_fmt(lin.get(f'{kind}M{mm}_{shape}'), 'hbm_pct')}%)"
                for mm in (1, 8, 64)))
    for key, row in RES.get("first_call", {}).items():
        print(f"SDPA first call {key:<30} {_fmt(row, 'first_ms', '.2f')} ms, then {_fmt(row, 'again_ms', '.2f')} ms")
    for key, row in RES.get("prefill_attention", {}).items():
        print(f"attention {key:<44}{_fmt(row, 'TFLOP_s'):>6} TFLOP/s")
    for key, row in step.items():
        if isinstance(row, dict):
            print(f"decode step {key:<42}{_fmt(row, 'us', '.2f', 1e-3):>8} ms {_fmt(row, 'tok_s'):>7} tok/s")
    for tag in ("B1_ctx300", "B64_ctx768"):
        if f"{tag}_floor_ms" in step:
            print(f"decode step {tag} floor {step[f'{tag}_floor_ms']:.2f} ms (weights) / "
                  f"{step[f'{tag}_floor_with_kv_ms']:.2f} ms (weights + KV) at the measured HBM rate; "
                  f"logits triton vs native: rel diff {step.get(f'{tag}_logits_rel_diff', float('nan')):.2g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_kernels.json")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip, e.g. prefill_attention,cublas")
    a = ap.parse_args()
    import triton
    RES["header"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M")}
    t0 = time.time()
    for section in (machine, kernels, decode_attention, cublas, first_call_cost, prefill_attention, decode_step):
        if section.__name__ in a.skip.split(","):
            continue
        try:
            section()
        except Exception as e:  # noqa: BLE001
            fail(section.__name__, "section", e)
        torch.cuda.empty_cache()
        print(f"[{time.time() - t0:6.1f} s] {section.__name__} done", flush=True)
    RES["header"]["wall_s"] = time.time() - t0
    Path(a.out).write_text(json.dumps(RES, indent=1))
    summary()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
