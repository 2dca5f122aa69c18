"""The layers' own contracts, on the CPU: the MoT expert pair splits rows by range, in chunks or not."""

from __future__ import annotations

import pytest
import torch

from bagel_serve.layers import mot
from bagel_serve.model.qwen2_mot import MLP


def _mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    m = MLP(16, 24)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


@pytest.mark.parametrize("n_und", [0, 3, 7, 10])
def test_expert_mlp_in_equal_chunks_equals_one_pass(monkeypatch, n_und):
    und, gen = _mlp(0), _mlp(1)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    whole = mot.expert_mlp(x, n_und, und, gen)
    # Each row by its own expert, one row at a time: the definition.
    want = torch.stack([(und if i < n_und else gen).down_proj(torch.nn.functional.silu(
        (und if i < n_und else gen).gate_up_proj(x[i : i + 1])[:, :24]) * (und if i < n_und else gen).gate_up_proj(
        x[i : i + 1])[:, 24:])[0] for i in range(10)])
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-6)
    seen = []
    real = mot.expert_linear

    def spy(x, n_und, und, gen, reduce=False):
        seen.append(x.shape[0])
        return real(x, n_und, und, gen, reduce)

    monkeypatch.setattr(mot, "MLP_CHUNK_ROWS", 4)
    monkeypatch.setattr(mot, "expert_linear", spy)
    torch.testing.assert_close(mot.expert_mlp(x, n_und, und, gen), whole, rtol=1e-5, atol=1e-6)
    assert seen == [3, 3, 3, 3, 4, 4], seen  # gate-up and down of three near-equal chunks


def test_cuda_backend_attends_an_image_block_in_one_call(monkeypatch):
    """The rows of an image block (boundary tokens and latents, apart in the forward) go to one kernel call
    over the context and their own rows, and land in their own rows: the same as one call per segment."""
    from bagel_serve.layers.attention_backends import CudaBackend, ExactBackend, SequenceAttention, exact_attention

    g = torch.Generator().manual_seed(0)
    rows, hq, hkv, d = 12, 4, 2, 8
    q, k, v = (torch.randn(rows, h, d, generator=g) for h in (hq, hkv, hkv))
    k_cache, v_cache = torch.randn(20, hkv, d, generator=g), torch.randn(20, hkv, d, generator=g)
    segments = [(1, 2), (6, 5)]
    seq = SequenceAttention(segments, False, torch.tensor([3, 4, 9, 15]), segments)
    calls = []

    def attend(self, q, k, v, causal):
        calls.append(q.shape[0])
        return exact_attention(q, k, v, causal)

    monkeypatch.setattr(CudaBackend, "attend", attend)
    got, want = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    CudaBackend().sequence(q, k, v, seq, k_cache, v_cache, got)
    ExactBackend().sequence(q, k, v, seq, k_cache, v_cache, want)
    assert calls == [7]
    for a, n in segments:
        torch.testing.assert_close(got[a : a + n], want[a : a + n], rtol=1e-6, atol=1e-6)
    assert torch.isnan(got[0]).all() and torch.isnan(got[3:6]).all()  # other rows untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend's varlen call needs a GPU")
def test_cuda_vit_attention_over_several_images_in_one_call():
    from bagel_serve.layers.attention_backends import CudaBackend, ExactBackend

    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [5, 64, 17]
    q, k, v = (torch.randn(sum(lengths), 16, 72, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    got = CudaBackend().self_attention(q, k, v, lengths)
    want = ExactBackend().self_attention(q, k, v, lengths)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
