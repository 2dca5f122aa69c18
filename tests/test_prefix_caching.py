"""Prefix caching: the deploy key switches it on, text-only contexts adopt cached prompt blocks instead of
prefilling them, contexts that hold an image never share, and outputs do not change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_serve import Omni
from bagel_serve.config.deploy_loader import parse_deploy_config
from bagel_serve.model.layout import TextPiece
from bagel_serve.engine.request import make_request
from bagel_serve.engine.tokenizer import GEN_THINK_SYSTEM_PROMPT

EDIT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "config_a" / "inputs" / "edit_rgb_150x100.png"
SMALL = Image.open(EDIT).convert("RGB").resize((64, 64))  # small images keep this file fast on a CPU

# A prompt of more than one 16-row block whose first block the negative prompt shares.
LONG = "a small red house beside a quiet lake under a clear evening sky with birds"

# All four modalities with and without think (as in test_serving_engine.CASES), then long prompts that
# start alike: the text2text prompt and text2img's full and negative prompts hit the cache. (img2img's
# image-dropped prompt hits it too, but its remainder is prefilled in one unit with the full context's
# prompt, which the scheduler never chunks, so that case cannot be lined up bit for bit: see below.)
CASES = [
    {"modality": "text2text", "prompt": "Hello there", "max_tokens": 8},
    {"modality": "text2text", "prompt": "Why?", "max_tokens": 8, "think": True},
    {"modality": "img2text", "prompt": "What is it?", "image": SMALL, "max_tokens": 6},
    {"modality": "img2text", "prompt": "What is it?", "image": SMALL, "max_tokens": 6, "think": True},
    {"modality": "text2img", "prompt": "a cat", "steps": 3, "height": 32, "width": 48, "seed": 1, "return_latents": True},
    {"modality": "text2img", "prompt": "a cat", "steps": 3, "height": 32, "width": 32, "seed": 2, "think": True,
     "max_think_tokens": 5, "return_latents": True, "cfg_img_scale": 2.0, "negative_prompt": "dog"},
    {"modality": "img2img", "prompt": "blue", "image": SMALL, "steps": 3, "seed": 3, "return_latents": True,
     "cfg_interval": (0.0, 1.0), "cfg_renorm_type": "text_channel"},
    {"modality": "img2img", "prompt": "blue", "image": SMALL, "steps": 3, "seed": 4, "return_latents": True,
     "think": True, "max_think_tokens": 4},
    {"modality": "text2text", "prompt": LONG, "max_tokens": 6},
    {"modality": "text2img", "prompt": LONG, "steps": 3, "height": 32, "width": 32, "seed": 5, "return_latents": True,
     "negative_prompt": LONG + " and fog"},
]

# On the CPU a GEMM rounds a row differently depending on how many rows share the call (MKL; here below
# 12 rows, unless a multiple of 4), so outputs can only be compared bit for bit when every forward has the
# same shape in both runs. A cache hit prefills the rest of a prompt after its cached blocks, exactly as a
# chunked prefill at a block boundary does, and lets requests skip forwards, which changes which requests
# share one. Hence: chunked prefill at the pool's block size (16 rows), one request at a time.
ALIGNED = {"max_num_seqs": 1, "max_num_batched_tokens": 16}


@pytest.fixture(scope="module")
def off(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", stage_overrides={0: ALIGNED},
                deploy_config="bagel_single_stage.yaml")


@pytest.fixture(scope="module")
def on(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Omni:
    """Prefix caching switched on by the pipeline-wide key of a deploy file (the stage leaves it null)."""
    yaml = tmp_path_factory.mktemp("deploy") / "cached.yaml"
    yaml.write_text("pipeline: bagel_single_stage\nenable_prefix_caching: true\nstages:\n  - stage_id: 0\n"
                    + "".join(f"    {k}: {v}\n" for k, v in ALIGNED.items()))
    return Omni(tiny_checkpoint, device="cpu", deploy_config=yaml)


def test_deploy_key_precedence() -> None:
    def enabled(top: bool | None, stage: bool | None) -> bool:
        cfg = parse_deploy_config({"enable_prefix_caching": top,
                                   "stages": [{"stage_id": 0, "enable_prefix_caching": stage}]})
        return cfg.prefix_caching_enabled(0)

    assert not enabled(None, None)
    assert enabled(True, None) and not enabled(False, None)
    assert enabled(None, True) and enabled(False, True) and not enabled(True, False)


def test_deploy_config_switches_the_runner(off: Omni, on: Omni) -> None:
    assert off.stage.cache.manager.prefix_cache is None and on.stage.cache.manager.prefix_cache is not None


def same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text and a.think_text == b.think_text
    assert (a.latents is None) == (b.latents is None) and len(a.images) == len(b.images)
    if a.latents is not None:
        assert torch.equal(a.latents, b.latents)
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_outputs_identical_and_cache_hit(off: Omni, on: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix_cache = on.stage.cache.manager.prefix_cache
    prefix_cache.clear()
    assert on.stage.cache.block_size == ALIGNED["max_num_batched_tokens"]
    prefilled: list[int] = []
    forward = on.stage.runner.execute

    def counting(works):
        prefilled.append(sum(w.piece.ids.shape[0] for w in works
                             if isinstance(w.piece, TextPiece) and w.phase == "context_prefill"))
        return forward(works)

    monkeypatch.setattr(on.stage.runner, "execute", counting)
    ref = off.generate(CASES)
    cold = on.generate(CASES)
    cold_rows, cached = sum(prefilled), len(prefix_cache)
    prefilled.clear()
    warm = on.generate(CASES)
    for a, b, c in zip(ref, cold, warm):
        same(a, b)
        same(a, c)
    assert cached > 0
    assert len(prefix_cache) == cached  # the same prompts: nothing new to register
    assert sum(prefilled) < cold_rows


def test_wholly_cached_segment_needs_no_forward(on: Omni) -> None:
    stage = on.stage
    system = len(stage.tok.segment(GEN_THINK_SYSTEM_PROMPT))
    assert system % stage.cache.block_size == 0  # the think system prompt is whole blocks
    req = make_request({"modality": "text2img", "prompt": "a cat", "steps": 2, "height": 16, "width": 16,
                        "think": True, "max_think_tokens": 2}, 0)
    on.generate([req])
    program = stage.context_program(0, req, stage.prepare(0, req))
    first = next(program)  # the system prompt came from the cache: the first forward is the prompt's
    assert [w.context.length for w in first] == [system] and first[0].piece.ids.tolist() == stage.tok.segment("a cat")
    program.close()


def test_contexts_holding_an_image_never_share(on: Omni) -> None:
    cache = on.stage.cache.manager.prefix_cache
    cache.clear()
    on.generate({"modality": "img2text", "prompt": LONG, "image": SMALL, "max_tokens": 2})
    assert len(cache) == 0  # the prompt follows the image: its rows depend on it
    on.generate({"modality": "img2img", "prompt": LONG, "image": SMALL, "steps": 2})
    assert len(cache) == 1  # only the image-dropped context's prompt (one full block) is text alone
