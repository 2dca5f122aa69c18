"""Engine behaviour on a tiny random checkpoint with the real tokenizer: batching, seeds, CFG plumbing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_serve import Omni
from bagel_serve.model.layout import LatentPiece

GOLDEN = Path(os.environ.get("BAGEL_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))
EDIT = GOLDEN / "config_a" / "inputs" / "edit_rgb_150x100.png"
SINGLE_STAGE = "bagel_single_stage.yaml"


@pytest.fixture(scope="module")
def omni(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


REQS = [
    {"modality": "text2text", "prompt": "Hello there", "max_tokens": 8},
    {"modality": "img2text", "prompt": "What is in the picture?", "image": str(EDIT), "max_tokens": 6, "think": True},
    {"modality": "text2img", "prompt": "a red cat", "steps": 4, "height": 64, "width": 96, "seed": 3,
     "return_latents": True},
    {"modality": "text2img", "prompt": "a plan first", "steps": 3, "height": 32, "width": 32, "seed": 4,
     "think": True, "max_think_tokens": 5, "cfg_img_scale": 2.0, "return_latents": True},
    {"modality": "img2img", "prompt": "make it blue", "image": str(EDIT), "steps": 3, "seed": 5,
     "cfg_renorm_type": "text_channel", "cfg_interval": (0.0, 1.0), "negative_prompt": "blurry",
     "return_latents": True},
]


def test_batched_requests_equal_single_runs(omni: Omni) -> None:
    """Packing requests (and their CFG branches) into shared forwards must not change any result."""
    together = omni.generate(REQS)
    for req, got in zip(REQS, together):
        (alone,) = omni.generate([req])
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text and got.think_text == alone.think_text
        if alone.latents is not None:
            assert torch.allclose(got.latents, alone.latents, rtol=1e-5, atol=1e-5)
            assert np.abs(pixels(got.images[0]) - pixels(alone.images[0])).max() <= 1


def test_outputs_per_modality(omni: Omni) -> None:
    t2t, i2t, t2i, t2i_think, i2i = omni.generate(REQS)
    # token_ids are the generated tokens: at most max_tokens, the fed start token not among them.
    assert t2t.token_ids[:1] != [151644] and 1 <= len(t2t.token_ids) <= 8 and isinstance(t2t.text, str)
    assert t2t.images == [] and t2t.latents is None
    assert t2i.images[0].size == (96, 64) and t2i.latents.shape == (4 * 6, 64 // 4 * 4 // 4 * 4 // 4)
    assert t2i_think.think_text is not None and len(t2i_think.token_ids) <= 5
    # img2img keeps the VAE-resized input size (150x100 -> 128x80 with the tiny transform).
    assert i2i.images[0].size == (128, 80)
    assert i2i.latents.shape == (8 * 5, 16)


def test_seed_reproduces_and_noise_overrides(omni: Omni) -> None:
    req = {"modality": "text2img", "prompt": "a dog", "steps": 3, "height": 32, "width": 48, "seed": 11,
           "return_latents": True}
    a, b = omni.generate([req, req])
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    (single,) = omni.generate([req])
    (c,) = omni.generate([{**req, "seed": 12}])
    assert not torch.equal(single.latents, c.latents)
    # The seed's noise is torch.randn(N, 64) from a CPU generator: passing it explicitly gives the same image.
    noise = torch.randn(2 * 3, 16, generator=torch.Generator().manual_seed(11))
    (d,) = omni.generate([{**req, "seed": 99, "noise": noise}])
    assert torch.equal(single.latents, d.latents)


def test_cfg_branches(omni: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    """text2img never computes the redundant image-dropped branch; guidance follows cfg_interval."""
    counts: list[int] = []
    runner = omni.stage.runner
    orig = runner.execute

    def spy(works):
        if works and isinstance(works[0].piece, LatentPiece) and works[0].want_output:
            counts.append(len(works))
        return orig(works)

    monkeypatch.setattr(runner, "execute", spy)
    base = {"modality": "text2img", "prompt": "x", "steps": 8, "height": 32, "width": 32, "seed": 1}
    omni.generate([{**base, "cfg_img_scale": 1.5}])
    assert counts == [2] * 6 + [1]  # shift 3, interval (0.4, 1]: steps 0..5 guided, step 6 not
    counts.clear()
    omni.generate([{**base, "cfg_text_scale": 1.0}])
    assert counts == [1] * 7
    counts.clear()
    omni.generate([{**base, "cfg_interval": (0.0, 1.0), "think": True, "max_think_tokens": 3}])
    assert counts == [3] * 7  # with think the image-dropped context [S, T] differs from the full [S, T, plan]
    counts.clear()
    omni.generate([{**base, "modality": "img2img", "image": str(EDIT), "cfg_interval": (0.0, 1.0)}])
    assert counts == [3] * 7


def test_negative_prompt_changes_only_guided_result(omni: Omni) -> None:
    base = {"modality": "text2img", "prompt": "a tree", "steps": 3, "height": 32, "width": 32, "seed": 2,
            "return_latents": True}
    plain, neg = omni.generate([base, {**base, "negative_prompt": "a house"}])
    assert not torch.equal(plain.latents, neg.latents)
    # Run apart: packing the two together would place their rows differently in shared GEMMs.
    (unguided,) = omni.generate([{**base, "cfg_text_scale": 1.0}])
    (unguided_neg,) = omni.generate([{**base, "cfg_text_scale": 1.0, "negative_prompt": "a house"}])
    assert torch.equal(unguided.latents, unguided_neg.latents)


def test_img2img_size_override(omni: Omni) -> None:
    (out,) = omni.generate([{"modality": "img2img", "prompt": "x", "image": Image.open(EDIT), "steps": 2,
                             "height": 64, "width": 64, "seed": 0}])
    assert out.images[0].size == (64, 64)


def test_sampling_is_seeded(omni: Omni) -> None:
    req = {"modality": "text2text", "prompt": "Tell me a story", "max_tokens": 10, "do_sample": True,
           "text_temperature": 1.0, "seed": 5}
    a, b = omni.generate([req, req])
    assert a.token_ids == b.token_ids
    (greedy,) = omni.generate([{**req, "do_sample": False}])
    outs = {tuple(o.token_ids) for o in omni.generate([{**req, "seed": s} for s in range(6)])}
    assert len(outs) > 1 or tuple(greedy.token_ids) not in outs


def test_packed_attention_path_gives_the_same_images(omni: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that packs the denoising steps' sequences (as the GPU's does for small images) is handed
    every step, the CFG branches of a guided one and several requests' branches together, in one packed call
    per layer; the images come out as with one call per sequence (up to float32 rounding: a sequence's
    segments are one matmul there, two here). Rows that the QK-norm/RoPE kernel writes straight into the
    packed order (`prepacks`, as the GPU's backend takes them) give those images to the bit."""
    from bagel_serve.layers.attention_backends import ExactBackend

    reqs = [[REQS[2]], [REQS[4]], [REQS[2], {**REQS[2], "prompt": "a blue dog", "seed": 9}]]
    plain = [omni.generate(r) for r in reqs]
    calls: list[tuple[int, bool]] = []

    class Packing(ExactBackend):
        prepack = False

        def packs(self, query_counts, dtype):
            return True

        def prepacks(self, p, fp8=False):
            return self.prepack and p.kv_rows is not None

        def packed(self, q, k, v, p, k_cache, v_cache, out, rows=None):
            calls.append((p.cu_q.numel() - 1, rows is not None))
            super().packed(q, k, v, p, k_cache, v_cache, out, rows)

    backend = Packing()
    monkeypatch.setattr(omni.stage.runner, "backend", backend)
    packed = [omni.generate(r) for r in reqs]
    # Guided text2img (2 branches), guided img2img (3), two text2img requests' guided steps together (4).
    assert {2, 3, 4} <= {n for n, _ in calls} and not any(pre for _, pre in calls), calls
    for a, b in zip(sum(packed, []), sum(plain, []), strict=True):
        assert a.ok and b.ok
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-5)
        assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= 1
    calls.clear()
    backend.prepack = True
    prepacked = [omni.generate(r) for r in reqs]
    assert {2, 3, 4} <= {n for n, pre in calls if pre}, calls
    for a, b in zip(sum(prepacked, []), sum(packed, []), strict=True):
        assert a.ok and torch.equal(a.latents, b.latents)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_denoise_graphs_replay_the_eager_forward(tiny_checkpoint: Path) -> None:
    """The denoising graphs give the eager forward's bits for every branch set (unguided, text2img guided,
    img2img guided), for other prompts (other contexts) through the same graphs, and with TaylorSeer (whose
    cached rows must not be overwritten by the next replay)."""
    from bagel_serve.engine.denoise_graphs import DenoiseGraphs

    gpu = Omni(tiny_checkpoint, device="cuda", deploy_config=SINGLE_STAGE)
    runner = gpu.stage.runner
    graphs = DenoiseGraphs(runner.model, runner.cache, runner.backend, runner.special, runner.graph_pool,
                           sizes=((64, 96),))
    graphs.capture()
    replays: list[int] = []
    real_run = graphs.run

    def run(works, und_ids, positions, b):
        replays.append(b.branches)
        return real_run(works, und_ids, positions, b)

    graphs.run = run
    reqs = [REQS[2], {**REQS[2], "prompt": "a much longer prompt about a blue dog on a beach", "seed": 1},
            {**REQS[2], "enable_taylorseer": True, "steps": 12},
            {**REQS[4], "height": 64, "width": 96, "cfg_img_scale": 2.0}]
    try:
        runner.denoise_graphs = None
        eager = [gpu.generate([r])[0] for r in reqs]
        runner.denoise_graphs = graphs
        graphed = [gpu.generate([r])[0] for r in reqs]
    finally:
        gpu.shutdown()
    assert {1, 2, 3} <= set(replays), replays
    for a, b in zip(graphed, eager, strict=True):
        assert a.ok and b.ok, (a.error, b.error)
        assert torch.equal(a.latents, b.latents)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_denoise_graphs_serve_a_dit_that_reads_the_thinkers_cache(tiny_checkpoint: Path) -> None:
    """In the two-stage deploy the DiT worker reads the Thinker's KV cache in place, mapped at the first
    hand-off, after its graphs were captured: the graphs replay over their own copy of the contexts' keys, and
    give the eager DiT's bits."""
    reqs = [REQS[2], {**REQS[4], "height": 64, "width": 96, "cfg_img_scale": 2.0}]
    graphed, eager = [], []
    with Omni(tiny_checkpoint, device="cuda", stage_overrides={"1": {"denoise_graph_sizes": [[64, 96]]}}) as omni:
        for r in reqs:  # one at a time: each step of one request is one graphed forward
            graphed += omni.generate([r])
            st = omni.last_stats
            assert st.graph_forwards == st.denoise_steps > 0, (st.graph_forwards, st.denoise_steps)
    with Omni(tiny_checkpoint, device="cuda", enforce_eager=True) as omni:
        for r in reqs:
            eager += omni.generate([r])
            assert omni.last_stats.graph_forwards == 0
    for a, b in zip(graphed, eager, strict=True):
        assert a.ok and b.ok, (a.error, b.error)
        assert torch.equal(a.latents, b.latents)


def test_denoise_graph_buckets_take_only_denoising_forwards_that_fit(omni: Omni,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Which forwards a denoising graph would replay (the rule, on the CPU): every step of a request of a
    captured size, in the smallest bucket whose room for cached keys holds its contexts; no prefill, no other
    size, and no step whose contexts outgrow the largest bucket."""
    from bagel_serve.engine.denoise_graphs import BRANCH_COUNTS, CONTEXT_BUCKETS, Bucket, DenoiseGraphs

    runner = omni.stage.runner
    captured = DenoiseGraphs.__new__(DenoiseGraphs)  # the routing rule only reads which buckets exist
    captured.graphs = {Bucket(24, b, c): None for b in BRANCH_COUNTS for c in CONTEXT_BUCKETS}
    seen: list[tuple[str, int, Bucket | None]] = []
    real = runner._layout

    def layout(works):
        seen.append((type(works[0].piece).__name__, sum(w.context.length for w in works), captured.bucket(works)))
        return real(works)

    monkeypatch.setattr(runner, "_layout", layout)
    assert omni.generate([{**REQS[2], "steps": 8}])[0].ok  # 64x96: 24 latents a branch; the last step unguided
    buckets = [b for kind, _, b in seen if kind == "LatentPiece"]
    assert Bucket(24, 2, 256) in buckets and Bucket(24, 1, 256) in buckets  # guided and unguided steps
    assert set(buckets) == {Bucket(24, 2, 256), Bucket(24, 1, 256)}
    assert all(b is None for kind, _, b in seen if kind != "LatentPiece")
    seen.clear()
    assert omni.generate([{**REQS[2], "height": 32, "width": 32}])[0].ok  # no graph of that size
    assert all(b is None for _, _, b in seen)
    seen.clear()
    long_prompt = " ".join(["a red cat on a mat"] * 450)  # about 2,700 tokens: past the largest bucket
    assert omni.generate([{**REQS[2], "prompt": long_prompt, "steps": 2}])[0].ok
    denoise = [(n, b) for kind, n, b in seen if kind == "LatentPiece"]
    assert denoise and all(n > CONTEXT_BUCKETS[-1] and b is None for n, b in denoise), denoise


def test_vae_precision_reaches_the_encode_and_the_decode(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vae_precision` (an engine option, like `--vae-precision`, or the stage key) decides whether the VAE's
    convolutions may use TF32, at the input image's encode and at the decode, in every stage; the default is
    the reference's float32. A value outside the choices is refused by name before any weight loads."""
    from bagel_serve.config.engine_options import EngineOptionError

    seen: list[bool] = []
    real = torch.backends.cudnn.flags

    def flags(*args, **kwargs):
        seen.append(kwargs["allow_tf32"])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.backends.cudnn, "flags", flags)
    edit = {**REQS[4], "steps": 2}
    for option, want in ((None, False), ("float32", False), ("tf32", True)):
        kwargs = {} if option is None else {"vae_precision": option}
        # The default two stages, here in this process (so the spy sees them): encode and decode apart.
        with Omni(tiny_checkpoint, device="cpu", worker_backend="inline", **kwargs) as o:
            seen.clear()
            assert o.generate([edit])[0].ok
        assert len(seen) >= 2 and set(seen) == {want}, (option, seen)
    with Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE,
              stage_overrides={"0": {"vae_precision": "tf32"}}) as o:
        seen.clear()
        assert o.generate([edit])[0].ok
    assert len(seen) >= 2 and set(seen) == {True}
    with pytest.raises(EngineOptionError, match="vae_precision.*float32.*tf32"):
        Omni(tiny_checkpoint, device="cpu", vae_precision="bf16")
