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

    def spy(x, n_und, und, gen, reduce=False, out=None):
        seen.append(x.shape[0])
        return real(x, n_und, und, gen, reduce, out)

    monkeypatch.setattr(mot, "MLP_CHUNK_ROWS", 4)
    monkeypatch.setattr(mot, "CHUNK_ALIGN", 1)
    monkeypatch.setattr(mot, "expert_linear", spy)
    torch.testing.assert_close(mot.expert_mlp(x, n_und, und, gen), whole, rtol=1e-5, atol=1e-6)
    assert seen == [3, 3, 3, 3, 4, 4], seen  # gate-up and down of three near-equal chunks
    seen.clear()
    monkeypatch.setattr(mot, "CHUNK_ALIGN", 2)
    torch.testing.assert_close(mot.expert_mlp(x, n_und, und, gen), whole, rtol=1e-5, atol=1e-6)
    assert sum(seen) == 20 and len(seen) > 2, seen


def test_chunk_bounds_fall_on_whole_tiles_of_each_expert():
    # Two CFG branches of a 1024x1024 image: 4 boundary rows, then 8,192 latents in two chunks of 4,096.
    assert mot.chunk_bounds(8196, 4, 8192, 128) == [0, 4100, 8196]
    assert mot.chunk_bounds(8196, 0, 8192, 128) == [0, 4096, 8196]
    assert mot.chunk_bounds(8192, 0, 8192, 128) == [0, 8192]
    for n, n_und in ((65568, 16), (20000, 20000), (9000, 5000), (16392, 8), (8193, 1)):
        bounds = mot.chunk_bounds(n, n_und, 8192, 128)
        assert bounds[0] == 0 and bounds[-1] == n and bounds == sorted(set(bounds))
        assert len(bounds) - 1 == -(-n // 8192)
        for b in bounds[1:-1]:
            assert (b - (0 if b <= n_und else n_und)) % 128 == 0, (n, n_und, bounds)
        assert max(b - a for a, b in zip(bounds, bounds[1:])) <= 8192 + 128


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


def _packed_case(g: torch.Generator):
    """Three unmasked sequences apart in one forward's rows: two with cached keys, one without."""
    rows, hq, hkv, d = 30, 4, 2, 8
    q, k, v = (torch.randn(rows, h, d, generator=g) for h in (hq, hkv, hkv))
    k_cache, v_cache = torch.randn(40, hkv, d, generator=g), torch.randn(40, hkv, d, generator=g)
    seqs = [([(0, 2), (10, 7)], torch.tensor([3, 4, 9, 15, 30])),
            ([(2, 2), (17, 7)], torch.tensor([5, 6])),
            ([(4, 2), (24, 6)], None)]
    return q, k, v, k_cache, v_cache, seqs


@pytest.mark.parametrize("capacity", [None, 12])
def test_packed_attention_equals_one_call_per_sequence(capacity):
    """One packed call (each sequence's cached keys, then its own rows' keys, in a shared buffer; cached keys
    padded to a graph's capacity or not) gives every row what its sequence's own call gives, and touches no
    other row. (The exact backend attends a sequence's two segments in two matmuls and the packed form in one,
    so the float32 sums may round apart in the last bit; the CUDA test below holds the flash kernels to the
    bit.)"""
    from bagel_serve.layers.attention_backends import (ExactBackend, PackedAttention, SequenceAttention,
                                                       pack_sequences)

    q, k, v, k_cache, v_cache, seqs = _packed_case(torch.Generator().manual_seed(0))
    want = torch.full_like(q, float("nan"))
    for segments, slots in seqs:
        ExactBackend().sequence(q, k, v, SequenceAttention(segments, False, slots, segments), k_cache, v_cache, want)
    q_rows = [torch.cat([torch.arange(a, a + n) for a, n in segments]) for segments, _ in seqs]
    fields = pack_sequences(q_rows, [slots for _, slots in seqs], capacity)
    if capacity is not None:
        assert fields["ctx_src"].numel() == capacity and fields["k_rows"] == capacity + 26 + 1
    got = torch.full_like(q, float("nan"))
    ExactBackend().packed(q, k, v, PackedAttention(**fields), k_cache, v_cache, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(got[6:10]).all() and not torch.isnan(got[:6]).any()
    # A sequence given another's cached keys would not pass.
    wrong = pack_sequences(q_rows, [seqs[1][1], seqs[0][1], None], capacity)
    other = torch.zeros_like(q)
    ExactBackend().packed(q, k, v, PackedAttention(**wrong), k_cache, v_cache, other)
    assert not torch.allclose(other[:2], want[:2])


def test_packed_outputs_of_every_row_go_back_by_one_gather():
    """When the sequences' queries are all the forward's rows (in any order), the outputs return to their rows
    by the inverse permutation's gather, and land where the scatter puts them; a forward with rows outside the
    sequences keeps the scatter."""
    from dataclasses import replace

    from bagel_serve.layers.attention_backends import PackedAttention, pack_sequences, unpack_rows

    q_rows = [torch.tensor([0, 1, 4, 5, 6]), torch.tensor([2, 3, 7, 8, 9])]
    p = PackedAttention(**pack_sequences(q_rows, [torch.arange(3), None]))
    assert torch.equal(p.q_rows[p.inv_rows], torch.arange(10))
    o = torch.randn(10, 2, 4)
    gathered, scattered = torch.full_like(o, float("nan")), torch.full_like(o, float("nan"))
    unpack_rows(o, p, gathered)
    unpack_rows(o, replace(p, inv_rows=None), scattered)
    assert torch.equal(gathered, scattered)
    assert pack_sequences([torch.tensor([0, 2])], [None])["inv_rows"] is None, "row 1 is not a query"


def test_packing_refuses_a_capacity_below_the_cached_keys():
    from bagel_serve.layers.attention_backends import pack_sequences

    with pytest.raises(ValueError, match="7 cached keys do not fit a packed capacity of 6"):
        pack_sequences([torch.arange(3)], [torch.arange(7)], 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend's packed call needs a GPU")
@pytest.mark.parametrize("latents", [1024, 2048])
def test_cuda_packed_attention_is_bitwise_one_call_per_sequence(latents: int):
    """At 512x512 (1,026 queries a sequence) the packed varlen flash call gives each sequence the bits its own
    flash call gives. (Below about 1,000 queries the per-sequence kernel splits the keys over thread blocks, by
    a heuristic the varlen kernel does not apply, and the sums round apart.) From cuDNN's cut-off on, each
    sequence keeps its own call on rows packed in one launch: the same bits again."""
    from bagel_serve.layers.attention_backends import CudaBackend, PackedAttention, SequenceAttention, pack_sequences
    from bagel_serve.layers.kernels.gather import PackedQKV, pack_attention_rows
    from bagel_serve.layers.kernels.quant import empty_rows, quantize_rows_native

    g = torch.Generator().manual_seed(0)
    n, hq, hkv, d = 2 * 2 + 2 * latents, 28, 4, 128
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to("cuda", torch.bfloat16)
    q, k, v = (qkv[:, a * d : b * d].view(n, b - a, d) for a, b in ((0, hq), (hq, hq + hkv), (hq + hkv, hq + 2 * hkv)))
    k_cache, v_cache = (torch.randn(500, hkv, d, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    seqs = [([(0, 2), (4, latents)], torch.arange(100, 160)), ([(2, 2), (4 + latents, latents)], torch.arange(7, 12))]
    want = torch.zeros_like(q)
    for segments, slots in seqs:
        CudaBackend().sequence(q, k, v, SequenceAttention(segments, False, slots.cuda(), segments), k_cache, v_cache,
                               want)
    q_rows = [torch.cat([torch.arange(a, a + m) for a, m in segments]) for segments, _ in seqs]
    for capacity in (None, 256):
        f = pack_sequences(q_rows, [slots for _, slots in seqs], capacity)
        p = PackedAttention(**{a: b.cuda() if isinstance(b, torch.Tensor) else b for a, b in f.items()})
        got = torch.zeros_like(q)
        CudaBackend().packed(q, k, v, p, k_cache, v_cache, got)
        assert torch.equal(got, want)
        # Rows the QK-norm/RoPE kernel wrote in the packed order (the cached keys' rows still empty), with q, k
        # and v themselves unread: the same bits.
        qp, kp, vp = pack_attention_rows(q, k, v, k_cache, v_cache, p.q_rows, p.kv_src)
        kp[p.ctx_dst], vp[p.ctx_dst] = float("nan"), float("nan")
        rows = PackedQKV(qp, kp, vp, p.inv_rows, p.kv_rows)
        assert CudaBackend().prepacks(p) and not CudaBackend().prepacks(p, fp8=True)
        got = torch.zeros_like(q)
        nan = [x.new_full(x.shape, float("nan")) for x in (q, k, v)]
        CudaBackend().packed(*nan, p, k_cache, v_cache, got, rows)
        assert torch.equal(got, want)
        # The per-sequence form can hand an FP8 output projection its rows quantised; the varlen one does not.
        head, tail = empty_rows(4, hq * d, q, False), empty_rows(n - 4, hq * d, q, True)
        assert CudaBackend().packed_split(q, k, v, p, k_cache, v_cache, head, tail) == (latents >= 2048)
        if latents >= 2048:
            flat = want.view(n, hq * d)
            ref = quantize_rows_native(flat[4:])
            assert torch.equal(head, flat[:4]) and torch.equal(tail.scale, ref.scale)
            assert torch.equal(tail.data.view(torch.uint8), ref.data.view(torch.uint8))
