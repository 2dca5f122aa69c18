"""FP8 (W8A8 e4m3) quantization: the format, the kernels that produce it, the linear that consumes it, the
tiny model run with it, and the options that ask for it.

The references here are written independently of `bagel_serve.layers.kernels.quant`: `ref_quantize` is the
format's definition in plain torch, and `ref_linear` the dequantised GEMM
`(x_q * s_x) @ (w_q * s_w).T + b` rounded to the output dtype, which is also what the CPU emulation must be,
so the model comparisons are exact where the data flow is the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bagel_serve import Omni
from bagel_serve.config.deploy import DeployConfigError
from bagel_serve.config.deploy_loader import load_deploy_config
from bagel_serve.config.engine_options import EngineOptionError, EngineOptions
from bagel_serve.engine.kv_cache import Context
from bagel_serve.engine.runner import reserve_blocks
from bagel_serve.engine.sequence import Work
from bagel_serve.layers.fp8 import Fp8LinearMethod, Fp8UnsupportedError, SplitRows, check_fp8_device, use_fp8
from bagel_serve.layers.kernels import activation
from bagel_serve.layers.kernels.activation import (silu_and_mul_quant_native, silu_and_mul_quant_triton,
                                                   silu_and_mul_triton)
from bagel_serve.layers.kernels.gather import scatter_split_rows_native, scatter_split_rows_triton
from bagel_serve.layers.kernels.quant import (Fp8Rows, empty_rows, quantize_rows, quantize_rows_native,
                                              quantize_rows_triton)
from bagel_serve.layers.kernels.rms_norm import rms_norm_quant_native, rms_norm_quant_triton, rms_norm_triton
from bagel_serve.layers.linear import QKVParallelLinear, RowParallelLinear
from bagel_serve.model.layout import TextPiece

SINGLE_STAGE = "bagel_single_stage.yaml"
E4M3 = torch.float8_e4m3fn


def ref_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The format, from its definition: scale = max(amax / 448, 2**-126) per row; q = e4m3(clamp(x / s))."""
    xf = x.float()
    scale = torch.maximum(xf.abs().amax(dim=1, keepdim=True) / 448.0, torch.tensor(2.0**-126))
    return torch.clamp(xf / scale, -448.0, 448.0).to(E4M3), scale


def ref_linear(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """[M, K] activations (quantised here) times the quantised weight [N, K] with scales [N, 1]."""
    xq, sx = ref_quantize(x)
    y = (xq.float() * sx) @ (wq.float() * sw).T
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def same(a: torch.Tensor | Fp8Rows, b: torch.Tensor | Fp8Rows) -> bool:
    """Bit equality of tensors, or of e4m3 bytes and scales."""
    if isinstance(a, Fp8Rows) or isinstance(b, Fp8Rows):
        return (isinstance(a, Fp8Rows) and isinstance(b, Fp8Rows)
                and torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale, b.scale))
    return a.dtype == b.dtype and torch.equal(a, b)


def rows(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes (1e-6 .. 1e3), one of them all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.logspace(-6, 3, n)[:, None]
    x[n // 2] = 0
    return x.to(dtype)


# --- the format ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_is_within_half_an_e4m3_ulp(dtype: torch.dtype) -> None:
    x = rows(9, 200, dtype, seed=0)
    q = quantize_rows(x)
    assert q.data.dtype == E4M3 and q.scale.dtype == torch.float32 and q.scale.shape == (9, 1)
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    nonzero = amax[:, 0] > 0
    # Exact scales: amax / 448 (a float32 division), and the floor for the zero row.
    assert torch.equal(q.scale[nonzero], amax[nonzero] / 448.0)
    assert torch.equal(q.scale[~nonzero], torch.full((1, 1), 2.0**-126))
    assert not q.data[~nonzero].float().any()
    # Half an ulp of e4m3 (3 mantissa bits): 2**-4 relative for normal values, 2**-10 absolute in the scaled
    # domain below 2**-6 (subnormal spacing 2**-9); the float32 arithmetic adds a few float32 ulps.
    y = xf / q.scale
    bound = torch.maximum(y.abs() * 2.0**-4, torch.full_like(y, 2.0**-10)) * q.scale
    err = (q.dequantize() - xf).abs()
    assert (err <= bound * (1 + 2e-6)).all()
    # The row's largest value maps onto the largest e4m3 value, never past it.
    big = q.data.float().abs().amax(dim=1)
    assert torch.equal(big[nonzero], torch.full_like(big[nonzero], 448.0))
    assert not torch.isnan(q.data.float()).any()


def test_quantized_values_clamp_at_448_and_round_to_nearest_even() -> None:
    # Every midpoint between adjacent e4m3 values (and their negatives) in one row whose amax is 448 (scale 1):
    # ties go to the even code, as torch's cast does.
    codes = torch.arange(0, 127, dtype=torch.uint8).view(E4M3).float()
    mids = (codes[:-1] + codes[1:]) / 2
    x = torch.cat([mids, -mids, torch.tensor([448.0, -448.0])])[None]
    q = quantize_rows_native(x)
    assert torch.equal(q.scale, torch.ones(1, 1))
    assert torch.equal(q.data.view(torch.uint8), x.to(E4M3).view(torch.uint8))
    # An amax for which amax / (amax / 448) rounds above 448 in float32: the clamp holds the code at 448.
    a = next(v for v in (torch.arange(1, 4000, dtype=torch.float32) * 0.37)
             if v / (v / torch.tensor(448.0)) > 448.0)
    q = quantize_rows_native(torch.tensor([[a, -a, 1.0]]))
    assert q.data[0, :2].float().tolist() == [448.0, -448.0]


# --- the kernels against their twins: Triton's interpreter on the CPU, the compiled kernels on a GPU ----------

KDEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [48, 200, 4100])  # one block, a masked block, and the column loop
def test_quantize_rows_kernel(dtype: torch.dtype, k: int) -> None:
    x = rows(5, k, dtype, seed=k).to(KDEV)
    assert same(quantize_rows_triton(x), quantize_rows_native(x))
    assert same(quantize_rows_triton(x[1:4]), quantize_rows_native(x[1:4]))  # a row range of a larger tensor


QUANT_FLAGS = [(False, True), (True, True), (True, False)]


@pytest.mark.parametrize("n_und", [0, 3, 7])
@pytest.mark.parametrize("flags", QUANT_FLAGS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant_kernel(n_und: int, flags: tuple[bool, bool], with_residual: bool) -> None:
    g = torch.Generator().manual_seed(n_und)
    x, wu, wg, res = (torch.randn(*s, generator=g).to(KDEV) for s in ((7, 80), (80,), (80,), (7, 80)))
    b = [t.to(torch.bfloat16) for t in (x, wu, wg, res)]
    r_nat, r_tri = (b[3].clone() if with_residual else None for _ in range(2))
    nat = rms_norm_quant_native(b[0], b[1], b[2], n_und, 1e-6, r_nat, *flags)
    tri = rms_norm_quant_triton(b[0], b[1], b[2], n_und, 1e-6, r_tri, *flags)
    assert nat[0].shape[0] == n_und and tri[1].shape[0] == 7 - n_und
    if with_residual:
        assert torch.equal(r_nat, r_tri)
    if KDEV == "cpu":
        # bf16 under the interpreter: the kernel sums a row's squares in the twin's order, so they agree on
        # every byte and scale. On a GPU the sums' orders differ (an ulp of the statistics can move a bf16
        # value); there the decomposition below, which holds on both, is the check.
        assert same(nat[0], tri[0]) and same(nat[1], tri[1])
    # The fused kernel is exactly the unfused kernel followed by the quantiser, in either dtype (the unfused
    # kernel may differ from torch by float32 ulps: tests/test_kernels.py bounds that).
    for dt_inputs in ((x, wu, wg, res), b):
        xi, wui, wgi, ri = dt_inputs
        r1, r2 = (ri.clone() if with_residual else None for _ in range(2))
        plain, _ = rms_norm_triton(xi, wui, wgi, n_und, 1e-6, r1)
        head, tail, _ = rms_norm_quant_triton(xi, wui, wgi, n_und, 1e-6, r2, *flags)
        for got, want, q in ((head, plain[:n_und], flags[0]), (tail, plain[n_und:], flags[1])):
            assert same(got, quantize_rows_native(want) if q else want)


@pytest.mark.parametrize("n_und", [0, 2, 5])
@pytest.mark.parametrize("flags", QUANT_FLAGS)
@pytest.mark.parametrize("inter", [96, 2100, 2101])  # 64 + 32; 2048 + 32 + 16 + 4; the last part padded to 8
@pytest.mark.parametrize("launch", [{}, {"max_row": 0, "max_block": 2048}], ids=["registers", "two-passes"])
def test_silu_and_mul_quant_kernel(n_und: int, flags: tuple[bool, bool], inter: int, launch: dict,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in launch.items():
        monkeypatch.setitem(activation.QUANT_LAUNCH, key, value)
    g = torch.Generator().manual_seed(inter + n_und)
    x = (torch.randn(5, 2 * inter, generator=g) * 3).to(KDEV)
    b = x.to(torch.bfloat16)
    if KDEV == "cpu":
        # Under the interpreter the kernel and its twin both run the CPU's float32 math: every byte agrees.
        # A GPU's exp differs from torch's CUDA one in the last float32 bits; there the decomposition is the
        # check.
        nat = silu_and_mul_quant_native(b, n_und, *flags)
        tri = silu_and_mul_quant_triton(b, n_und, *flags)
        assert same(nat[0], tri[0]) and same(nat[1], tri[1])
    for xi in (x, b):  # the fused kernel is exactly the unfused one followed by the quantiser
        plain = silu_and_mul_triton(xi)
        head, tail = silu_and_mul_quant_triton(xi, n_und, *flags)
        for got, want, q in ((head, plain[:n_und], flags[0]), (tail, plain[n_und:], flags[1])):
            assert same(got, quantize_rows_native(want) if q else want)


@pytest.mark.parametrize("n_und", [0, 3])
@pytest.mark.parametrize("flags", QUANT_FLAGS)
def test_scatter_split_rows_kernel(n_und: int, flags: tuple[bool, bool]) -> None:
    """Attention outputs scattered into the output projections' row blocks, quantised where a block is FP8:
    the kernel writes its twin's bytes and scales, exactly what scattering then quantising gives, and leaves
    the rows it was not given alone."""
    g = torch.Generator().manual_seed(n_und + 7 * flags[0] + 3 * flags[1])
    n, h, d = 9, 6, 16
    src = (torch.randn(5, h, d, generator=g) * 3).to(torch.bfloat16).to(KDEV)
    rows = torch.tensor([7, 0, 4, 2, 8], device=KDEV)
    plain = torch.zeros(n, h * d, dtype=torch.bfloat16, device=KDEV)
    plain[rows] = src.reshape(5, -1)
    blocks = {}
    for name, scatter in (("native", scatter_split_rows_native), ("kernel", scatter_split_rows_triton)):
        head, tail = empty_rows(n_und, h * d, src, flags[0]), empty_rows(n - n_und, h * d, src, flags[1])
        for block in (head, tail):
            (block.data if isinstance(block, Fp8Rows) else block).zero_()
            if isinstance(block, Fp8Rows):
                block.scale.zero_()
        scatter(src, rows, head, tail)
        blocks[name] = (head, tail)
    for i in range(2):
        assert same(blocks["native"][i], blocks["kernel"][i])
    for block, want, quant in zip(blocks["kernel"], (plain[:n_und], plain[n_und:]), flags):
        if quant:
            # Untouched rows keep their zero bytes and scales: the scale 0 no quantised row can have.
            assert same(block, Fp8Rows(quantize_rows_native(want).data, quantize_rows_native(want).scale
                                       * (want.abs().amax(1, keepdim=True) > 0)))
        else:
            assert torch.equal(block, want)


# --- the FP8 linear -----------------------------------------------------------------------------------------


def fp8_layer(layer: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """`layer` with random weights (and bias), switched to FP8 and processed; returns the float weight and
    bias it was made from."""
    g = torch.Generator().manual_seed(seed)
    use_fp8([layer])
    layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=g) * 0.1)
    if layer.bias is not None:
        layer.bias.data.copy_(torch.randn(layer.bias.shape, generator=g))
    w = layer.weight.data.clone()
    b = layer.bias.data.clone() if layer.bias is not None else None
    layer.process_weights_after_loading()
    return layer, w, b


def test_fp8_linear_matches_the_dequantised_reference() -> None:
    qkv, w, b = fp8_layer(QKVParallelLinear(32, 8, 4, 2, bias=True, sources=("q", "k", "v")), seed=1)
    assert qkv.weight.dtype == E4M3 and qkv.weight_scale.shape == (1, 64) and qkv.output_dtype == torch.float32
    wq, sw = ref_quantize(w)
    assert torch.equal(qkv.weight.view(torch.uint8), wq.view(torch.uint8)) and torch.equal(qkv.weight_scale, sw.T)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    want = ref_linear(x, wq, sw, b, torch.float32)
    assert torch.equal(qkv(x), want)  # a tensor input is quantised by the layer
    assert torch.equal(qkv(quantize_rows(x)), want)  # e4m3 rows from a producer
    out = torch.full((9, 64), float("nan"))
    qkv(x[:4], out=out[2:6])  # rows of a shared buffer, as the MoT pair writes them
    assert torch.equal(out[2:6], want[:4]) and out[:2].isnan().all() and out[6:].isnan().all()
    # Against the unquantised layer: FP8's error, not a wrong result.
    exact = torch.nn.functional.linear(x, w, b)
    assert (qkv(x) - exact).abs().max() < 0.05 * exact.abs().max()


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not FP8_GPU, reason="needs a GPU with FP8 tensor cores")
def test_cuda_kernels_give_the_twins_bytes_and_the_gemm_accumulates_fast() -> None:
    """On the GPU the compiled quantisers write the native twin's bytes and scales, and the default FP8 linear
    runs the GEMM with fast accumulation: measurably apart from the promoted one, within a few 1e-3 of the
    float32 emulation (2e-3 to 4e-3 measured at the DiT's shapes on an H200)."""
    dev = torch.device("cuda")
    x = rows(512, 3584, torch.bfloat16, seed=3).to(dev)
    assert same(quantize_rows_triton(x), quantize_rows_native(x))
    gu = (torch.randn(300, 2 * 4736, generator=torch.Generator().manual_seed(4)) * 3).to(torch.bfloat16).to(dev)
    _, tail = silu_and_mul_quant_triton(gu, 0, False, True)
    assert same(tail, quantize_rows_native(silu_and_mul_triton(gu)))
    layer = RowParallelLinear(18944, 512).to(dev)
    use_fp8([layer])
    assert layer.quant_method.fast_accum
    layer.weight.data.copy_(torch.randn(512, 18944, device=dev) * 0.02)
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    layer.process_weights_after_loading()
    xq = quantize_rows(torch.randn(256, 18944, device=dev).to(torch.bfloat16))
    want = xq.dequantize() @ (layer.weight.float() * layer.weight_scale.t()).t()
    fast = layer(xq).float()
    layer.quant_method.fast_accum = False
    promoted = layer(xq).float()
    rel = [float((y - want).norm() / want.norm()) for y in (fast, promoted)]
    assert rel[0] < 1e-2 and rel[1] < 5e-3 and not torch.equal(fast, promoted), rel


def test_fp8_linear_refuses_unquantised_use_and_double_conversion() -> None:
    layer = RowParallelLinear(16, 16)
    use_fp8([layer])
    with pytest.raises(RuntimeError, match="process_weights_after_loading"):
        layer(torch.randn(2, 16))
    layer.weight.data.normal_()
    layer.process_weights_after_loading()
    layer.process_weights_after_loading()  # idempotent
    assert isinstance(layer.quant_method, Fp8LinearMethod) and layer.weight.dtype == E4M3
    with pytest.raises(ValueError, match="already quantised"):
        use_fp8([layer])


def test_split_rows_slice_into_views_of_one_block() -> None:
    head, tail = torch.randn(3, 8), quantize_rows(torch.randn(5, 8))
    s = SplitRows(head, tail)
    assert s.shape == (8, 8) and s.split == 3
    assert s[:3] is not head and torch.equal(s[:3], head) and s[0:2].data_ptr() == head.data_ptr()
    assert same(s[3:], tail) and same(s[4:6], tail[1:3])
    mid = s[2:5]
    assert isinstance(mid, SplitRows) and mid.split == 1 and mid.shape == (3, 8)
    assert same(mid[1:], tail[:2])


# --- the tiny model ---------------------------------------------------------------------------------------------


class DequantizedReference:
    """A linear's quant method for the reference model: the layer's weight quantised by `ref_quantize` and
    multiplied as `ref_linear` (bf16/fp32 rows in; the norms and activations stay unfused)."""

    wants_fp8_input = False

    def __init__(self, layer: torch.nn.Module) -> None:
        self.wq, self.sw = ref_quantize(layer.weight.data)
        self.dtype = layer.weight.dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass

    def output_dtype(self, layer: torch.nn.Module) -> torch.dtype:
        return self.dtype

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = ref_linear(x, self.wq, self.sw, layer.bias if layer.adds_bias else None, self.dtype)
        return y if out is None else out.copy_(y)


GEN = ("self_attn.qkv_proj_moe_gen", "self_attn.o_proj_moe_gen", "mlp_moe_gen.gate_up_proj", "mlp_moe_gen.down_proj")
UND = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def reference(tiny_checkpoint: Path, names: tuple[str, ...]) -> Omni:
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE)
    for layer in omni.model.language_model.model.layers:
        for name in names:
            lin = layer.get_submodule(name)
            lin.quant_method = DequantizedReference(lin)
    return omni


@pytest.fixture(scope="module")
def plain(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE)


@pytest.fixture(scope="module")
def fp8_und(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE, quantization="fp8", fp8_und=True)


T2I = {"modality": "text2img", "prompt": "a red cat", "steps": 3, "height": 32, "width": 48, "seed": 3,
       "return_latents": True}


def prompt_logits(omni: Omni, ids: list[int]) -> torch.Tensor:
    """The last row's logits of a text prefill (understanding rows only)."""
    work = Work(Context(omni.stage.cache), TextPiece(torch.tensor(ids)), want_output=True)
    reserve_blocks([work])
    (logits,) = omni.stage.runner.execute([work])
    return logits


def test_only_the_generation_projections_are_fp8(fp8: Omni, fp8_und: Omni) -> None:
    for omni, und in ((fp8, False), (fp8_und, True)):
        model = omni.model
        for layer in model.language_model.model.layers:
            assert all(layer.get_submodule(n).weight.dtype == E4M3 for n in GEN)
            assert all((layer.get_submodule(n).weight.dtype == E4M3) == und for n in UND)
        others = [(n, p) for n, p in model.named_parameters() if p.dtype == E4M3 and "layers." not in n]
        assert others == []  # embeddings, norms, LM head, ViT, connector, embedders stay in the model dtype
        assert model.language_model.lm_head.weight.dtype == torch.float32


def test_text2img_matches_the_dequantised_reference(tiny_checkpoint: Path, plain: Omni, fp8: Omni) -> None:
    ref = reference(tiny_checkpoint, GEN)
    (got,), (want,), (bf,) = fp8.generate([T2I]), ref.generate([T2I]), plain.generate([T2I])
    # The same arithmetic in another order of kernels (fused quantisation vs quantise-then-multiply; the
    # forwards mix und and gen rows): equal to the bit.
    assert torch.equal(got.latents, want.latents)
    # FP8 moves the image, but by quantisation error, not by a different computation.
    assert not torch.equal(got.latents, bf.latents)
    assert (got.latents - bf.latents).abs().max() < 0.25 * bf.latents.abs().max()


def test_understanding_rows_are_untouched_without_fp8_und(plain: Omni, fp8: Omni) -> None:
    ids = [151644, 9707, 1052, 374, 264, 1273]
    assert torch.equal(prompt_logits(fp8, ids), prompt_logits(plain, ids))
    req = {"modality": "text2text", "prompt": "Hello there", "max_tokens": 6}
    assert fp8.generate([req])[0].token_ids == plain.generate([req])[0].token_ids


def test_fp8_und_text_matches_the_dequantised_reference(tiny_checkpoint: Path, plain: Omni, fp8_und: Omni) -> None:
    ids = [151644, 9707, 1052, 374, 264, 1273]
    ref = reference(tiny_checkpoint, GEN + UND)
    got, want, bf = prompt_logits(fp8_und, ids), prompt_logits(ref, ids), prompt_logits(plain, ids)
    assert torch.equal(got, want)
    assert not torch.equal(got, bf)  # the und expert really ran in FP8
    (img,), (img_ref,) = fp8_und.generate([T2I]), ref.generate([T2I])
    assert torch.equal(img.latents, img_ref.latents)


# --- options ---------------------------------------------------------------------------------------------------


def test_bad_quantization_values_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(EngineOptionError, match=r"quantization \(--quantization\) must be one of fp8"):
        EngineOptions.from_kwargs({"quantization": "int4"})
    with pytest.raises(EngineOptionError, match=r"fp8_und \(--fp8-und\)"):
        EngineOptions.from_kwargs({"fp8_und": "yes"})
    path = tmp_path / "q.yaml"
    path.write_text("quantization: int8\nstages:\n  - stage_id: 0\n")
    with pytest.raises(DeployConfigError, match="quantization: must be one of fp8"):
        load_deploy_config(path)


def test_fp8_und_needs_fp8(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(DeployConfigError, match=r"fp8_und: true needs quantization: fp8.*--quantization fp8"):
        Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE, fp8_und=True)
    path = tmp_path / "u.yaml"
    path.write_text("stages:\n  - stage_id: 0\n    fp8_und: true\n")
    with pytest.raises(DeployConfigError, match=r"stages\[0\]\.fp8_und: true needs quantization: fp8"):
        load_deploy_config(path)


def test_quantization_as_a_stage_key(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("stages:\n  - stage_id: 0\n    quantization: fp8\n    fp8_und: true\n")
    q = load_deploy_config(path).quantization_config()
    assert q is not None and q.method == "fp8" and q.fp8_und
    path.write_text("quantization: fp8\nstages:\n  - stage_id: 0\n  - stage_id: 1\n    fp8_und: true\n")
    cfg = load_deploy_config(path)
    with pytest.raises(NotImplementedError, match=r"stages share one copy of the weights"):
        cfg.require_runnable()
    path.write_text("quantization: fp8\nstages:\n  - stage_id: 0\n  - stage_id: 1\n")
    cfg = load_deploy_config(path)
    cfg.require_runnable()
    assert cfg.quantization_config().fp8_und is False


def test_old_gpus_are_refused_before_loading(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(Fp8UnsupportedError, match=r"compute capability 8\.9 or newer.*has 8\.0"):
        check_fp8_device(torch.device("cuda"), capability=(8, 0))
    check_fp8_device(torch.device("cuda"), capability=(8, 9))
    check_fp8_device(torch.device("cuda"), capability=(9, 0))
    check_fp8_device("cpu", torch.float32)
    with pytest.raises(Fp8UnsupportedError, match="bf16 weights on CUDA"):
        check_fp8_device(torch.device("cuda"), torch.float16, capability=(9, 0))
    # The loader asks before it reads a weight: a simulated sm_80 GPU fails with no tensor read.
    import bagel_serve.model.loader as loader

    def old_gpu(device: torch.device, dtype: torch.dtype) -> None:
        check_fp8_device(torch.device("cuda"), dtype=torch.bfloat16, capability=(8, 0))

    monkeypatch.setattr(loader, "check_fp8_device", old_gpu)
    monkeypatch.setattr(loader, "_load_into", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(Fp8UnsupportedError, match="8.0"):
        Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE, quantization="fp8")


def test_attention_outputs_quantised_on_their_way_match_the_projection_quantising_them(
        fp8: Omni, fp8_und: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large image's attention outputs leave their scatter as the FP8 output projection's e4m3 rows
    (`CudaBackend.packed_split`, on rows the QK-norm/RoPE kernel wrote in the packed order): the images are
    those of the plain packed path, whose projection quantises the outputs itself, to the bit. Run here with
    exact attention and every image counted as large."""
    from bagel_serve.layers import attention_backends as ab

    class Exact(ab.ExactBackend):
        def packs(self, query_counts, dtype):
            return True

    class PerSequence(ab.CudaBackend):
        splits = 0

        def attend(self, q, k, v, causal):
            return ab.exact_attention(q, k, v, causal)

        def packs(self, query_counts, dtype):
            return True

        def packed_split(self, *args):
            done = super().packed_split(*args)
            PerSequence.splits += done and args[-1] is not None  # rows prepacked by the QK-norm/RoPE kernel
            return done

    monkeypatch.setattr(ab, "CUDNN_MIN_QUERIES", 1)
    for omni in (fp8, fp8_und):
        runner = omni.stage.runner
        monkeypatch.setattr(runner, "backend", Exact())
        (want,) = omni.generate([T2I])
        monkeypatch.setattr(runner, "backend", PerSequence())
        (got,) = omni.generate([T2I])
        assert PerSequence.splits > 0
        assert torch.equal(got.latents, want.latents)
        PerSequence.splits = 0
