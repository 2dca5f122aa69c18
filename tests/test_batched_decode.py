"""The one batched decode path: every one-token step of every sequence attends in one call over the paged
cache, on every device; on the CPU that call is the exact float32 backend the golden suite holds.

Why batching may still change the last bits, and why the tests below are exact anyway: on the CPU a GEMM
rounds a row differently depending on how many rows share the call (MKL picks its kernels by shape), so a
sequence decoded alone and the same sequence decoded beside others can differ by a few float32 ulps. The
attention and everything else a row goes through is per row. So a sequence's results — its logits and the
K/V its step writes — are identical bit for bit whatever its companions are, as long as the batch keeps its
shape; that is what the first test asserts, with `torch.equal`. (The earlier batched-decode test compared two
attention implementations, whose layer-0 outputs differed by rounding, so the K/V of every later layer
differed too: there is only one implementation now.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bagel_serve import Omni
from bagel_serve.engine.kv_cache import Context, KVCache, slot_of
from bagel_serve.engine.runner import reserve_blocks
from bagel_serve.engine.sequence import Work
from bagel_serve.layers.attention_backends import DecodeBatch, ExactBackend, exact_attention
from bagel_serve.model.layout import TextPiece

GOLDEN = Path(os.environ.get("BAGEL_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))
EDIT = GOLDEN / "config_a" / "inputs" / "edit_rgb_150x100.png"


@pytest.fixture(scope="module")
def omni(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml")


def run(omni: Omni, works: list[Work]) -> list:
    reserve_blocks(works)
    return omni.stage.runner.execute(works)


def decode_beside(omni: Omni, companions_seed: int) -> tuple[list[torch.Tensor], torch.Tensor, Context]:
    """Sequence 0 (fixed token ids) and two companions (random ids of the same lengths) prefilled piecewise and
    interleaved, so their blocks interleave in the cache; then three decode steps of all three together.
    Returns sequence 0's logits per step, its K/V rows and its context."""
    stage = omni.stage
    vocab = 400
    gen = torch.Generator().manual_seed(companions_seed)
    lengths = [(5, 11, 3), (19, 2, 7), (4, 4, 4)]  # per prefill round: the three sequences' piece lengths
    first = torch.Generator().manual_seed(99)
    ctxs = [Context(stage.cache) for _ in range(3)]
    for rnd in lengths:
        pieces = [torch.randint(vocab, (rnd[0],), generator=first)]
        pieces += [torch.randint(vocab, (n,), generator=gen) for n in rnd[1:]]
        run(omni, [Work(c, TextPiece(p)) for c, p in zip(ctxs, pieces)])
    tables = [c.block_table for c in ctxs]
    assert any(b != a + 1 for t in tables for a, b in zip(t, t[1:])), "the blocks should interleave"
    logits = []
    for step in range(3):
        toks = [torch.tensor([11 + step])] + [torch.randint(vocab, (1,), generator=gen) for _ in range(2)]
        works = [Work(c, TextPiece(t), want_output=True, phase="decode") for c, t in zip(ctxs, toks)]
        logits.append(run(omni, works)[0])
    cache = stage.cache
    slots = ctxs[0].slots(0, ctxs[0].length)
    return logits, cache.tensor[:, :, slots].clone(), ctxs[0]


def test_a_sequence_does_not_depend_on_its_companions(omni: Omni) -> None:
    la, kva, ca = decode_beside(omni, companions_seed=1)
    lb, kvb, cb = decode_beside(omni, companions_seed=2)
    assert (ca.length, ca.rope) == (cb.length, cb.rope) == (31, 31)
    for a, b in zip(la, lb):
        assert torch.equal(a, b)
    assert torch.equal(kva, kvb)  # every layer's K/V of every row, the decoded ones included


def test_concurrent_streams_give_the_same_answers(omni: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = [{"modality": "text2text", "prompt": f"Question {i}: why?", "max_tokens": 12, "seed": i} for i in range(5)]
    reqs += [{"modality": "text2text", "prompt": "Think first", "max_tokens": 10, "think": True},
             {"modality": "img2text", "prompt": "What is it?", "image": str(EDIT), "max_tokens": 8},
             {"modality": "text2img", "prompt": "a cat", "steps": 3, "height": 32, "width": 32, "seed": 1, "think": True,
              "max_think_tokens": 6, "return_latents": True}]
    alone = [omni.generate([r])[0] for r in reqs]
    runner = omni.stage.runner
    decodes: list[int] = []
    real = runner.execute

    def counting(works):
        decodes.append(sum(w.is_decode for w in works))
        return real(works)

    monkeypatch.setattr(runner, "execute", counting)
    together = omni.generate(reqs)
    assert max(decodes) == 8  # all eight text streams (the text2img plan too) decoded in one forward
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids and a.text == b.text and a.think_text == b.think_text
        if a.latents is not None:
            assert torch.allclose(a.latents, b.latents, rtol=1e-4, atol=1e-4)


def test_one_forward_reads_one_cache(omni: Omni) -> None:
    """Contexts of two caches in one forward are refused before their rows are placed (the placing uses the
    first work's block size)."""
    stage = omni.stage
    llm = stage.cfg.llm
    other = KVCache(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, 8, block_size=4)
    ctx = Context(stage.cache)
    run(omni, [Work(ctx, TextPiece(torch.arange(20)))])
    works = [Work(Context(other), TextPiece(torch.arange(2))), Work(ctx, TextPiece(torch.tensor([3])))]
    with pytest.raises(RuntimeError, match="must live in one KV cache"):
        run(omni, works)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (28, 4, 128)])
def test_a_decode_step_is_exact_attention_over_its_rows(heads: int, kv_heads: int, dim: int) -> None:
    """The exact backend's decode (the paged kernel's twin) is, bit for bit, `exact_attention` of each
    step's query over its sequence's cached rows: the CPU judge decodes as it prefills."""
    g = torch.Generator().manual_seed(0)
    block, lens = 16, [37, 1, 150]
    k_cache, v_cache = (torch.randn(40 * block, kv_heads, dim, generator=g) for _ in range(2))
    tables = torch.stack([torch.randperm(39, generator=g)[:10] + 1 for _ in lens]).int()
    q = torch.randn(len(lens), heads, dim, generator=g)
    out = torch.empty_like(q)
    batch = DecodeBatch(len(lens), tables, torch.tensor(lens, dtype=torch.int32), block)
    ExactBackend().decode(q, k_cache, v_cache, batch, out)
    for i, n in enumerate(lens):
        slots = torch.tensor([slot_of(tables[i].tolist(), r, block) for r in range(n)])
        assert torch.equal(out[i : i + 1], exact_attention(q[i : i + 1], k_cache[slots], v_cache[slots], causal=False))
