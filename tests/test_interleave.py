"""Interleaved inputs (`Request.inputs`): validation, the contexts they build (laid out as the official
`interleave_inference` lays them out), prompt/image as their special case, and the CLI's ordered flags.

Parity with the official outputs for two interleaved cases is in test_golden_parity.py; these tests use the
tiny checkpoint with the real tokenizer and check the structure: which rows each context holds, in which
order, at which RoPE positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_serve import Omni
from bagel_serve.engine.preprocess import context_rows, prepare
from bagel_serve.engine.request import Request, RequestError, make_request
from bagel_serve.engine.stage_engine import release_contexts
from bagel_serve.engine.tokenizer import GEN_THINK_SYSTEM_PROMPT
from bagel_serve.entrypoints.cli import main
from bagel_serve.entrypoints.outputs import read_parameters
from bagel_serve.imaging import resize_size
from bagel_serve.model.layout import LatentPiece, TextPiece, VitPiece

INPUTS = Path(__file__).resolve().parents[2] / "shared" / "golden" / "config_a" / "inputs"
SMALL = INPUTS / "edit_rgb_80x64.png"  # VAE-resized: 80x64 (W x H)
WIDE = INPUTS / "und_rgb_100x75.png"  # VAE-resized: 96x80
SINGLE_STAGE = "bagel_single_stage.yaml"
EDIT = {"modality": "img2img", "steps": 3, "seed": 5, "cfg_img_scale": 2.0, "cfg_interval": (0.0, 1.0),
        "return_latents": True}


@pytest.fixture(scope="module")
def omni(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE)


def quiet(d: dict) -> Request:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_request(d)


def handoff(omni: Omni, d: dict):
    """Run only the context half of a request (stage 0) and return its hand-off (full and CFG contexts)."""
    stage = omni.stage
    (req,) = omni.make_requests([d])
    return stage.run_alone(stage.context_program(0, req, stage.prepare(0, req)))


def kv_rows(ctx) -> torch.Tensor:
    """The cached K/V rows of a context, in row order: [layers, 2, length, kv heads, head dim]."""
    slots = ctx.cache.slots(ctx.block_table, 0, ctx.length)
    return ctx.cache.tensor[:, :, slots]


def image_rows(omni: Omni, path: Path, vae: bool) -> int:
    """Rows one input image adds to a context (its ViT block, and its VAE block when `vae`)."""
    (req,) = omni.make_requests([{"modality": "img2img" if vae else "img2text", "inputs": [path]}])
    prep = omni.stage.prepare(0, req)
    return context_rows(req, prep, omni.config, omni.tokenizer)[0]


# ------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("d, field, reason", [
    ({"modality": "img2img", "inputs": []}, "inputs", "must hold at least one item"),
    ({"modality": "img2img", "inputs": "a cat"}, "inputs", "must be a list of text segments (str) and images"),
    ({"modality": "img2img", "inputs": (SMALL, "x")}, "inputs", "must be a list of text segments"),
    ({"modality": "img2img", "inputs": [SMALL, 3, "x"]}, "inputs",
     "[1] must be a text segment (str) or an image (a PIL image or a pathlib.Path path), got 3"),
    ({"modality": "img2img", "inputs": [SMALL, None]}, "inputs", "[1] must be a text segment"),
    ({"modality": "img2img", "inputs": ["a", "b"]}, "inputs", "must hold at least one image for img2img"),
    ({"modality": "img2text", "inputs": [str(SMALL), "b"]}, "inputs", "must hold at least one image for img2text"),
    ({"modality": "text2img", "inputs": [SMALL, "b"]}, "inputs",
     "holds 1 image(s), which text2img does not use; use img2text or img2img"),
    ({"modality": "text2text", "inputs": [SMALL, SMALL, "b"]}, "inputs", "holds 2 image(s), which text2text"),
    ({"modality": "text2img", "inputs": ["a"], "prompt": "b"}, "inputs",
     "replaces prompt and image; give either inputs or prompt, not both"),
    ({"modality": "img2img", "inputs": [SMALL, "a"], "image": SMALL}, "inputs", "either inputs or image, not both"),
])
def test_bad_inputs_name_the_field(d: dict, field: str, reason: str) -> None:
    with pytest.raises(RequestError) as e:
        quiet(d)
    assert e.value.field == field and reason in e.value.reason, e.value
    assert str(e.value).startswith("request 0: inputs")


def test_inputs_on_a_request_object_and_its_items() -> None:
    img = Image.new("RGB", (32, 32))
    r = quiet({"modality": "img2img", "inputs": [img, "make it", SMALL, "blue"]})
    assert r.items == [img, "make it", SMALL, "blue"] and r.texts == ["make it", "blue"]
    assert quiet(r).inputs == r.inputs  # a resolved Request is checked again as it is
    with pytest.raises(RequestError, match=r"inputs\[0\] must be a text segment"):
        quiet(Request("img2img", inputs=[1.5, "x"]))
    # prompt/image are the one-text, one-image case; an image given as a str is a path (a str *item* is text).
    legacy = quiet({"modality": "img2img", "prompt": "p", "image": str(SMALL)})
    assert legacy.items == [SMALL, "p"] and legacy.texts == ["p"]
    assert quiet({"modality": "text2img", "prompt": "p"}).items == ["p"]


def test_a_too_long_input_list_names_inputs(omni: Omni) -> None:
    req = quiet({"modality": "img2text", "inputs": [SMALL, "a question"], "max_tokens": 2})
    with pytest.raises(RequestError, match="request 0: the inputs take .* positions, more than") as e:
        prepare(0, req, omni.config, omni.tokenizer, 8)
    assert e.value.field == "inputs"
    with pytest.raises(RequestError, match=r"request 0: inputs\[1\]: file not found"):
        prepare(0, quiet({"modality": "img2text", "inputs": ["a", Path("/no/such.png")]}), omni.config,
                omni.tokenizer, 4096)


# ------------------------------------------------------------------------------------------------- contexts


def test_contexts_follow_interleave_inference(omni: Omni) -> None:
    """[text A, image, text B] for an edit: full = A V Vi B; text-dropped = the full context before B, sharing
    its rows; image-dropped = A B only, with the rows a text-only context [A, B] has."""
    seg = omni.tokenizer.segment
    a, b = "first this", "then that"
    h = handoff(omni, {**EDIT, "inputs": [a, SMALL, b]})
    t2i = handoff(omni, {**EDIT, "modality": "text2img", "height": 32, "width": 32, "inputs": [a, b]})
    try:
        img = image_rows(omni, SMALL, vae=True)
        assert h.full.length == len(seg(a)) + img + len(seg(b))
        assert h.full.rope == len(seg(a)) + 2 + len(seg(b))  # one position per image block (VAE, ViT)
        assert (h.cfg_text.length, h.cfg_text.rope) == (len(seg(a)) + img, len(seg(a)) + 2)
        assert torch.equal(kv_rows(h.cfg_text), kv_rows(h.full)[:, :, : h.cfg_text.length])
        assert (h.cfg_img.length, h.cfg_img.rope) == (len(seg(a) + seg(b)),) * 2
        assert not h.img_is_full and t2i.img_is_full
        assert torch.allclose(kv_rows(h.cfg_img), kv_rows(t2i.full), atol=1e-5, rtol=1e-5)
        # The text-dropped context of text2img [A, B]: the full one before B.
        assert torch.equal(kv_rows(t2i.cfg_text), kv_rows(t2i.full)[:, :, : len(seg(a))])
        assert (h.height, h.width) == (64, 80)
    finally:
        release_contexts(h)
        release_contexts(t2i)


def test_text_dropped_context_snapshots_after_the_last_image(omni: Omni) -> None:
    """[image, image, text]: the text-dropped context holds both images; the image-dropped one the text only;
    with think the system prompt leads the full and the image-dropped contexts (not the text-dropped one's
    image rows: it is the full context before the text)."""
    seg = omni.tokenizer.segment
    text = "paint the first like the second"
    rows = image_rows(omni, SMALL, vae=True) + image_rows(omni, WIDE, vae=True)
    h = handoff(omni, {**EDIT, "inputs": [SMALL, WIDE, text]})
    think = handoff(omni, {**EDIT, "inputs": [SMALL, WIDE, text], "think": True, "max_think_tokens": 3})
    try:
        assert (h.cfg_text.length, h.cfg_img.length, h.full.length) == (rows, len(seg(text)), rows + len(seg(text)))
        assert (h.height, h.width) == (80, 96)  # the last image's VAE-resized size
        s = len(seg(GEN_THINK_SYSTEM_PROMPT))
        assert think.cfg_text.length == s + rows and think.cfg_img.length == s + len(seg(text))
        plan = len(seg(think.output.think_text))
        assert think.full.length == s + rows + len(seg(text)) + plan
        assert torch.equal(kv_rows(think.cfg_img)[:, :, :s], kv_rows(think.full)[:, :, :s])
    finally:
        release_contexts(h)
        release_contexts(think)


class Fed:
    """Records the pieces every forward of a stage was fed."""

    def __init__(self, omni: Omni) -> None:
        self.runner = omni.stage.runner
        self.pieces: list = []

    def __enter__(self) -> "Fed":
        execute = self.runner.execute

        def wrapped(works):
            self.pieces += [w.piece for w in works]
            return execute(works)

        self.runner.execute = wrapped
        return self

    def __exit__(self, *exc) -> None:
        del self.runner.execute


def test_image_dropped_context_only_when_its_guidance_is_on(omni: Omni) -> None:
    """cfg_img_scale <= 1 (or no text guidance): no image-dropped context, so its texts are never prefilled."""
    for extra in ({"cfg_img_scale": 1.0}, {"cfg_text_scale": 1.0}):
        with Fed(omni) as fed:
            h = handoff(omni, {**EDIT, **extra, "inputs": ["a", SMALL, "b"]})
        try:
            assert h.cfg_img is None and (h.cfg_text is None) == ("cfg_text_scale" in extra)
            assert sum(isinstance(p, TextPiece) for p in fed.pieces) == 2  # each text once, into the full context
        finally:
            release_contexts(h)


def test_understanding_takes_images_as_vit_blocks_in_order(omni: Omni) -> None:
    d = {"modality": "img2text", "inputs": [WIDE, "and", SMALL, "which is wider?"], "max_tokens": 3}
    with Fed(omni) as fed:
        (out,) = omni.generate([d])
    assert out.ok and not any(isinstance(p, LatentPiece) for p in fed.pieces)
    vits = [p for p in fed.pieces if isinstance(p, VitPiece)]
    patch = omni.config.vit.patch_size
    want = [resize_size(w, h, omni.config.vit_transform) for w, h in ((96, 80), (80, 64))]  # VAE-resized sizes
    assert [v.patches.shape[0] for v in vits] == [(w // patch) * (h // patch) for w, h in want]


# ------------------------------------------------------------------------------------------------- one code path


@pytest.mark.parametrize("legacy, inputs", [
    ({"modality": "text2text", "prompt": "hello there", "max_tokens": 4}, ["hello there"]),
    ({"modality": "img2text", "prompt": "what is it?", "image": str(SMALL), "max_tokens": 4}, [SMALL, "what is it?"]),
    ({"modality": "text2img", "prompt": "a red cat", "steps": 3, "height": 32, "width": 48, "seed": 2,
      "return_latents": True}, ["a red cat"]),
    ({**EDIT, "prompt": "make it blue", "image": SMALL, "negative_prompt": "blurry"}, [SMALL, "make it blue"]),
])
def test_prompt_and_image_are_the_one_item_case(omni: Omni, legacy: dict, inputs: list) -> None:
    rest = {k: v for k, v in legacy.items() if k not in ("prompt", "image")}
    (a,) = omni.generate([legacy])  # one at a time: the same forwards, so the very same floats
    (b,) = omni.generate([{**rest, "inputs": inputs}])
    assert a.ok and b.ok and a.token_ids == b.token_ids and a.text == b.text
    if a.latents is not None:
        assert torch.equal(a.latents, b.latents)
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_order_matters_and_the_last_image_sets_the_size(omni: Omni) -> None:
    pil = Image.open(WIDE)
    one, other, sized = omni.generate([{**EDIT, "inputs": [SMALL, pil, "mix"]}, {**EDIT, "inputs": [pil, SMALL, "mix"]},
                                       {**EDIT, "inputs": [pil, SMALL, "mix"], "height": 48, "width": 32}])
    assert one.images[0].size == (96, 80) and other.images[0].size == (80, 64) and sized.images[0].size == (32, 48)
    texts_first = omni.generate([{**EDIT, "inputs": ["mix", SMALL]}, {**EDIT, "inputs": [SMALL, "mix"]}])
    assert not torch.equal(texts_first[0].latents, texts_first[1].latents)


def test_two_stage_workers_take_inputs(tiny_checkpoint: Path, omni: Omni) -> None:
    """Through the default two-stage pipeline (stage processes): the same image as the single stage."""
    d = {**EDIT, "inputs": [SMALL, "and", Image.open(WIDE), "mix them"]}
    (single,) = omni.generate([d])
    two = Omni(tiny_checkpoint, device="cpu")
    try:
        (out,) = two.generate([d])
    finally:
        two.shutdown()
    assert torch.allclose(out.latents, single.latents, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- CLI


def run(tiny: Path, out: Path, *flags: str) -> None:
    assert main(["generate", "--model", str(tiny), "--output", str(out), "--no-progress", "--deploy-config",
                 SINGLE_STAGE, *flags]) == 0


def test_cli_input_flags_keep_their_order(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    run(tiny_checkpoint, tmp_path, "--modality", "img2img", "--input-text", "first", "--input-image", str(SMALL),
        "--input-text", "then", "--input-image", str(WIDE), "--input-image", str(SMALL), "--steps", "2",
        "--seed", "3")
    monkeypatch.setattr(Image, "open", real_open)
    assert opened.count(str(SMALL)) == 1  # each distinct file decoded once
    assert "[0] img2img seed=3: ['first', <image>, 'then', <image>, <image>]" in capsys.readouterr().out
    params = read_parameters(tmp_path / "output_0_0.png")
    assert params["inputs"] == [{"text": "first"}, {"image": str(SMALL)}, {"text": "then"}, {"image": str(WIDE)},
                                {"image": str(SMALL)}]
    assert "prompt" not in params and (params["width"], params["height"]) == (80, 64)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["outputs"][0]["parameters"]["inputs"] == params["inputs"]


def test_cli_text_only_inputs_and_report(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run(tiny_checkpoint, tmp_path, "--modality", "text2text", "--input-text", "one", "--input-text", "two",
        "--max-tokens", "2")
    assert "[0] text2text seed=" in capsys.readouterr().out
    entry = json.loads((tmp_path / "manifest.json").read_text())["outputs"][0]
    assert entry["parameters"]["inputs"] == [{"text": "one"}, {"text": "two"}] and "text" in entry


@pytest.mark.parametrize("flags, message", [
    (["--input-text", "a", "--prompts", "b"], "do not combine them with --prompts"),
    (["--input-image", str(SMALL), "--image-path", str(SMALL), "--modality", "img2img"],
     "do not combine them with --image-path"),
    (["--modality", "img2img", "--input-text", "a"],
     "--input-text/--input-image must hold at least one image for img2img"),
    (["--input-image", str(SMALL), "--input-text", "a"], "holds 1 image(s), which text2img does not use"),
    (["--modality", "img2text", "--input-image", "/no/such.png"], "--input-image: file not found: /no/such.png"),
])
def test_cli_input_flag_errors(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                               flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(tiny_checkpoint), "--output", str(tmp_path), "--deploy-config",
              SINGLE_STAGE, *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "manifest.json").exists()
