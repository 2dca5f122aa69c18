"""Serving engine: continuous batching, chunked prefill, streaming, and the two-stage topology."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bagel_serve import Omni
from bagel_serve.engine.diffusion import Handoff, HandoffError
from bagel_serve.engine.kv_cache import KVCache
from bagel_serve.engine.request import make_request
from bagel_serve.engine.scheduler import SchedulerConfig
from bagel_serve.engine.sequence import DECODE_STEPS
from bagel_serve.engine.stage_engine import GATHER_MAX_S, GATHER_QUIET_S, Engine, Stage
from bagel_serve.model.layout import TextPiece

ROOT = Path(__file__).resolve().parents[1]
EDIT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "config_a" / "inputs" / "edit_rgb_150x100.png"


@pytest.fixture(scope="module")
def single(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml")


@pytest.fixture(scope="module")
def two_stage(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config="bagel.yaml", worker_backend="inline")


@pytest.fixture(scope="module")
def two_stage_think(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_think.yaml",
                worker_backend="inline")


CASES = [
    {"modality": "text2text", "prompt": "Hello there", "max_tokens": 8},
    {"modality": "text2text", "prompt": "Why?", "max_tokens": 8, "think": True},
    {"modality": "img2text", "prompt": "What is it?", "image": str(EDIT), "max_tokens": 6},
    {"modality": "img2text", "prompt": "What is it?", "image": str(EDIT), "max_tokens": 6, "think": True},
    {"modality": "text2img", "prompt": "a cat", "steps": 4, "height": 32, "width": 48, "seed": 1, "return_latents": True},
    {"modality": "text2img", "prompt": "a cat", "steps": 4, "height": 32, "width": 32, "seed": 2, "think": True,
     "max_think_tokens": 5, "return_latents": True, "cfg_img_scale": 2.0, "negative_prompt": "dog"},
    {"modality": "img2img", "prompt": "blue", "image": str(EDIT), "steps": 3, "seed": 3, "return_latents": True,
     "cfg_interval": (0.0, 1.0), "cfg_renorm_type": "text_channel"},
    {"modality": "img2img", "prompt": "blue", "image": str(EDIT), "steps": 3, "seed": 4, "return_latents": True,
     "think": True, "max_think_tokens": 4},
]


def same(a, b, exact: bool = True) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text and a.think_text == b.think_text
    if a.latents is not None:
        if exact:
            assert torch.equal(a.latents, b.latents)
            assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
        else:
            assert torch.allclose(a.latents, b.latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_two_stage_equals_single_stage(single: Omni, two_stage: Omni, two_stage_think: Omni, case: int) -> None:
    req = CASES[case]
    (a,) = single.generate([req])
    (b,) = two_stage.generate([req])
    (c,) = two_stage_think.generate([req])
    same(a, b)
    same(a, c)
    assert two_stage.last_stats.requests == 1


def test_32_mixed_concurrent_requests(single: Omni, two_stage: Omni) -> None:
    reqs = [dict(CASES[i % len(CASES)], prompt=f"{CASES[i % len(CASES)]['prompt']} #{i}") for i in range(32)]
    alone = [single.generate([r])[0] for r in reqs]
    for omni in (single, two_stage):
        together = omni.generate(reqs)
        assert len(together) == 32
        for a, b in zip(alone, together):
            same(a, b, exact=False)


def test_stage_limits_and_chunked_prefill(single: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = single.stage
    runner = stage.runner
    rows_per_forward: list[int] = []
    orig = runner.execute

    def spy(works):
        rows_per_forward.append(sum(w.piece.ids.shape[0] for w in works if isinstance(w.piece, TextPiece)))
        return orig(works)

    monkeypatch.setattr(runner, "execute", spy)
    long_prompt = "one two three four five six seven eight nine ten " * 3
    reqs = [make_request({"modality": "text2text", "prompt": long_prompt, "max_tokens": 4}, i) for i in range(3)]
    engine = Engine(stage, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8))
    for i, r in enumerate(reqs):
        engine.add_request(i, r)
    running_sizes = []
    outs = {}
    while engine.has_work():
        engine.step()
        running_sizes.append(len(engine.running))
        outs.update({rid: res for rid, res, err in engine.pop_finished()})
    assert max(running_sizes) <= 2
    assert max(rows_per_forward) <= 8  # the prompt (~40 tokens) was prefilled in chunks of at most 8 rows
    monkeypatch.setattr(runner, "execute", orig)
    (ref,) = single.generate([reqs[0]])
    assert all(o.token_ids == ref.token_ids for o in outs.values())


def test_new_request_joins_running_decodes(single: Omni) -> None:
    engine = Engine(single.stage)
    a = make_request({"modality": "text2text", "prompt": "first", "max_tokens": 30}, 0)
    b = make_request({"modality": "text2text", "prompt": "second", "max_tokens": 4}, 1)
    engine.add_request(0, a)
    for _ in range(5):
        engine.step()
    assert engine.running and not engine.finished
    engine.add_request(1, b)
    forwards_before = engine.stats.forwards
    engine.step()  # b's prompt prefill runs in the same forward as a's next decode token
    assert engine.stats.forwards == forwards_before + 1 and len(engine.running) == 2
    results = {}
    while engine.has_work():
        engine.step()
        results.update({rid: res for rid, res, _ in engine.pop_finished()})
    assert results[1].token_ids == single.generate([b])[0].token_ids


def test_an_idle_engine_gathers_a_burst_before_its_first_step(single: Omni) -> None:
    """A driving loop holds an idle engine's first step while requests keep arriving less than
    GATHER_QUIET_S apart (never longer than GATHER_MAX_S), so a burst prefills in one forward; a running
    engine, or one that does not gather (the ranks of a multi-rank stage), never holds."""
    engine = Engine(single.stage)
    req = {"modality": "text2text", "prompt": "hi", "max_tokens": 2}
    engine.add_request(0, make_request(req, 0))
    assert engine.hold_s() == 0.0  # gathers is off by default
    engine.gathers = True
    assert 0.0 < engine.hold_s() <= GATHER_QUIET_S
    time.sleep(GATHER_QUIET_S)
    assert engine.hold_s() == 0.0  # the burst is over
    engine.add_request(1, make_request(req, 1))
    assert engine.hold_s() > 0.0
    engine.scheduler.waiting[0].queued_at -= GATHER_MAX_S  # the first arrival came long ago
    assert engine.hold_s() == 0.0
    engine.step()
    engine.add_request(2, make_request(req, 2))
    assert engine.running and engine.hold_s() == 0.0  # requests joining a running engine never wait
    while engine.has_work():
        engine.step()
    assert len(engine.pop_finished()) == 3


def test_streaming_tokens(single: Omni) -> None:
    seen: dict[int, list[int]] = {}
    outs = single.generate([CASES[0], CASES[5]], on_token=lambda i, t: seen.setdefault(i, []).append(t))
    assert seen[0] == outs[0].token_ids
    assert seen[1] == outs[1].token_ids  # the think plan streams too


def test_top_k_top_p(single: Omni) -> None:
    base = {"modality": "text2text", "prompt": "Tell me", "max_tokens": 8, "seed": 3}
    (greedy,) = single.generate([base])
    (k1,) = single.generate([{**base, "do_sample": True, "text_temperature": 1.0, "top_k": 1}])
    (p0,) = single.generate([{**base, "do_sample": True, "text_temperature": 1.0, "top_p": 1e-6}])
    assert k1.token_ids == greedy.token_ids == p0.token_ids


def test_missing_cfg_context_is_an_error(single: Omni) -> None:
    stage = single.stage
    req = make_request({"modality": "text2img", "prompt": "x", "steps": 3, "height": 32, "width": 32}, 0)
    handoff: Handoff = stage.run_alone(stage.context_program(0, req, stage.prepare(0, req)))
    handoff.cfg_text = None  # as if a transfer dropped it
    with pytest.raises(HandoffError, match="text-dropped CFG context is missing"):
        next(stage.image_program(handoff))


def test_failing_request_does_not_stop_the_others(single: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = single.stage
    orig = stage.image_program

    def broken(h):
        if h.request.prompt == "boom":
            raise RuntimeError("worker lost")
        return (yield from orig(h))

    monkeypatch.setattr(stage, "image_program", broken)
    engine = Engine(stage)
    reqs = [make_request({"modality": "text2img", "prompt": p, "steps": 2, "height": 32, "width": 32}, i)
            for i, p in enumerate(["fine", "boom"])]
    for i, r in enumerate(reqs):
        engine.add_request(i, r)
    results = {rid: (res, err) for rid, res, err in engine.run()}
    assert results[0][1] is None and results[0][0].images
    assert isinstance(results[1][1], RuntimeError)


def test_admission_bounded_by_kv_cache(single: Omni) -> None:
    """With a small cache, requests wait for room instead of failing mid-flight; one that can never fit fails
    alone with the numbers, and nothing else is disturbed."""
    big_stage = single.stage
    reqs = [make_request({"modality": "text2text", "prompt": f"count {i}", "max_tokens": 20}, i) for i in range(4)]
    need = big_stage.estimate_blocks(reqs[0], big_stage.prepare(0, reqs[0]))
    assert need >= 2
    llm = big_stage.cfg.llm
    cache = KVCache(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, 1 + 2 * need)
    engine = Engine(Stage(big_stage.model, big_stage.vae, big_stage.tok, cache))
    for i, r in enumerate(reqs):
        engine.add_request(i, r)
    big = make_request({"modality": "text2text", "prompt": "long", "max_tokens": 10_000}, 4)
    engine.add_request(4, big)
    most_running, results = 0, {}
    while engine.has_work():
        engine.step()
        most_running = max(most_running, len(engine.running))
        results.update({rid: (res, err) for rid, res, err in engine.pop_finished()})
    assert most_running == 2
    for i, r in enumerate(reqs):
        assert results[i][1] is None and results[i][0].token_ids == single.generate([r])[0].token_ids
    assert f"KV blocks but the cache holds {2 * need}" in str(results[4][1])
    assert cache.manager.num_used == 0 and cache.manager.admitted == 0


def test_estimate_bounds_what_requests_hold(single: Omni) -> None:
    """The admission estimate is an upper bound on the blocks a request's contexts really hold."""
    stage = single.stage
    for case in CASES:
        req = make_request(case, 0)
        prep = stage.prepare(0, req)
        held = []
        orig = stage.runner.execute

        def spy(works):
            out = orig(works)
            held.append(len({b for w in works for b in w.context.block_table}))
            return out

        stage.runner.execute = spy
        try:
            stage.run_alone(stage.program(0, req, prep))
        finally:
            del stage.runner.execute
        assert max(held) <= stage.estimate_blocks(req, prep), case


def test_decode_asks_for_bursts_only_when_its_sampler_can_burst(single: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    """A work reserves rows for every step it asks for: only greedy, unpenalised decodes ask for a burst."""
    stage = single.stage
    orig = stage.runner.execute
    asked: list[int] = []

    def spy(works):
        asked.extend(w.steps for w in works if w.sampler is not None)
        return orig(works)

    monkeypatch.setattr(stage.runner, "execute", spy)
    base = {"modality": "text2text", "prompt": "Tell me", "max_tokens": 8, "seed": 3}
    for extra, most in (({}, DECODE_STEPS), ({"do_sample": True, "text_temperature": 1.0}, 1),
                        ({"repetition_penalty": 1.2}, 1)):
        asked.clear()
        req = make_request({**base, **extra}, 0)
        stage.run_alone(stage.program(0, req, stage.prepare(0, req)))
        assert asked and max(asked) == most, extra


def test_decoded_tokens_stop_at_the_end_token(single: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens a burst made past an end token are thrown away by the decode, and not counted as decoded."""
    stage = single.stage
    eos = stage.tok.special.eos
    orig = stage.runner.execute
    decodes: list[int] = []

    def burst_past_the_end(works):
        out = orig(works)
        if any(w.phase == "decode" for w in works):
            decodes.append(len(works))
            if len(decodes) == 2:  # as a device burst that predicted the end at its second step
                return [[out[0][0], eos, 7, 7]]
        return out

    monkeypatch.setattr(stage.runner, "execute", burst_past_the_end)
    engine = Engine(stage)
    engine.add_request(0, make_request({"modality": "text2text", "prompt": "Tell me", "max_tokens": 8}, 0))
    ((_, out, err),) = list(engine.run())
    assert err is None and decodes == [1, 1] and len(out.token_ids) == 2
    assert engine.stats.decoded_tokens == 3  # the first token alone, then the burst's two up to the end
