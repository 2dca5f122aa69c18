"""Float32 CPU parity with the official implementation's outputs in ../shared/golden (config A)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bagel_serve import Omni
from bagel_serve.model.layout import (LatentPiece, TextPiece, VitPiece, flattened_position_ids, pack_latent,
                                     patchify)
from bagel_serve.imaging import load_image, resize, to_tensor
from bagel_serve.model.embeddings import sincos_2d_table, timestep_frequencies
from bagel_serve.layers.rotary import inv_frequencies, rope_tables

GOLDEN = Path(os.environ.get("BAGEL_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden")) / "config_a"
# The parity suite can also hold a GPU's float32 path to the goldens: BAGEL_TEST_DEVICE=cuda.
DEVICE = os.environ.get("BAGEL_TEST_DEVICE", "cpu")
CASES = json.loads((GOLDEN / "cases.json").read_text())
TOL = 1e-4
SINGLE_STAGE = "bagel_single_stage.yaml"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def omni() -> Omni:
    return Omni(GOLDEN / "checkpoint", device=DEVICE, dtype=torch.float32, deploy_config=SINGLE_STAGE)


def case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    c = next(c for c in CASES["cases"] if c["name"] == name)
    return c, load_file(GOLDEN / c["tensors_file"])


class Recorder:
    """Wraps the model runner's forward and its sampler to record what each request program received.

    While recording, every decode step goes through the sampler (no multi-step bursts, which sample on the
    device), so that each step's logits are seen; they are copied because a CUDA graph reuses its buffer."""

    def __init__(self, omni: Omni) -> None:
        self.runner = omni.stage.runner
        self.calls: list[tuple[list, list]] = []
        self.logits: list[torch.Tensor] = []

    def __enter__(self) -> "Recorder":
        execute, sample = self.runner.execute, self.runner.sample

        def wrapped(works):
            res = execute(works)
            self.calls.append((works, res))
            return res

        def sampling(logits, samplers):
            self.logits += [row.to(torch.float32, copy=True) for row in logits]
            return sample(logits, samplers)

        self.runner.execute, self.runner.sample = wrapped, sampling
        self.runner._bursts = lambda works, lay: False
        return self

    def __exit__(self, *exc) -> None:
        del self.runner.execute, self.runner.sample, self.runner._bursts

    def decode_logits(self) -> list[torch.Tensor]:
        """The logits of each decode step, in order."""
        return self.logits

    def text_segments(self) -> list[list[int]]:
        return [w.piece.ids.tolist() for works, _ in self.calls for w in works if isinstance(w.piece, TextPiece) and not w.want_output]

    def denoise_steps(self) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """(x_t entering the step, velocities of the branches computed) per denoising step."""
        return [(works[0].piece.latents, res) for works, res in self.calls
                if works and isinstance(works[0].piece, LatentPiece) and works[0].want_output]


def kwargs_to_request(c: dict) -> dict:
    """The request of a case: `inputs` (the ordered list, as given to interleave_inference) for the
    interleave cases, prompt and image for the others (their one-text, one-image special case)."""
    kw = c["interleave_inference_kwargs"]
    texts = [i["text"] for i in c["inputs"] if "text" in i]
    images = [GOLDEN / "inputs" / i["image"] for i in c["inputs"] if "image" in i]
    req: dict = {"seed": c["torch_manual_seed"], "think": kw.get("think", False)}
    if c["name"].startswith("interleave_"):
        req["inputs"] = [GOLDEN / "inputs" / i["image"] if "image" in i else i["text"] for i in c["inputs"]]
    else:
        req["prompt"] = texts[0]
        if images:
            req["image"] = images[0]
    if kw.get("understanding_output"):
        # The reference's max_think_token_n counts the start token it feeds; our max_tokens counts generated ones.
        req.update(modality="img2text" if images else "text2text", max_tokens=kw["max_think_token_n"] - 1,
                   do_sample=kw["do_sample"], text_temperature=kw["text_temperature"])
    else:
        req.update(modality="img2img" if images else "text2img", steps=kw["num_timesteps"],
                   cfg_text_scale=kw["cfg_text_scale"], cfg_img_scale=kw["cfg_img_scale"],
                   cfg_interval=tuple(kw["cfg_interval"]), timestep_shift=kw["timestep_shift"],
                   cfg_renorm_min=kw["cfg_renorm_min"], cfg_renorm_type=kw["cfg_renorm_type"], return_latents=True)
        if "image_shapes" in kw:
            req["height"], req["width"] = kw["image_shapes"]
    return req


@pytest.mark.parametrize("name", ["t2t_greedy_0", "t2t_greedy_1", "t2t_greedy_2", "t2t_think", "img2text_rgb",
                                  "interleave_und_2img"])
def test_text_cases(omni: Omni, name: str) -> None:
    c, g = case(name)
    (plain,) = omni.generate([kwargs_to_request(c)])  # as served: on a GPU, greedy steps run in bursts
    with Recorder(omni) as rec:
        (out,) = omni.generate([kwargs_to_request(c)])
    assert plain.token_ids == out.token_ids
    # The context segments fed to the full context, in order (the reference also feeds cfg copies).
    fed = rec.text_segments()
    ref_segments = [g[k].tolist() for k in sorted(k for k in g if k.startswith("context_text_ids_"))]
    assert fed == ref_segments[::2]
    # The reference returns the start token first, then the generated ones.
    assert g["gen_text_0_ids"].tolist()[0] == omni.tokenizer.special.bos
    assert out.token_ids == g["gen_text_0_ids"].tolist()[1:]
    logits = rec.decode_logits()[:3]
    ref = g["gen_text_0_logits_first3"]
    for i in range(3):
        assert rel(logits[i], ref[i]) < TOL, f"logits step {i}"
    assert out.text == c["outputs"][0]["text"]


def test_vit_tower(omni: Omni) -> None:
    c, g = case("img2text_rgb")
    cfg = omni.config
    img = resize(resize(load_image(GOLDEN / "inputs" / "und_rgb_100x75.png"), cfg.vae_transform), cfg.vit_transform)
    patches = patchify(to_tensor(img), 14)
    pos = flattened_position_ids(img.height // 14, img.width // 14, cfg.vit_max_num_patch_per_side)
    assert torch.equal(pos, g["vit_0_vit_position_ids"])
    assert rel(patches, g["vit_0_pixel_patches"]) < 1e-6
    model = omni.stage.model
    with torch.inference_mode():
        feats = model.vit_model(patches.to(model.device), pos.to(model.device), [patches.shape[0]])
        assert rel(feats.cpu(), g["vit_0_vit_features"]) < TOL
        assert rel(model.connector(feats).cpu(), g["vit_0_connector_out"]) < TOL


def test_components(omni: Omni) -> None:
    g = load_file(GOLDEN / "cases/components.safetensors")
    model = omni.stage.model
    assert rel(sincos_2d_table(8, 64), g["latent_pos_embed_fp32"]) < 1e-7
    assert torch.equal(model.latent_pos_embed.pos_embed.cpu(), g["latent_pos_embed_checkpoint"])
    assert torch.equal(model.vit_pos_embed.pos_embed.cpu(), g["vit_pos_embed_checkpoint"])
    assert rel(timestep_frequencies(g["timestep_t"]), g["timestep_freq_embedding"]) < 1e-6
    with torch.inference_mode():
        assert rel(model.time_embedder(g["timestep_t"].to(model.device)).cpu(), g["timestep_embedder_out"]) < TOL
    cos, sin = rope_tables(g["rope_positions"], inv_frequencies(16, 1e6))
    assert rel(cos, g["rope_cos"]) < 1e-6 and rel(sin, g["rope_sin"]) < 1e-6


def image_diff(img: Image.Image, ref: torch.Tensor) -> int:
    a = np.asarray(img).astype(np.int16)
    b = ref.numpy().astype(np.int16)
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


@pytest.mark.parametrize("name", ["t2i_64x64", "t2i_64x64_cfgimg1.5", "img2img", "interleave_edit_2img"])
def test_image_cases(omni: Omni, name: str) -> None:
    c, g = case(name)
    (plain,) = omni.generate([kwargs_to_request(c)])  # as served: on a GPU, greedy steps run in bursts
    with Recorder(omni) as rec:
        (out,) = omni.generate([kwargs_to_request(c)])
    assert plain.token_ids == out.token_ids
    steps = rec.denoise_steps()
    flow = c["flow_steps"]
    assert len(steps) == len(flow)
    assert torch.equal(steps[0][0].cpu(), g["init_noise"])
    for i, ((x, vs), spec) in enumerate(zip(steps, flow)):
        assert rel(x, g[f"step{i}_x_t"]) < TOL, f"x_t step {i}"
        assert rel(vs[0], g[f"step{i}_v_cond"]) < TOL, f"v_cond step {i}"
        if "text_uncond" in spec["branches"]:
            assert rel(vs[1], g[f"step{i}_v_text_uncond"]) < TOL, f"v_text_uncond step {i}"
        if "img_uncond" in spec["branches"]:
            # text2img's image-dropped context is the full one: computed once, reused.
            expected_branches = 3 if any("image" in i for i in c["inputs"]) else 2
            assert len(vs) == expected_branches
            v_i = vs[2] if len(vs) == 3 else vs[0]
            assert rel(v_i, g[f"step{i}_v_img_uncond"]) < TOL, f"v_img_uncond step {i}"
    assert rel(out.latents, g["final_latent_packed"]) < TOL
    assert list(out.images[0].size[::-1]) == c["outputs"][0]["size_hw"]
    assert image_diff(out.images[0], g["image_uint8"]) <= 1


@pytest.mark.parametrize("name", ["img2text_rgb", "img2img", "interleave_und_2img", "interleave_edit_2img"])
def test_image_blocks_in_order(omni: Omni, name: str) -> None:
    """Each input image's blocks reach the full context in input order, with the reference's content: the
    ViT patches of image k, and (image outputs) its VAE latents, sampled from the seed's RNG in order."""
    c, g = case(name)
    with Recorder(omni) as rec:
        omni.generate([kwargs_to_request(c)])
    fed = [w.piece for works, _ in rec.calls for w in works if not w.want_output]
    vits = [p for p in fed if isinstance(p, VitPiece)]
    latents = [p for p in fed if isinstance(p, LatentPiece)]
    n = sum("image" in i for i in c["inputs"])
    assert len(vits) == n and len(latents) == (n if "vae_0_encoded" in g else 0)
    for k, piece in enumerate(vits):
        assert rel(piece.patches, g[f"vit_{k}_pixel_patches"]) < 1e-6, f"ViT patches of image {k}"
        assert torch.equal(piece.position_ids.cpu(), g[f"vit_{k}_vit_position_ids"])
    for k, piece in enumerate(latents):
        ref = pack_latent(g[f"vae_{k}_encoded"][0], omni.config.latent_patch_size)
        assert rel(piece.latents, ref) < TOL, f"VAE latents of image {k}"
    # Every case puts its images first: each image's VAE block (image outputs) then its ViT block, then the text.
    kinds = [type(p).__name__ for p in fed]
    per_image = ["LatentPiece", "VitPiece"] if latents else ["VitPiece"]
    assert kinds[: len(per_image) * n] == per_image * n
    assert set(kinds[len(per_image) * n:]) == {"TextPiece"}
