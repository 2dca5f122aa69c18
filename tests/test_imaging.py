"""Image preprocessing and token layouts against the reference (golden config A)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bagel_serve.imaging import VAE_TRANSFORM_DEFAULT, VIT_TRANSFORM_DEFAULT, ImageInputError, ImageTransformConfig, load_image, resize, resize_size, to_tensor
from bagel_serve.model.layout import flattened_position_ids, pack_latent, patchify, unpack_latent


def _case(cases: dict, name: str) -> dict:
    return next(c for c in cases["cases"] if c["name"] == name)


# ----------------------------------------------------------------------------- resize rule


def test_default_transforms_match_reference() -> None:
    assert VAE_TRANSFORM_DEFAULT == ImageTransformConfig(1024, 512, 16, 14 * 14 * 9 * 1024)
    assert VIT_TRANSFORM_DEFAULT == ImageTransformConfig(980, 224, 14, 1_806_336)


def test_resize_table(golden_a_cases: dict) -> None:
    table = golden_a_cases["components"]["resize_table"]
    transforms = {name: ImageTransformConfig.from_dict(d) for name, d in table["transforms"].items()}
    assert set(transforms) == {"vae_1024_512_16", "vit_980_224_14", "vae_tiny", "vit_tiny"}
    chains = [("vae_1024_512_16", "vit_980_224_14"), ("vae_tiny", "vit_tiny")]
    assert len(table["rows"]) == 24
    checked = 0
    for row in table["rows"]:
        w, h = row["input_wh"]
        for name, cfg in transforms.items():
            assert list(resize_size(w, h, cfg)) == row[f"{name}_wh"], (name, w, h)
            checked += 1
        for first, second in chains:
            mid = resize_size(w, h, transforms[first])
            assert list(resize_size(*mid, transforms[second])) == row[f"{first}_then_{second}_wh"], (first, w, h)
            checked += 1
    assert checked == 24 * 6


def test_resize_quirks() -> None:
    # Minimum short edge is not guaranteed for extreme aspect ratios (the long-edge cap wins).
    assert resize_size(4000, 100, VAE_TRANSFORM_DEFAULT) == (1024, 32)
    # Documented examples of the spec.
    assert resize_size(1920, 1080, VAE_TRANSFORM_DEFAULT) == (1024, 576)
    assert resize_size(1024, 576, VIT_TRANSFORM_DEFAULT) == (980, 546)


def test_transform_config_from_dict() -> None:
    cfg = ImageTransformConfig.from_dict({"max_image_size": 128, "min_image_size": 64, "image_stride": 16, "x": 1})
    assert cfg == ImageTransformConfig(128, 64, 16)
    with pytest.raises(ValueError, match="image_stride"):
        ImageTransformConfig.from_dict({"max_image_size": 128, "min_image_size": 64})
    with pytest.raises(ValueError, match="image_stride"):
        ImageTransformConfig(128, 64, 0)


def test_resize_same_size_is_noop(golden_a: Path) -> None:
    img = load_image(golden_a / "inputs" / "edit_rgb_80x64.png")
    cfg = ImageTransformConfig(128, 64, 16)
    once = resize(img, cfg)
    assert once.size == resize_size(80, 64, cfg)
    twice = resize(once, cfg)
    assert np.array_equal(np.asarray(once), np.asarray(twice))


# ----------------------------------------------------------------------------- ViT input


@pytest.mark.parametrize("case_name", ["img2text_rgb", "img2img"])
def test_vit_patches_and_positions(golden_a: Path, golden_a_cases: dict, golden_a_config: dict, case_name: str) -> None:
    c = _case(golden_a_cases, case_name)
    image_name = next(i["image"] for i in c["inputs"] if "image" in i)
    t = load_file(golden_a / c["tensors_file"])
    vae_t = ImageTransformConfig.from_dict(golden_a_config["vae_image_transform"])
    vit_t = ImageTransformConfig.from_dict(golden_a_config["vit_image_transform"])
    patch = 14

    img = resize(resize(load_image(golden_a / "inputs" / image_name), vae_t), vit_t)
    patches = patchify(to_tensor(img), patch)
    expected = t["vit_0_pixel_patches"]
    assert patches.shape == expected.shape and patches.dtype == torch.float32
    assert (patches - expected).abs().max().item() <= 1e-6

    pos = flattened_position_ids(img.height // patch, img.width // patch, golden_a_config["vit_max_num_patch_per_side"])
    assert pos.dtype == torch.long
    assert torch.equal(pos, t["vit_0_vit_position_ids"])


# ----------------------------------------------------------------------------- layouts


def test_patchify_layout() -> None:
    c, p = 3, 2
    x = torch.arange(c * 4 * 6, dtype=torch.float32).reshape(c, 4, 6)
    out = patchify(x, p)
    assert out.shape == (2 * 3, p * p * c)
    for r in range(2):
        for col in range(3):
            for py in range(p):
                for px in range(p):
                    for ch in range(c):
                        assert out[r * 3 + col, (py * p + px) * c + ch] == x[ch, r * p + py, col * p + px]
    with pytest.raises(ValueError):
        patchify(torch.zeros(3, 5, 4), 2)


def test_flattened_position_ids() -> None:
    assert flattened_position_ids(2, 3, 8).tolist() == [0, 1, 2, 8, 9, 10]
    with pytest.raises(ValueError):
        flattened_position_ids(9, 2, 8)


def test_pack_unpack_latent_layout_and_roundtrip() -> None:
    z, h, w, p = 4, 3, 5, 2
    latent = torch.randn(z, p * h, p * w, generator=torch.Generator().manual_seed(0))
    tokens = pack_latent(latent, p)
    assert tokens.shape == (h * w, p * p * z)
    for r in range(h):
        for col in range(w):
            for py in range(p):
                for px in range(p):
                    for ch in range(z):
                        assert tokens[r * w + col, (py * p + px) * z + ch] == latent[ch, r * p + py, col * p + px]
    assert torch.equal(unpack_latent(tokens, h, w, z, p), latent)
    assert torch.equal(pack_latent(unpack_latent(tokens, h, w, z, p), p), tokens)
    with pytest.raises(ValueError):
        unpack_latent(tokens, w, h + 1, z, p)


# ----------------------------------------------------------------------------- to_tensor


def test_to_tensor_values() -> None:
    arr = np.array([[[0, 128, 255]]], dtype=np.uint8)
    x = to_tensor(Image.fromarray(arr, mode="RGB"))
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    expected = (torch.tensor([0, 128, 255], dtype=torch.float32) / 255 - 0.5) / 0.5
    assert torch.equal(x[:, 0, 0], expected)


# ----------------------------------------------------------------------------- load_image


def test_load_image_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageInputError, match="nope.png") as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_load_image_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "text.png"
    path.write_text("this is not a png\n")
    with pytest.raises(ImageInputError) as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_load_image_truncated(tmp_path: Path, golden_a: Path) -> None:
    data = (golden_a / "inputs" / "edit_rgb_80x64.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError) as e:
        load_image(path, what="input 0")
    assert str(path) in str(e.value)
    assert "input 0" in str(e.value)


def test_load_image_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match=str(tmp_path)):
        load_image(tmp_path)


def test_load_image_rgb_unchanged(golden_a: Path) -> None:
    path = golden_a / "inputs" / "edit_rgb_80x64.png"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (80, 64)
    with Image.open(path) as raw:
        assert np.array_equal(np.asarray(img), np.asarray(raw.convert("RGB")))
    # A PIL image is accepted as well.
    assert np.array_equal(np.asarray(load_image(img)), np.asarray(img))


def test_load_image_rgba_composited_on_white(golden_a: Path) -> None:
    path = golden_a / "inputs" / "und_rgba_90x120.png"
    with Image.open(path) as raw:
        assert raw.mode == "RGBA"
        rgba = np.asarray(raw).astype(np.float64)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (90, 120)
    out = np.asarray(img).astype(np.float64)
    alpha = rgba[..., 3:4] / 255.0
    assert (alpha < 1).any(), "test input should have transparent pixels"
    expected = rgba[..., :3] * alpha + 255.0 * (1 - alpha)
    assert np.abs(out - expected).max() <= 1.0
    opaque = rgba[..., 3] == 255
    clear = rgba[..., 3] == 0
    assert np.array_equal(out[opaque], rgba[..., :3][opaque])
    assert (out[clear] == 255).all()


def test_pil_img2rgb_modes() -> None:
    # 'P' with a transparent palette index is composited onto white, like RGBA.
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    assert np.asarray(load_image(p)).tolist() == [[[255, 255, 255], [200, 100, 50]]]
    # 'LA' carries alpha but no `transparency` entry: the reference just drops the alpha channel.
    la = Image.fromarray(np.array([[[40, 0], [90, 255]]], dtype=np.uint8), mode="LA")
    assert np.asarray(load_image(la)).tolist() == [[[40, 40, 40], [90, 90, 90]]]


def test_load_image_from_bytes_roundtrip(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("L", (5, 4), color=77).save(buf, format="PNG")
    path = tmp_path / "gray.png"
    path.write_bytes(buf.getvalue())
    img = load_image(str(path))
    assert img.mode == "RGB" and (np.asarray(img) == 77).all()


# ----------------------------------------------------------------------------- more than 8 bits


def test_16bit_grey_png_scaled_to_8_bits(tmp_path: Path) -> None:
    """A 16-bit grey PNG is value / 257 (it used to clip to white)."""
    values = np.array([[0, 257, 32896], [65535, 1000, 65278]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    img = load_image(path)
    assert img.mode == "RGB"
    want = np.array([[0, 1, 128], [255, 4, 254]], dtype=np.uint8)
    assert np.array_equal(np.asarray(img)[..., 0], want) and np.array_equal(np.asarray(img)[..., 2], want)


def test_32bit_int_image_read_as_16_bits() -> None:
    """Mode "I" (how some Pillow versions open 16-bit PNGs) is read as 16-bit; values outside [0, 65535]
    have no known scale and are refused."""
    img = load_image(Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I"))
    assert np.asarray(img)[0, :, 0].tolist() == [0, 255]
    with pytest.raises(ImageInputError, match=r"x: a 32-bit integer image with values in \[-5, 70000\] has no known scale"):
        load_image(Image.fromarray(np.array([[-5, 70000]], dtype=np.int32), mode="I"), what="x")


def test_float_tiff_scaled_to_8_bits(tmp_path: Path) -> None:
    """A float image in [0, 1] is x 255 (it used to come out black); other ranges are refused."""
    a = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.002]], dtype=np.float32)
    path = tmp_path / "f.tif"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode == "F"
    got = np.asarray(load_image(path))[..., 1]
    assert got.tolist() == [[0, 64, 128], [191, 255, 1]]
    bad = tmp_path / "f255.tif"
    Image.fromarray(a * 255).save(bad)
    with pytest.raises(ImageInputError, match=rf"{bad}: a floating-point image with values in \[0, 255\] has no known "
                                              r"scale \(values in \[0, 1\] are read, scaled by 255\)"):
        load_image(bad)
    with pytest.raises(ImageInputError, match="values in"):
        load_image(Image.fromarray(np.array([[float("nan"), 0.5]], dtype=np.float32)))


def test_rgb_image_is_not_copied() -> None:
    """An RGB PIL image passes through as is: a big input is decoded and held once."""
    img = Image.new("RGB", (64, 48), (10, 20, 30))
    assert load_image(img) is img
