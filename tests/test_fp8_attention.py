"""FP8 attention (`fp8_attention`): its definition, the loader's switch, the engine paths on the CPU, the
refusals, and on a Hopper GPU with the cuDNN frontend, cuDNN's kernel against the definition."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from bagel_serve import Omni
from bagel_serve.layers import attention_backends as ab
from bagel_serve.layers import fp8_attention as fa
from bagel_serve.layers.attention import Attention
from bagel_serve.layers.fp8 import Fp8UnsupportedError
from bagel_serve.layers.kernels.gather import ATTENTION_SCALES, pack_attention_rows_fp8_native
from bagel_serve.layers.kernels.quant import FP8_DTYPE

SINGLE_STAGE = "bagel_single_stage.yaml"
T2I = {"modality": "text2img", "prompt": "a red cat", "steps": 3, "height": 32, "width": 48, "seed": 3,
       "return_latents": True}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def operands(lq: int, lk: int, hq: int = 4, hkv: int = 2, d: int = 32, seed: int = 0, device: str = "cpu",
             dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(lq, hq, d, generator=g) * 2).to(dtype).to(device)
    k = (torch.randn(lk, hkv, d, generator=g) * 2).to(dtype).to(device)
    v = torch.randn(lk, hkv, d, generator=g).to(dtype).to(device)
    return q, k, v


def test_the_definition_is_attention_within_fp8_rounding() -> None:
    q, k, v = operands(40, 56, dtype=torch.float32)
    exact = ab.exact_attention(q, k, v, False)
    got = fa.fp8_attention_native(q, k, v)
    assert got.dtype == q.dtype and got.shape == q.shape
    err = rel(got, exact)
    assert 0.005 < err < 0.15, err  # e4m3 operands and probabilities: a few per cent, not another computation
    # The output is e4m3 at twice V's scale: every value is such a number.
    steps = got / (2 * v.abs().max() / 448)
    assert torch.allclose(steps.to(FP8_DTYPE).float(), steps, rtol=1e-6, atol=0)
    assert fa.fp8_attention_native(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.bfloat16


def test_the_packing_scales_are_the_definitions() -> None:
    """The engine's GPU path quantises through the packing kernel's twin; the CPU path through the definition
    on each sequence: both name the same scales and give the same output."""
    q, k, v = operands(12, 12, seed=1)
    k_cache, v_cache = (t * 3 for t in operands(6, 6, seed=2)[1:])
    q_rows = torch.arange(12)
    kv_src = torch.cat([-torch.arange(6) - 1, torch.arange(12), torch.tensor([-1])])  # 6 cached keys, then new
    cu_q, cu_k = torch.tensor([0, 12], dtype=torch.int32), torch.tensor([0, 18], dtype=torch.int32)
    q8, k8, v8, scales = pack_attention_rows_fp8_native(q, k, v, k_cache, v_cache, q_rows, kv_src, cu_q, cu_k)
    keys, values = torch.cat([k_cache, k]), torch.cat([v_cache, v])
    row = dict(zip(ATTENTION_SCALES, scales[0, :, 0].tolist()))
    o8 = fa.fp8_attention_reference(q8, k8[:18], v8[:18], scales[0])
    want = fa.fp8_attention_native(q, keys, values)
    assert torch.equal((o8.float() * row["descale_o"]).to(q.dtype), want)
    assert row["descale_v"] == (values.float().abs().max() / 448).item() and row["scale_s"] == 448.0


def test_only_large_denoising_sequences_take_it() -> None:
    big = [(0, 2), (10, fa.FP8_ATTENTION_MIN_QUERIES - 2)]
    assert ab.fp8_sequence(ab.SequenceAttention(big, False, None, big))
    assert not ab.fp8_sequence(ab.SequenceAttention(big, True, None, big))  # a causal prompt
    assert not ab.fp8_sequence(ab.SequenceAttention(big, False, None, []))  # stored rows: a prefill's image
    small = [(0, 2), (10, 100)]
    assert not ab.fp8_sequence(ab.SequenceAttention(small, False, None, small))


@pytest.fixture(scope="module")
def fp8_attention(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE, quantization="fp8", fp8_attention=True)


def attention_modules(omni: Omni) -> list[Attention]:
    return [m for m in omni.model.modules() if isinstance(m, Attention)]


def test_the_loader_switches_every_layer(fp8: Omni, fp8_attention: Omni) -> None:
    assert attention_modules(fp8_attention) and all(m.fp8 for m in attention_modules(fp8_attention))
    assert not any(m.fp8 for m in attention_modules(fp8))


def test_small_images_and_text_are_untouched(fp8: Omni, fp8_attention: Omni) -> None:
    (a,), (b,) = fp8.generate([T2I]), fp8_attention.generate([T2I])
    assert torch.equal(a.latents, b.latents)  # 6 latents: under the cut-off
    req = {"modality": "text2text", "prompt": "Hello there", "max_tokens": 6}
    assert fp8.generate([req])[0].token_ids == fp8_attention.generate([req])[0].token_ids


def test_large_images_move_by_fp8_rounding_on_both_paths(fp8: Omni, fp8_attention: Omni,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With every image counted as large: the CPU path (the definition per sequence) and the GPU path's form
    (packed e4m3 operands, the kernel replaced by the definition, e4m3 outputs handed to the FP8 o_proj as they
    are) both move the image by rounding, and stay within rounding of each other (the o_proj re-quantises the
    CPU path's dequantised outputs per row, so not to the bit)."""
    monkeypatch.setattr(ab, "FP8_ATTENTION_MIN_QUERIES", 1)
    monkeypatch.setattr(ab, "CUDNN_MIN_QUERIES", 1)
    (base,) = fp8.generate([T2I])
    (cpu,) = fp8_attention.generate([T2I])

    class Definition:
        calls = 0

        def __call__(self, q8, k8, v8, scales, out):
            Definition.calls += 1
            out.copy_(fa.fp8_attention_reference(q8, k8, v8, scales))

    class PerSequence(ab.CudaBackend):
        def __init__(self) -> None:
            self._fp8 = Definition()

        def attend(self, q, k, v, causal):
            return ab.exact_attention(q, k, v, causal)

        def packs(self, query_counts, dtype):
            return True

    monkeypatch.setattr(fp8_attention.stage.runner, "backend", PerSequence())
    (gpu_form,) = fp8_attention.generate([T2I])
    assert Definition.calls > 0
    scale = base.latents.abs().max()
    for moved in (cpu.latents, gpu_form.latents):
        assert not torch.equal(moved, base.latents)
        assert (moved - base.latents).abs().max() < 0.25 * scale
    assert (cpu.latents - gpu_form.latents).abs().max() < 0.25 * scale


def test_unsupported_gpus_and_a_missing_frontend_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(Fp8UnsupportedError, match=r"fp8_attention.*compute capability 9\.0 or newer.*has 8\.9"):
        fa.check_fp8_attention_device("cuda", capability=(8, 9))
    fa.check_fp8_attention_device("cpu")
    monkeypatch.setitem(sys.modules, "cudnn", None)  # the frontend not installed
    with pytest.raises(Fp8UnsupportedError, match=r"pip install 'bagel-serve\[fp8-attention\]'"):
        fa.check_fp8_attention_device("cuda", capability=(9, 0))


def test_the_loader_asks_before_reading_weights(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bagel_serve.model.loader as loader

    def hopper_without_frontend(device, capability=None) -> None:
        monkeypatch.setitem(sys.modules, "cudnn", None)
        fa.check_fp8_attention_device("cuda", capability=(9, 0))

    monkeypatch.setattr(loader, "check_fp8_attention_device", hopper_without_frontend)
    monkeypatch.setattr(loader, "_load_into", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(Fp8UnsupportedError, match="nvidia-cudnn-frontend"):
        Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE, quantization="fp8", fp8_attention=True)


def _cudnn_fp8_ready() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < fa.FP8_ATTENTION_MIN_CAPABILITY:
        return False
    try:
        fa._cudnn()
    except Fp8UnsupportedError:
        return False
    return True


@pytest.mark.skipif(not _cudnn_fp8_ready(), reason="needs a Hopper-or-newer GPU and the cuDNN frontend")
@pytest.mark.parametrize("lq, lk", [(4098, 4128), (2050, 2060)])
def test_cudnn_matches_the_definition(lq: int, lk: int) -> None:
    """On the same e4m3 operands and scales, cuDNN's kernel and the definition differ by its online softmax's
    roundings only: far less than FP8 attention differs from exact attention."""
    c = lk - lq
    q, kn, vn = operands(lq, lq, hq=28, hkv=4, d=128, device="cuda")  # the forward's rows
    kc, vc = operands(1, c, hq=28, hkv=4, d=128, seed=1, device="cuda")[1:]  # the cached context
    kv_src = torch.cat([-torch.arange(c) - 1, torch.arange(lq), torch.tensor([-1])]).cuda()  # + the padding row
    cu_q = torch.tensor([0, lq], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, lk], dtype=torch.int32, device="cuda")
    q8, k8, v8, scales = ab.pack_attention_rows_fp8(q, kn, vn, kc, vc, torch.arange(lq, device="cuda"), kv_src,
                                                    cu_q, cu_k)
    out = torch.empty_like(q8)
    fa.CudnnFp8Attention()(q8, k8[:lk], v8[:lk], scales[0], out)
    descale_o = scales[0, ATTENTION_SCALES.index("descale_o"), 0].item()
    got = out.float().cpu() * descale_o
    want = fa.fp8_attention_reference(q8.cpu(), k8[:lk].cpu(), v8[:lk].cpu(), scales[0].cpu()).float() * descale_o
    exact = ab.exact_attention(q.float(), torch.cat([kc, kn]).float(), torch.cat([vc, vn]).float(), False).cpu()
    to_exact, to_definition = rel(want, exact), rel(got, want)
    assert 0.01 < to_exact < 0.2, to_exact
    assert to_definition < 0.5 * to_exact, (to_definition, to_exact)
    assert math.isfinite(got.abs().max().item())
