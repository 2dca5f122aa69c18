"""Batched decode attention (the CUDA path), exercised on the CPU against the exact per-sequence path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bagel_serve import Omni
from bagel_serve.engine.batch import TextPiece
from bagel_serve.engine.kv_cache import KVPool
from bagel_serve.engine.runner import Runner, Work

EDIT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "config_a" / "inputs" / "edit_rgb_150x100.png"


@pytest.fixture(scope="module")
def omni(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml")


def scattered_runner(omni: Omni) -> Runner:
    """A runner whose pool has two-block slabs, so contexts span slabs and interleave."""
    r = Runner(omni.runner.model, omni.runner.vae, omni.runner.tok)
    p = r.pool
    r.pool = KVPool(p.num_layers, p.num_kv_heads, p.head_dim, p.dtype, p.device, block_size=4, slab_blocks=2)
    return r


def test_one_decode_step_matches_the_per_sequence_path(omni: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    from bagel_serve.engine import batch

    grouped: list[int] = []
    real = batch._DecodeGroup.run
    monkeypatch.setattr(batch._DecodeGroup, "run", lambda self, *a: (grouped.append(len(self.seqs)), real(self, *a)))
    prompts = ["Hello there", "A much longer prompt that spans several blocks of the pool, or more", "x"]
    runs = []
    for batched in (False, True):
        r = scattered_runner(omni)
        r.packer.batch_decode = batched
        ctxs = [r._empty() for _ in prompts]
        for step in range(3):  # prefill the prompts piecewise, interleaved, so their blocks interleave
            r._forward([Work(c, TextPiece(torch.tensor(r.tok.segment(f"{p} {step}")))) for c, p in zip(ctxs, prompts)])
        assert r.pool.num_slabs > 2
        logits = []
        for tok in (11, 12, 13):  # three decode steps of all three sequences together
            works = [Work(c, TextPiece(torch.tensor([tok + i])), want_output=True, phase="decode")
                     for i, c in enumerate(ctxs)]
            logits.append(torch.stack(r._forward(works)))
        runs.append((ctxs, torch.stack(logits)))
    (ca, la), (cb, lb) = runs
    assert grouped == [3] * (3 * omni.config.llm.num_hidden_layers)  # every layer of every batched step
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-5)  # same math, another reduction order
    for a, b in zip(ca, cb):
        assert (a.length, a.rope) == (b.length, b.rope)
        for layer in range(a.num_layers):
            ka, va = a.keys(layer)
            kb, vb = b.keys(layer)
            assert torch.allclose(ka, kb, rtol=1e-5, atol=1e-6) and torch.allclose(va, vb, rtol=1e-5, atol=1e-6)


def test_decode_groups_stay_within_the_row_bound(omni: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequences are grouped by context length so that no group gathers more padded rows than the bound;
    the results do not depend on the grouping."""
    from bagel_serve.engine import batch

    prompts = ["a", "a bit longer prompt here", "the longest prompt of the three, by a good margin indeed"]
    outs = {}
    for bound in (1 << 18, 40):
        monkeypatch.setattr(batch, "MAX_PADDED_DECODE_ROWS", bound)
        r = scattered_runner(omni)
        r.packer.batch_decode = True
        ctxs = [r._empty() for _ in prompts]
        r._forward([Work(c, TextPiece(torch.tensor(r.tok.segment(p)))) for c, p in zip(ctxs, prompts)])
        lens = [c.length + 1 for c in ctxs]
        sizes = []
        real = batch._DecodeGroup.__init__

        def init(self, seqs, device):
            sizes.append(len(seqs) * max(s.context.length + 1 for s in seqs))
            real(self, seqs, device)

        monkeypatch.setattr(batch._DecodeGroup, "__init__", init)
        works = [Work(c, TextPiece(torch.tensor([7])), want_output=True, phase="decode") for c in ctxs]
        outs[bound] = torch.stack(r._forward(works))
        monkeypatch.setattr(batch._DecodeGroup, "__init__", real)
        if bound == 40:
            assert len(sizes) > 1 and max(sizes) <= max(40, max(lens))
        else:
            assert len(sizes) == 1
    # Other padding, other reduction order: a few float32 ulps (seen: 1.7e-6 on logits of magnitude 4).
    assert torch.allclose(outs[1 << 18], outs[40], rtol=1e-5, atol=1e-5)


def test_batched_decode_gives_the_same_answers(omni: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = [{"modality": "text2text", "prompt": f"Question {i}: why?", "max_tokens": 12, "seed": i} for i in range(5)]
    reqs += [{"modality": "text2text", "prompt": "Think first", "max_tokens": 10, "think": True},
             {"modality": "img2text", "prompt": "What is it?", "image": str(EDIT), "max_tokens": 8},
             {"modality": "text2img", "prompt": "a cat", "steps": 3, "height": 32, "width": 32, "seed": 1, "think": True,
              "max_think_tokens": 6, "return_latents": True}]
    alone = omni.generate(reqs)
    monkeypatch.setattr(omni.runner.packer, "batch_decode", True)
    groups: list[int] = []
    real = omni.runner.packer.run

    def run(specs):
        hidden, batch, seqs = real(specs)
        groups.append(sum(len(g.seqs) for g in batch.decode))
        return hidden, batch, seqs

    monkeypatch.setattr(omni.runner.packer, "run", run)
    together = omni.generate(reqs)
    assert max(groups) == 8  # all eight text streams (the text2img plan too) decoded in one grouped attention
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids and a.text == b.text and a.think_text == b.think_text
        if a.latents is not None:
            assert torch.allclose(a.latents, b.latents, rtol=1e-4, atol=1e-4)
