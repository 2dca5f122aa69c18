"""The streaming kernel for decode-sized projections against float64, and its dispatch.

Tolerance: float32 accumulation of K products in any order errs by at most K u sum_k |x_k w_k| (u = 2^-24;
the products of half-precision inputs are exact in float32), plus the bias add, plus the final rounding to the
output dtype (half an ulp; one ulp allowed). Outputs are poisoned with NaN first, every element checked.
"""

from __future__ import annotations

import pytest
import torch

from bagel_serve.layers.kernels import triton_available
from bagel_serve.layers.kernels.small_linear import (
    MAX_ROWS,
    applies,
    plan,
    small_linear,
    small_linear_native,
    small_linear_triton,
)
from test_kernels import DEVICE, U, seeded, ulp

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x w^T + b in float64, the error bound of a float32 accumulation)."""
    xd, wd = x.double().cpu(), w.double().cpu()
    exact = xd @ wd.T
    mag = xd.abs() @ wd.abs().T
    if b is not None:
        exact = exact + b.double().cpu()
        mag = mag + b.double().cpu().abs()
    return exact, (x.shape[1] + 2) * U * mag


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 96, 300), (3, 200, 520), (16, 40, 64), (40, 130, 256), (64, 64, 129)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_small_linear(dtype: torch.dtype, m: int, n: int, k: int, bias: bool, splits: int | None) -> None:
    g = seeded("small_linear", dtype, m, n, k, bias, splits)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
    wide = torch.full((m, n + 7), float("nan"), dtype=dtype, device=DEVICE)
    out = wide[:, 3 : 3 + n]  # a strided view, as the MoT pair writes into its rows of one buffer
    got = small_linear_triton(x, w, b, out=out, splits=splits, block_n=32, block_k=64)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isnan(wide[:, :3]).all() and torch.isnan(wide[:, 3 + n :]).all(), "wrote outside its columns"
    exact, bound = reference(x, w, b)
    a = got.double().cpu()
    assert not torch.isnan(a).any(), "elements left unwritten"
    err = (a - exact).abs()
    assert (err <= bound + ulp(exact, dtype)).all(), (
        f"small_linear {dtype} {m}x{n}x{k} splits={splits}: worst error {err.max().item():.3g}")


def test_plan_splits_k_only_when_the_outputs_give_too_few_programs() -> None:
    assert plan(1, 37888, 3584) == (1, 3584)  # 592 bands: already a few waves
    s, per = plan(1, 3584, 3584)
    assert s > 1 and per % 128 == 0 and s * per >= 3584 and (s - 1) * per < 3584
    s, per = plan(1, 3584, 18944)
    assert s > 1 and per >= 4 * 128


def test_dispatch() -> None:
    x = torch.randn(4, 64)
    w = torch.randn(32, 64).to(torch.bfloat16)
    assert not applies(x.to(torch.bfloat16), w)  # the CPU: cuBLAS's / torch's path
    assert torch.equal(small_linear(x, w.float()), small_linear_native(x, w.float()))
    if torch.cuda.is_available():
        xc, wc = x.cuda().to(torch.bfloat16), w.cuda()
        assert applies(xc, wc)
        assert not applies(torch.randn(MAX_ROWS + 1, 64, device="cuda", dtype=torch.bfloat16), wc)
        assert not applies(xc.float(), wc.float())  # float32 keeps cuBLAS
    out = torch.empty(4, 32)
    assert small_linear_native(x, w.float(), out=out) is out
